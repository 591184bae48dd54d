//! `control_request`: one control-socket request line, as the daemon reads
//! it (at most `MAX_REQUEST_BYTES` bytes up to the first newline, parsed by
//! the daemon's [`parse_request_line`]), and the key and TCP-state syntax the requests
//! carry ([`parse_key`], [`parse_tcp_state`]).
//!
//! Checks: nothing panics; an accepted request serializes back to JSON that
//! parses to the same request; an accepted key prints (`Display`) as text
//! that `parse_key` reads back to the same key (its documented contract).

use nicsync::control::{parse_key, parse_request_line, parse_tcp_state, Request, MAX_REQUEST_BYTES};

fn check_key(s: &str) {
    if let Ok(k) = parse_key(s) {
        assert!(k.validate().is_ok(), "parse_key accepted an invalid key");
        let shown = k.to_string();
        match parse_key(&shown) {
            Ok(k2) => assert!(k2 == k, "{s:?} -> {shown:?} -> another key"),
            Err(e) => panic!("{s:?} parsed, but its Display form {shown:?} does not: {e}"),
        }
    }
}

/// The target.
pub fn run(data: &[u8]) {
    // As the daemon reads the socket: a bounded read of one line, parsed by
    // the daemon's own function.
    let bounded = &data[..data.len().min(MAX_REQUEST_BYTES + 1)];
    let line = match bounded.iter().position(|b| *b == b'\n') {
        Some(i) => &bounded[..=i],
        None => bounded,
    };
    match parse_request_line(line) {
        Ok(req) => {
            assert!(line.len() <= MAX_REQUEST_BYTES, "an oversized line was accepted");
            let json = serde_json::to_string(&req).expect("a request serializes");
            let back: Request = serde_json::from_str(&json).expect("a serialized request parses");
            assert!(back == req, "request does not round-trip through JSON: {json}");
            match &req {
                Request::ConnGet { key } | Request::ConnDel { key } => check_key(key),
                Request::ConnAdd { key, tcp_state, .. } => {
                    check_key(key);
                    let _ = tcp_state.as_deref().map(parse_tcp_state);
                }
                _ => {}
            }
        }
        Err(e) => assert!(!e.is_empty()),
    }
    // The key syntax on its own (the CLI's `conn get KEY` and friends).
    let text = String::from_utf8_lossy(data);
    check_key(&text);
    let _ = parse_tcp_state(&text);
}
