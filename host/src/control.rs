//! The daemon's local control socket: requests, replies, and the key syntax
//! the command line uses.
//!
//! One JSON object per line each way over a UNIX stream socket (mode 0600
//! by default; the daemon also checks the peer's uid). A request names its
//! command in `"cmd"`; a reply is `{"ok": true, "data": …}` or
//! `{"ok": false, "error": "…"}`. Requests longer than
//! [`MAX_REQUEST_BYTES`] are refused without being buffered.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use nicsync_fwif::conn::{proto, ConnKey, TcpState};
use serde::{Deserialize, Serialize};

/// Longest request line the daemon reads.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Parses one request line as the daemon reads it from its socket (at most
/// [`MAX_REQUEST_BYTES`] bytes, up to and including the first newline);
/// the error is the message the daemon answers with.
pub fn parse_request_line(line: &[u8]) -> Result<Request, String> {
    if line.len() > MAX_REQUEST_BYTES {
        return Err(format!("request longer than {MAX_REQUEST_BYTES} bytes"));
    }
    let text = std::str::from_utf8(line).map_err(|e| format!("bad request: not UTF-8: {e}"))?;
    match serde_json::from_str::<Request>(text).map_err(|e| format!("bad request: {e}"))? {
        Request::ConnWait { timeout_ms, .. } if timeout_ms > MAX_WAIT_MS => {
            Err(format!("bad request: timeout_ms = {timeout_ms}: at most {MAX_WAIT_MS} ms"))
        }
        req => Ok(req),
    }
}

/// A request to the daemon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Members and states (`nicsync state`).
    State,
    /// Sync statistics (`nicsync syncstat`).
    Syncstat,
    /// Manual Full Sync of one member, or of every member but the sync
    /// source when `member` is absent (`nicsync resync`).
    Resync {
        /// The member to resync.
        #[serde(default)]
        member: Option<u16>,
    },
    /// Entries marked for sync (`nicsync conn list`).
    ConnList {
        /// At most this many.
        #[serde(default)]
        limit: Option<usize>,
    },
    /// One entry (`nicsync conn get`).
    ConnGet {
        /// The key, in [`parse_key`] syntax.
        key: String,
    },
    /// Insert or update an entry (`nicsync conn add`).
    ConnAdd {
        /// The key.
        key: String,
        /// TCP state name (`established`, `syn_sent`, …); left out:
        /// `established` for a TCP key, `none` for any other.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tcp_state: Option<String>,
        /// Seconds until it ages (0: never).
        #[serde(default)]
        timeout_s: u32,
        /// Firewall mark.
        #[serde(default)]
        mark: u32,
        /// Mark for sync (default true).
        #[serde(default = "default_true")]
        sync: bool,
    },
    /// Delete an entry (`nicsync conn del`).
    ConnDel {
        /// The key.
        key: String,
    },
    /// Count and digest of the synced entries (`nicsync conn digest`).
    ConnDigest,
    /// Wait until an entry is on this member's card (`nicsync conn wait`):
    /// answered at once if it is there, else as soon as the host learns that
    /// a peer's update put it there (the card's event interrupt wakes the
    /// member's loop), with when that was (CLOCK_MONOTONIC, comparable
    /// across the network namespaces of one machine); an error after
    /// `timeout_ms`.
    ConnWait {
        /// The key.
        key: String,
        /// Give up after this long (at most 60000).
        #[serde(default = "default_wait_ms")]
        timeout_ms: u64,
    },
    /// Remove every entry from this member's card only; nothing is sent to
    /// the peers (`nicsync conn flush`, before a manual resync).
    ConnFlush,
    /// Read the cluster key file again (`nicsync key reload`).
    ReloadKeys,
}

fn default_wait_ms() -> u64 {
    1000
}

/// Longest [`Request::ConnWait`].
pub const MAX_WAIT_MS: u64 = 60_000;

fn default_true() -> bool {
    true
}

/// The daemon's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// Whether the request succeeded.
    pub ok: bool,
    /// The result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    /// A success.
    pub fn ok(data: serde_json::Value) -> Self {
        Reply { ok: true, data: Some(data), error: None }
    }

    /// A failure.
    pub fn err(why: impl Into<String>) -> Self {
        Reply { ok: false, data: None, error: Some(why.into()) }
    }
}

/// Why talking to the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No daemon at the path, or no permission.
    #[error("cannot reach the daemon at {path} ({hint})")]
    Connect {
        /// The socket path.
        path: String,
        /// What to check, for the cause.
        hint: &'static str,
        /// The cause.
        source: std::io::Error,
    },
    /// The daemon did not answer in time.
    #[error("the daemon did not answer within {0:?}")]
    NoAnswer(Duration),
    /// The exchange broke.
    #[error("control socket: {0}")]
    Io(#[from] std::io::Error),
    /// The daemon sent something that is not a reply.
    #[error("daemon sent a malformed reply: {0}")]
    BadReply(String),
    /// The daemon refused.
    #[error("{0}")]
    Refused(String),
}

/// Sends one request to the daemon at `path` and returns its data.
pub fn call(path: &Path, req: &Request, timeout: Duration) -> Result<serde_json::Value, ControlError> {
    let mut s = UnixStream::connect(path).map_err(|source| {
        let hint = match source.kind() {
            std::io::ErrorKind::PermissionDenied => {
                "run it as root, or as a user the daemon's control.allow_uids lists who may write the socket \
                 (control.socket_mode)"
            }
            _ => "is `nicsync daemon` running with this control.socket? --socket names another",
        };
        ControlError::Connect { path: path.display().to_string(), hint, source }
    })?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut line = serde_json::to_vec(req).map_err(|e| ControlError::BadReply(e.to_string()))?;
    line.push(b'\n');
    // A daemon that refuses this user answers at once and closes: the
    // request may then fail to be written (EPIPE) while the refusal waits
    // to be read. The answer, if any, says more than the broken pipe.
    let written = s.write_all(&line);
    let mut reader = BufReader::new(s.take(16 << 20));
    let mut buf = String::new();
    let read = reader.read_line(&mut buf);
    if let (Err(e), true) = (written, buf.is_empty()) {
        return Err(ControlError::Io(e));
    }
    read.map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => ControlError::NoAnswer(timeout),
        _ => ControlError::Io(e),
    })?;
    let reply: Reply = serde_json::from_str(&buf).map_err(|e| ControlError::BadReply(e.to_string()))?;
    if reply.ok {
        Ok(reply.data.unwrap_or(serde_json::Value::Null))
    } else {
        Err(ControlError::Refused(reply.error.unwrap_or_else(|| "refused".into())))
    }
}

/// Why a key does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("bad connection key {input:?}: {reason} (expected e.g. \"tcp 10.0.0.1:40000 -> 192.0.2.1:443 [zone N]\")")]
pub struct KeyParseError {
    input: String,
    reason: String,
}

/// Parses a key as [`ConnKey`]'s `Display` writes it:
/// `PROTO SRC:PORT -> DST:PORT [zone N]`, where PROTO is `tcp`, `udp`,
/// `icmp`, `icmpv6`, `sctp` or `protoN`, IPv6 addresses are in brackets, and
/// the arrow may be left out.
pub fn parse_key(input: &str) -> Result<ConnKey, KeyParseError> {
    let bad = |reason: &str| KeyParseError { input: input.chars().take(200).collect(), reason: reason.into() };
    let words: Vec<&str> = input.split_whitespace().filter(|w| *w != "->").collect();
    let (p, src, dst, rest) = match words.as_slice() {
        [p, s, d, rest @ ..] => (*p, *s, *d, rest),
        _ => return Err(bad("needs a protocol, a source and a destination")),
    };
    let l4 = match p.to_ascii_lowercase().as_str() {
        "tcp" => proto::TCP,
        "udp" => proto::UDP,
        "icmp" => proto::ICMP,
        "icmpv6" => proto::ICMPV6,
        "sctp" => proto::SCTP,
        other => match other.strip_prefix("proto").map(str::parse::<u8>) {
            Some(Ok(n)) => n,
            _ => return Err(bad("unknown protocol")),
        },
    };
    let zone = match rest {
        [] => 0,
        ["zone", z] => z.parse::<u16>().map_err(|_| bad("zone must be 0..=65535"))?,
        _ => return Err(bad("unexpected words after the destination")),
    };
    let endpoint = |w: &str| -> Result<(IpAddr, u16), KeyParseError> {
        let sa: std::net::SocketAddr = w.parse().map_err(|_| bad("addresses are IP:PORT, IPv6 as [IP]:PORT"))?;
        Ok((sa.ip(), sa.port()))
    };
    let (sip, sport) = endpoint(src)?;
    let (dip, dport) = endpoint(dst)?;
    let key = match (sip, dip) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ConnKey::v4(s, sport, d, dport, l4, zone),
        (IpAddr::V6(s), IpAddr::V6(d)) => ConnKey::v6(s, sport, d, dport, l4, zone),
        _ => return Err(bad("source and destination must be of one address family")),
    };
    key.validate().map_err(|e| bad(&e.to_string()))?;
    Ok(key)
}

/// Parses a TCP state name as [`TcpState::name`] writes it, in any case
/// and with `-` for `_` (`established`, `syn-sent`, `SYN_SENT`, …).
pub fn parse_tcp_state(name: &str) -> Option<TcpState> {
    let n = name.to_ascii_lowercase().replace('-', "_");
    TcpState::ALL.into_iter().find(|t| t.name() == n)
}

/// Every TCP state's name, `a, b, …`, for messages.
pub fn tcp_state_names() -> String {
    TcpState::ALL.map(TcpState::name).join(", ")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// A daemon that takes the request and never answers: the client
    /// says so when its time is up, not "resource temporarily
    /// unavailable".
    #[test]
    fn a_daemon_that_does_not_answer_is_reported_as_such() {
        let dir = std::env::temp_dir().join(format!("nicsync-noanswer-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let holder = std::thread::spawn(move || listener.accept().map(|(s, _)| s));
        let e = call(&path, &Request::State, Duration::from_millis(100)).unwrap_err();
        assert!(matches!(e, ControlError::NoAnswer(_)), "{e:?}");
        assert_eq!(e.to_string(), "the daemon did not answer within 100ms");
        drop(holder.join());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn request_lines_are_bounded_and_checked() {
        assert_eq!(parse_request_line(b"{\"cmd\":\"state\"}\n"), Ok(Request::State));
        assert_eq!(parse_request_line(b"{\"cmd\":\"reload_keys\"}"), Ok(Request::ReloadKeys));
        let long = vec![b' '; MAX_REQUEST_BYTES + 1];
        assert!(parse_request_line(&long).unwrap_err().contains("longer than"));
        assert!(parse_request_line(b"\xff\xfe").unwrap_err().contains("UTF-8"));
        assert!(parse_request_line(b"{\"cmd\":\"format_disk\"}").unwrap_err().starts_with("bad request"));
        let wait =
            |ms: u64| format!("{{\"cmd\":\"conn_wait\",\"key\":\"tcp 10.0.0.1:1 -> 10.0.0.2:2\",\"timeout_ms\":{ms}}}");
        assert!(parse_request_line(wait(MAX_WAIT_MS).as_bytes()).is_ok());
        assert!(parse_request_line(wait(MAX_WAIT_MS + 1).as_bytes()).unwrap_err().contains("at most 60000 ms"));
    }

    #[test]
    fn tcp_state_names_round_trip() {
        for state in TcpState::ALL {
            assert_eq!(parse_tcp_state(state.name()), Some(state));
        }
        assert_eq!(parse_tcp_state("SYN-SENT"), Some(TcpState::SynSent));
        assert_eq!(parse_tcp_state("open"), None);
    }

    /// `conn get` and `conn list` show a record in words a user can pass
    /// back (`--state`), not Rust's debug strings.
    #[test]
    fn a_record_shows_as_plain_json() {
        use nicsync_fwif::conn::{ConnFlags, ConnRecord, ConnState, Direction, Nat, NatKind};
        let key = parse_key("tcp 10.0.0.1:40000 -> 192.0.2.1:443").unwrap();
        let flags = ConnFlags::CONFIRMED | ConnFlags::SYNC | ConnFlags::SRC_NAT;
        let state = ConnState::new(TcpState::SynSent, Direction::Original, flags, 30, 7);
        let nat = Nat::new(NatKind::Source, "198.51.100.7".parse().unwrap(), 61000);
        let v = crate::node::record_json(&ConnRecord { key, state, nat });
        assert_eq!(v["key"], "tcp 10.0.0.1:40000 -> 192.0.2.1:443");
        assert_eq!(v["tcp_state"], "syn_sent");
        assert_eq!(v["flags"], serde_json::json!(["confirmed", "src_nat", "sync"]));
        assert_eq!(v["nat"], serde_json::json!({"kind": "source", "addr": "198.51.100.7", "port": 61000}));
        assert_eq!((v["timeout_s"].as_u64(), v["mark"].as_u64()), (Some(30), Some(7)));
        let plain = crate::node::record_json(&ConnRecord { key, state, nat: Nat::default() });
        assert!(plain["nat"].is_null(), "{plain}");
    }

    #[test]
    fn keys_round_trip_through_display() {
        let keys = [
            ConnKey::v4([10, 0, 0, 1].into(), 40000, [192, 0, 2, 1].into(), 443, proto::TCP, 0),
            ConnKey::v4([10, 0, 0, 1].into(), 53, [192, 0, 2, 1].into(), 53, proto::UDP, 7),
            ConnKey::v6("2001:db8::1".parse().unwrap(), 1, "2001:db8::2".parse().unwrap(), 2, proto::SCTP, 0),
            ConnKey::v4([10, 0, 0, 1].into(), 1, [10, 0, 0, 2].into(), 2, 99, 0),
        ];
        for k in keys {
            assert_eq!(parse_key(&k.to_string()).unwrap(), k, "{k}");
        }
        let plain = ConnKey::v4([10, 0, 0, 1].into(), 1, [10, 0, 0, 2].into(), 2, proto::TCP, 0);
        assert_eq!(parse_key("tcp 10.0.0.1:1 10.0.0.2:2").unwrap(), plain);
    }

    #[test]
    fn bad_keys_are_refused_with_a_reason() {
        for bad in [
            "",
            "tcp",
            "tcp 10.0.0.1:1",
            "bogus 10.0.0.1:1 -> 10.0.0.2:2",
            "tcp 10.0.0.1 -> 10.0.0.2:2",
            "tcp 10.0.0.1:1 -> [::1]:2",
            "tcp 10.0.0.1:1 -> 10.0.0.2:2 zone",
            "tcp 10.0.0.1:1 -> 10.0.0.2:2 zone 70000",
            "tcp 10.0.0.1:1 -> 10.0.0.2:2 extra words",
            "proto300 10.0.0.1:1 -> 10.0.0.2:2",
        ] {
            let e = parse_key(bad).expect_err(bad);
            assert!(e.to_string().contains("bad connection key"), "{e}");
        }
    }

    #[test]
    fn requests_have_stable_json() {
        let r: Request = serde_json::from_str(r#"{"cmd":"resync","member":2}"#).unwrap();
        assert_eq!(r, Request::Resync { member: Some(2) });
        let r: Request = serde_json::from_str(r#"{"cmd":"conn_add","key":"tcp 1.1.1.1:1 -> 2.2.2.2:2"}"#).unwrap();
        assert!(matches!(r, Request::ConnAdd { sync: true, timeout_s: 0, .. }));
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"resync","member":2,"x":1}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"reboot"}"#).is_err());
        assert_eq!(serde_json::to_string(&Request::Syncstat).unwrap(), r#"{"cmd":"syncstat"}"#);
    }
}
