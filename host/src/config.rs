//! The configuration file of `nicsync daemon --config FILE`, which runs one
//! cluster member.
//!
//! The file is TOML; [`Config::load`] reads, parses and validates it, and
//! [`Config::to_toml`] writes a [`Config`] back in the same format. Every key,
//! its default and its rules are described in `docs/config.md`.
//!
//! Every error names the file and, where it can be placed, the 1-based line
//! of the offending key, then the key, its value and the rule it breaks:
//!
//! ```text
//! member.toml:7: membership.dead_after = 1: must be at least 2
//! ```
//!
//! Parsing happens in two steps: the text is deserialized into private
//! "raw" structures that keep the byte span of every value
//! ([`toml::Spanned`]), then each value is checked and converted into the
//! public types, so that a rule broken by a value can report its line.

use std::fmt::{self, Write as _};
use std::net::{Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

pub use crate::ctsync::{CommitMode, ConntrackConfig, Prefix, SyncFilter};
use crate::membership::MAX_PEERS;

/// Default UDP port of the device's Delta Sync unit (ClusterXL's port).
pub const DEFAULT_SYNC_PORT: u16 = 8116;
/// Default UDP port of the membership health probes.
pub const DEFAULT_MEMBERSHIP_PORT: u16 = 8117;
/// Default TCP port of full sync.
pub const DEFAULT_FULL_SYNC_PORT: u16 = 8118;
/// Default number of connection-table entries on the device.
pub const DEFAULT_TABLE_CAPACITY: u32 = 1 << 20;
/// Smallest accepted `device.table_capacity`.
pub const MIN_TABLE_CAPACITY: u32 = 16;
/// Largest accepted `device.table_capacity`.
pub const MAX_TABLE_CAPACITY: u32 = 1 << 24;
/// Default aging period in milliseconds.
pub const DEFAULT_AGING_PERIOD_MS: u32 = 1000;
/// Default interval between membership probes.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_millis(10);
/// Largest accepted `membership.probe_interval_ms`.
pub const MAX_PROBE_INTERVAL_MS: u32 = 10_000;
/// Default number of missed probes after which a member is declared down.
pub const DEFAULT_DEAD_AFTER: u32 = 5;
/// Smallest accepted `membership.dead_after`.
pub const MIN_DEAD_AFTER: u32 = 2;
/// Default number of connection records per full-sync chunk.
pub const DEFAULT_CHUNK_RECORDS: u32 = crate::fullsync::DEFAULT_CHUNK_RECORDS;
/// Largest accepted `full_sync.chunk_records`.
pub const MAX_CHUNK_RECORDS: u32 = 65_536;
/// Default full-sync per-chunk stall timeout.
pub const DEFAULT_FULL_SYNC_TIMEOUT: Duration = Duration::from_millis(2000);
/// Largest accepted `full_sync.timeout_ms` (10 minutes).
pub const MAX_FULL_SYNC_TIMEOUT_MS: u32 = 600_000;
/// Default longest wait, at an orderly stop, for the peers to acknowledge
/// this member's changes (`sync.stop_drain_ms`).
pub const DEFAULT_STOP_DRAIN: Duration = Duration::from_millis(1000);
/// Largest accepted `sync.stop_drain_ms`.
pub const MAX_STOP_DRAIN_MS: u32 = 60_000;
/// Default path of the UNIX control socket.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/nicsync/nicsync.sock";
/// Default permission bits of the control socket.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;
/// Upper bound of `conntrack.delay_ms` (one hour).
pub const MAX_CONNTRACK_DELAY_MS: i64 = 3_600_000;
/// Longest control socket path, in bytes (`sun_path` is 108 bytes with
/// its terminating NUL).
pub const MAX_SOCKET_PATH_LEN: usize = 107;

/// How the cluster shares traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ClusterMode {
    /// High availability: one member is Active, the others stand by.
    #[default]
    #[serde(rename = "ha")]
    HighAvailability,
    /// Load sharing: every member is Active.
    #[serde(rename = "load-sharing")]
    LoadSharing,
}

impl ClusterMode {
    /// The name used in the configuration file: `"ha"` or `"load-sharing"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ClusterMode::HighAvailability => "ha",
            ClusterMode::LoadSharing => "load-sharing",
        }
    }
}

impl fmt::Display for ClusterMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which device holds the connection table.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DeviceKind {
    /// The embedded emulated device (the software model of the design).
    #[default]
    Emulated,
    /// A real PCI function bound to `vfio-pci`.
    Vfio {
        /// PCI address, `DDDD:BB:DD.F` (domain, bus, device, function).
        bdf: String,
    },
}

/// `[device]`: the device and its connection table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Emulated or VFIO device.
    pub kind: DeviceKind,
    /// Number of connection-table entries: a power of two in
    /// [`MIN_TABLE_CAPACITY`]`..=`[`MAX_TABLE_CAPACITY`].
    pub table_capacity: u32,
    /// Aging period in milliseconds; 0 disables aging.
    pub aging_period_ms: u32,
    /// Keep a host copy of the card's table and recover from device faults
    /// with it (docs/faults.md); on by default.
    pub fault_recovery: bool,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig {
            kind: DeviceKind::Emulated,
            table_capacity: DEFAULT_TABLE_CAPACITY,
            aging_period_ms: DEFAULT_AGING_PERIOD_MS,
            fault_recovery: true,
        }
    }
}

/// `[sync]`: the Delta Sync port of the device's sync unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncConfig {
    /// Local UDP address Delta Sync frames are sent from and received on.
    pub bind: SocketAddr,
    /// At an orderly stop (SIGTERM, SIGINT), the longest wait for every
    /// peer to acknowledge this member's changes before it announces
    /// itself Down and exits.
    pub stop_drain: Duration,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig { bind: any_addr(DEFAULT_SYNC_PORT), stop_drain: DEFAULT_STOP_DRAIN }
    }
}

/// `[membership]`: health probes between members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipConfig {
    /// Local UDP address of the probes.
    pub bind: SocketAddr,
    /// Interval between probes sent to each peer.
    pub probe_interval: Duration,
    /// Consecutive missed probes after which a peer is declared Down.
    pub dead_after: u32,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        MembershipConfig {
            bind: any_addr(DEFAULT_MEMBERSHIP_PORT),
            probe_interval: DEFAULT_PROBE_INTERVAL,
            dead_after: DEFAULT_DEAD_AFTER,
        }
    }
}

/// `[full_sync]`: bulk transfer of the whole table to a (re)joining member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FullSyncConfig {
    /// Local TCP address the full-sync server listens on.
    pub bind: SocketAddr,
    /// Connection records per chunk (1..=[`MAX_CHUNK_RECORDS`]).
    pub chunk_records: u32,
    /// A transfer that makes no progress on a chunk for this long fails.
    pub timeout: Duration,
}

impl Default for FullSyncConfig {
    fn default() -> Self {
        FullSyncConfig {
            bind: any_addr(DEFAULT_FULL_SYNC_PORT),
            chunk_records: DEFAULT_CHUNK_RECORDS,
            timeout: DEFAULT_FULL_SYNC_TIMEOUT,
        }
    }
}

/// `[control]`: the local UNIX control socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlConfig {
    /// Path of the socket.
    pub socket: PathBuf,
    /// Permission bits of the socket (at most `0o777`).
    pub socket_mode: u32,
    /// Uids allowed to connect besides the daemon's own uid.
    pub allow_uids: Vec<u32>,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            socket: PathBuf::from(DEFAULT_CONTROL_SOCKET),
            socket_mode: DEFAULT_SOCKET_MODE,
            allow_uids: Vec::new(),
        }
    }
}

/// `[security]`: sealing of the cluster's sync traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecurityConfig {
    /// Seal Delta Sync, membership and Full Sync (default). `false` runs
    /// them in clear and logs a warning at start.
    pub encryption: bool,
    /// The cluster key file (mode 0600); required when `encryption` is on
    /// (checked when the daemon starts, so that a configuration can be
    /// checked without the key).
    pub key_file: Option<PathBuf>,
    /// Where this member keeps its boot number, so that nonces never repeat
    /// across restarts; default `<key_file>.boot-m<member_id>`.
    pub boot_file: Option<PathBuf>,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        SecurityConfig { encryption: true, key_file: None, boot_file: None }
    }
}

impl SecurityConfig {
    /// The boot file in effect for member `member_id`.
    pub fn boot_file_for(&self, member_id: u16) -> Option<PathBuf> {
        self.boot_file.clone().or_else(|| {
            self.key_file.as_ref().map(|k| {
                let mut s = k.clone().into_os_string();
                s.push(format!(".boot-m{member_id}"));
                PathBuf::from(s)
            })
        })
    }
}

/// `[[peer]]`: another member of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// The peer's member id (non-zero, unique, not this member's).
    pub id: u16,
    /// The peer's Delta Sync UDP address.
    pub sync: SocketAddr,
    /// The peer's membership probe UDP address.
    pub membership: SocketAddr,
    /// The peer's full-sync TCP addresses, tried in order (at least one).
    pub full_sync: Vec<SocketAddr>,
}

/// What feeds the card's connection table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TableSource {
    /// The control socket only (`nicsync conn add|del`), or an application
    /// through the library.
    #[default]
    Control,
    /// The kernel's connection tracking, over ctnetlink ([`crate::ctsync`]).
    Conntrack,
}

impl TableSource {
    /// The configuration string.
    pub fn as_str(self) -> &'static str {
        match self {
            TableSource::Control => "control",
            TableSource::Conntrack => "conntrack",
        }
    }
}

/// The configuration of one cluster member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// This member's id, non-zero.
    pub member_id: u16,
    /// The cluster's id, non-zero; frames of other clusters are dropped.
    pub cluster_id: u16,
    /// High availability or load sharing.
    pub mode: ClusterMode,
    /// `[device]`.
    pub device: DeviceConfig,
    /// `[sync]`.
    pub sync: SyncConfig,
    /// `[membership]`.
    pub membership: MembershipConfig,
    /// `[full_sync]`.
    pub full_sync: FullSyncConfig,
    /// `[control]`.
    pub control: ControlConfig,
    /// `[security]`.
    pub security: SecurityConfig,
    /// `source`: what feeds the table.
    pub source: TableSource,
    /// `[conntrack]`: the kernel source and sink (with `source = "conntrack"`).
    pub conntrack: ConntrackConfig,
    /// `[[peer]]`, in file order.
    pub peers: Vec<PeerConfig>,
    /// `nice`: the scheduling priority the daemon sets for itself before it
    /// starts any thread (-20..=19); `None` leaves the one it was started
    /// with.
    pub nice: Option<i32>,
}

impl Default for Config {
    /// Member 1 of cluster 1, every other key at its default, no peers.
    fn default() -> Self {
        Config {
            member_id: 1,
            cluster_id: 1,
            mode: ClusterMode::default(),
            device: DeviceConfig::default(),
            sync: SyncConfig::default(),
            membership: MembershipConfig::default(),
            full_sync: FullSyncConfig::default(),
            control: ControlConfig::default(),
            security: SecurityConfig::default(),
            source: TableSource::default(),
            conntrack: ConntrackConfig::default(),
            peers: Vec::new(),
            nice: None,
        }
    }
}

/// Why a configuration file was rejected. `Display` names the file, the
/// line where known and the reason.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: cannot read: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{}:{line}:{column}: {reason}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column, in characters.
        column: usize,
        /// What is wrong.
        reason: String,
    },
    /// The file is TOML but breaks a rule of the schema.
    #[error("{}{}: {reason}", path.display(), LineSuffix(*line))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based line of the offending key, where it can be placed.
        line: Option<usize>,
        /// The key, its value and the rule it breaks.
        reason: String,
    },
}

/// Formats `:LINE` when the line is known, nothing otherwise.
struct LineSuffix(Option<usize>);

impl fmt::Display for LineSuffix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(line) => write!(f, ":{line}"),
            None => Ok(()),
        }
    }
}

impl Config {
    /// Reads, parses and validates the configuration file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.to_path_buf(), source })?;
        Config::parse(&text, path)
    }

    /// Parses and validates `text`; `origin` names the file in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let src = Source { text, path: origin };
        // Plain TOML first, so that syntax errors are told apart from
        // errors of the schema.
        if let Err(e) = text.parse::<toml::Table>() {
            let span = e.span().unwrap_or(0..0);
            let (line, column) = src.line_col(span.start);
            let mut reason = e.message().trim_end().to_owned();
            // Name what the span covers (the key of "duplicate key").
            let what = text.get(span).filter(|t| !t.trim().is_empty() && !t.contains('\n')).map(str::trim);
            if let Some(what) = what {
                reason = format!("{reason}: `{what}`");
            }
            // The two slips a Unix hand makes first.
            if reason.starts_with("duplicate key") && what == Some(PEER) {
                reason = format!("{reason} (peers are written [[{PEER}]], one table per peer)");
            } else if reason.contains("leading zero") {
                reason = format!(
                    "{reason} (a TOML number cannot start with 0: write a file mode as a string, e.g. \"0660\")"
                );
            }
            return Err(ConfigError::Syntax { path: origin.to_path_buf(), line, column, reason });
        }
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let message = e.message().trim_end();
            // serde reports a missing key of the top-level table at offset 0.
            let span = e.span().filter(|s| !(s.is_empty() && message.starts_with("missing field")));
            let (span, reason) = src.schema_error(span, message);
            src.invalid(span, reason)
        })?;
        src.convert(raw)
    }

    /// Writes this configuration as TOML, every key explicit, in the format
    /// [`Config::parse`] reads. Durations are written in whole
    /// milliseconds and paths lossily as UTF-8.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = self.write_toml(&mut out);
        out
    }

    fn write_toml(&self, out: &mut String) -> fmt::Result {
        writeln!(out, "member_id = {}", self.member_id)?;
        writeln!(out, "cluster_id = {}", self.cluster_id)?;
        writeln!(out, "mode = {}", quote(self.mode.as_str()))?;
        writeln!(out, "source = {}", quote(self.source.as_str()))?;
        if let Some(n) = self.nice {
            writeln!(out, "nice = {n}")?;
        }

        writeln!(out, "\n[device]")?;
        match &self.device.kind {
            DeviceKind::Emulated => writeln!(out, "kind = \"emulated\"")?,
            DeviceKind::Vfio { bdf } => {
                writeln!(out, "kind = \"vfio\"")?;
                writeln!(out, "bdf = {}", quote(bdf))?;
            }
        }
        writeln!(out, "table_capacity = {}", self.device.table_capacity)?;
        writeln!(out, "aging_period_ms = {}", self.device.aging_period_ms)?;
        writeln!(out, "fault_recovery = {}", self.device.fault_recovery)?;

        writeln!(out, "\n[sync]")?;
        writeln!(out, "bind = {}", quote(&self.sync.bind.to_string()))?;
        writeln!(out, "stop_drain_ms = {}", self.sync.stop_drain.as_millis())?;

        writeln!(out, "\n[membership]")?;
        writeln!(out, "bind = {}", quote(&self.membership.bind.to_string()))?;
        writeln!(out, "probe_interval_ms = {}", self.membership.probe_interval.as_millis())?;
        writeln!(out, "dead_after = {}", self.membership.dead_after)?;

        writeln!(out, "\n[full_sync]")?;
        writeln!(out, "bind = {}", quote(&self.full_sync.bind.to_string()))?;
        writeln!(out, "chunk_records = {}", self.full_sync.chunk_records)?;
        writeln!(out, "timeout_ms = {}", self.full_sync.timeout.as_millis())?;

        writeln!(out, "\n[control]")?;
        writeln!(out, "socket = {}", quote(&self.control.socket.to_string_lossy()))?;
        writeln!(out, "socket_mode = \"{:04o}\"", self.control.socket_mode)?;
        let uids: Vec<String> = self.control.allow_uids.iter().map(u32::to_string).collect();
        writeln!(out, "allow_uids = [{}]", uids.join(", "))?;

        writeln!(out, "\n[security]")?;
        writeln!(out, "encryption = {}", self.security.encryption)?;
        if let Some(k) = &self.security.key_file {
            writeln!(out, "key_file = {}", quote(&k.to_string_lossy()))?;
        }
        if let Some(b) = &self.security.boot_file {
            writeln!(out, "boot_file = {}", quote(&b.to_string_lossy()))?;
        }

        if self.source == TableSource::Conntrack {
            let c = &self.conntrack;
            writeln!(out, "\n[conntrack]")?;
            writeln!(out, "commit = {}", quote(c.commit.as_str()))?;
            writeln!(out, "delay_ms = {}", c.delay.as_millis())?;
            writeln!(out, "event_buffer_bytes = {}", c.event_buffer_bytes)?;
            let f = &c.filter;
            if !f.is_empty() {
                let list = |v: Vec<String>| v.join(", ");
                writeln!(out, "\n[conntrack.filter]")?;
                writeln!(out, "protocols = [{}]", list(f.protocols.iter().map(|p| p.to_string()).collect()))?;
                let prefixes = |v: &[Prefix]| list(v.iter().map(|p| quote(&format!("{}/{}", p.addr, p.len))).collect());
                writeln!(out, "addresses = [{}]", prefixes(&f.addresses))?;
                writeln!(out, "ignore_addresses = [{}]", prefixes(&f.ignore_addresses))?;
                let ranges = |v: &[(u16, u16)]| list(v.iter().map(|(a, b)| quote(&format!("{a}-{b}"))).collect());
                writeln!(out, "ports = [{}]", ranges(&f.ports))?;
                writeln!(out, "ignore_ports = [{}]", ranges(&f.ignore_ports))?;
                writeln!(out, "tcp_states = [{}]", list(f.tcp_states.iter().map(|t| quote(t.name())).collect()))?;
            }
        }

        for peer in &self.peers {
            writeln!(out, "\n[[peer]]")?;
            writeln!(out, "id = {}", peer.id)?;
            writeln!(out, "sync = {}", quote(&peer.sync.to_string()))?;
            writeln!(out, "membership = {}", quote(&peer.membership.to_string()))?;
            let addrs: Vec<String> = peer.full_sync.iter().map(|a| quote(&a.to_string())).collect();
            writeln!(out, "full_sync = [{}]", addrs.join(", "))?;
        }
        Ok(())
    }
}

/// `0.0.0.0:port`.
fn any_addr(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))
}

/// `s` as a TOML basic string, escaped.
fn quote(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

// ---------------------------------------------------------------------------
// The file as written: every validated value keeps its span.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    member_id: Spanned<i64>,
    cluster_id: Spanned<i64>,
    #[serde(default)]
    mode: ClusterMode,
    #[serde(default)]
    device: RawDevice,
    #[serde(default)]
    sync: RawSync,
    #[serde(default)]
    membership: RawMembership,
    #[serde(default)]
    full_sync: RawFullSync,
    #[serde(default)]
    control: RawControl,
    #[serde(default)]
    security: RawSecurity,
    source: Option<Spanned<String>>,
    conntrack: Option<Spanned<RawConntrack>>,
    #[serde(default, rename = "peer")]
    peers: Vec<Spanned<RawPeer>>,
    nice: Option<Spanned<i64>>,
}

#[derive(Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawKind {
    Emulated,
    Vfio,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDevice {
    kind: Option<Spanned<RawKind>>,
    bdf: Option<Spanned<String>>,
    table_capacity: Option<Spanned<i64>>,
    aging_period_ms: Option<Spanned<i64>>,
    fault_recovery: Option<bool>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSync {
    bind: Option<Spanned<String>>,
    stop_drain_ms: Option<Spanned<i64>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMembership {
    bind: Option<Spanned<String>>,
    probe_interval_ms: Option<Spanned<i64>>,
    dead_after: Option<Spanned<i64>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFullSync {
    bind: Option<Spanned<String>>,
    chunk_records: Option<Spanned<i64>>,
    timeout_ms: Option<Spanned<i64>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecurity {
    encryption: Option<bool>,
    key_file: Option<Spanned<String>>,
    boot_file: Option<Spanned<String>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConntrack {
    commit: Option<Spanned<String>>,
    delay_ms: Option<Spanned<i64>>,
    event_buffer_bytes: Option<Spanned<i64>>,
    #[serde(default)]
    filter: RawFilter,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFilter {
    protocols: Option<Vec<Spanned<toml::Value>>>,
    addresses: Option<Vec<Spanned<String>>>,
    ignore_addresses: Option<Vec<Spanned<String>>>,
    ports: Option<Vec<Spanned<toml::Value>>>,
    ignore_ports: Option<Vec<Spanned<toml::Value>>>,
    tcp_states: Option<Vec<Spanned<String>>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawControl {
    socket: Option<Spanned<String>>,
    socket_mode: Option<Spanned<toml::Value>>,
    allow_uids: Option<Vec<Spanned<i64>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    id: Spanned<i64>,
    sync: Spanned<String>,
    membership: Spanned<String>,
    full_sync: Spanned<AddrList>,
}

/// One address string, or an array of them (each with its own span).
enum AddrList {
    One(String),
    Many(Vec<Spanned<String>>),
}

impl<'de> Deserialize<'de> for AddrList {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct AddrListVisitor;

        impl<'de> Visitor<'de> for AddrListVisitor {
            type Value = AddrList;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an address string or an array of address strings")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<AddrList, E> {
                Ok(AddrList::One(v.to_owned()))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<AddrList, A::Error> {
                let mut addrs = Vec::new();
                while let Some(addr) = seq.next_element::<Spanned<String>>()? {
                    addrs.push(addr);
                }
                Ok(AddrList::Many(addrs))
            }
        }

        deserializer.deserialize_any(AddrListVisitor)
    }
}

// ---------------------------------------------------------------------------
// Checking and converting.

/// The text being parsed, to turn spans into lines.
struct Source<'a> {
    text: &'a str,
    path: &'a Path,
}

/// Where a bound address was set, for conflict messages.
struct Bind {
    key: &'static str,
    addr: SocketAddr,
    span: Option<Range<usize>>,
}

impl Source<'_> {
    /// 1-based line and column (in characters) of byte offset `offset`.
    fn line_col(&self, offset: usize) -> (usize, usize) {
        let mut line = 1;
        let mut column = 1;
        for (i, c) in self.text.char_indices() {
            if i >= offset {
                break;
            }
            if c == '\n' {
                line += 1;
                column = 1;
            } else {
                column += 1;
            }
        }
        (line, column)
    }

    fn invalid(&self, span: Option<Range<usize>>, reason: String) -> ConfigError {
        ConfigError::Invalid { path: self.path.to_path_buf(), line: span.map(|s| self.line_col(s.start).0), reason }
    }

    /// Puts the key path in front of an error of the deserializer, which
    /// names neither the key nor its table, and words Rust's type names as
    /// TOML's: `invalid type: string "yes", expected a boolean` at
    /// `fault_recovery` under `[device]` becomes
    /// `device.fault_recovery = "yes": expected a boolean, found a string`.
    /// Returns the span to report with the reason: `span`, or the header of
    /// a table written with the wrong brackets.
    fn schema_error(&self, span: Option<Range<usize>>, message: &str) -> (Option<Range<usize>>, String) {
        let message = toml_words(message);
        let Some(at) = span.clone() else { return (span, message) };
        // The text is valid TOML (checked before); parse it again, keeping
        // the span of every key and value, to find what `at` covers.
        let Ok(doc) = DeTable::parse(self.text) else { return (span, message) };
        let mut path = Vec::new();
        let Some(node) = locate(self.text, doc.get_ref(), &at, &mut path) else { return (span, message) };

        // An unknown field is named by the message and placed by its line;
        // its table is said too (a top-level key written after a table's
        // header lands in that table).
        if let Some(rest) = message.strip_prefix("unknown field `") {
            let table = path.split_last().map(|(_, t)| t).filter(|t| !t.is_empty());
            return match (table, rest.split_once('`')) {
                (Some(t), Some((field, after))) => {
                    (span, format!("unknown field `{field}` in [{}]{after}", key_path(t, false)))
                }
                _ => (span, message),
            };
        }

        // `[[name]]` where the schema has a single table `[name]`: serde's
        // message is about whatever it tried to make of the array. Not
        // where it wanted a value in place of the element (`[[mode]]`,
        // `[[control.allow_uids]]`): the key is no table at all.
        let value_wanted = message == "wanted string or table"
            || ["an integer", "a string", "a boolean", "a float", "`"]
                .iter()
                .any(|w| message.contains(&format!("expected {w}")));
        let hint_at = path.iter().position(|seg| matches!(seg, Seg::Index { header: Some(_), .. }));
        if let Some(pos) = hint_at.filter(|pos| path.len() > pos + 1 || !value_wanted) {
            let name = key_path(&path[..pos], false);
            if let (false, Seg::Index { header: Some(header), .. }) = (name == PEER, &path[pos]) {
                return (
                    Some(header.clone()),
                    format!("{name}: an array of [[{name}]] tables; {name} is a single table, written [{name}]"),
                );
            }
        }
        // A table in an array is named with its index (`peer[1]`), as is
        // anything in place of a peer (`peer = [1]`); a value in an array is
        // named by its key.
        let in_peers = matches!(path.as_slice(), [Seg::Key(PEER), Seg::Index { .. }]);
        let name = key_path(&path, in_peers || node.get_ref().is_table());
        let header = self.text.get(node.span()).is_some_and(|t| t.starts_with('['));
        if matches!(path.as_slice(), [Seg::Key(PEER)]) && header && node.get_ref().is_table() {
            return (
                span,
                format!("{PEER}: a single [{PEER}] table; peers are written [[{PEER}]], one table per peer"),
            );
        }

        // The value as written, where it is short and on one line.
        let missing = message.starts_with("missing field");
        let shown = self.text.get(node.span()).filter(|t| {
            let inline = match node.get_ref() {
                DeValue::Table(_) => t.starts_with('{'),
                DeValue::Array(_) => !array_of_tables(node),
                _ => true,
            };
            inline && !missing && !t.contains('\n') && t.chars().count() <= 60
        });
        let head = match shown {
            Some(v) => format!("{name} = {v}"),
            None => name,
        };
        let found = type_name(node.get_ref());
        let rule = if let Some((_, expected)) =
            message.strip_prefix("invalid type: ").and_then(|rest| rest.rsplit_once(", expected "))
        {
            format!("expected {expected}, found {found}")
        } else if let (Some(_), Some((_, expected))) =
            (shown, message.strip_prefix("unknown variant ").and_then(|rest| rest.rsplit_once(", expected ")))
        {
            format!("expected {expected}")
        } else if message == "wanted string or table" {
            // An enum's value that is neither a string nor a table.
            format!("expected a string, found {found}")
        } else {
            message
        };
        (span, format!("{head}: {rule}"))
    }

    fn line_of(&self, span: &Option<Range<usize>>) -> String {
        match span {
            Some(s) => format!(" (line {})", self.line_col(s.start).0),
            None => " (its default)".to_owned(),
        }
    }

    /// An integer in `lo..=hi`, converted to `T`.
    fn int<T: TryFrom<i64>>(&self, key: &str, v: &Spanned<i64>, lo: i64, hi: i64) -> Result<T, ConfigError> {
        let value = *v.get_ref();
        let converted = if (lo..=hi).contains(&value) { T::try_from(value).ok() } else { None };
        converted.ok_or_else(|| {
            let rule = if value < lo && hi >= i64::from(u32::MAX) {
                format!("must be at least {lo}")
            } else if value > hi && lo == 0 {
                format!("must be at most {hi}")
            } else {
                format!("must be between {lo} and {hi}")
            };
            self.invalid(Some(v.span()), format!("{key} = {value}: {rule}"))
        })
    }

    fn opt_int<T: TryFrom<i64>>(
        &self,
        key: &str,
        v: &Option<Spanned<i64>>,
        lo: i64,
        hi: i64,
        default: T,
    ) -> Result<T, ConfigError> {
        match v {
            Some(v) => self.int(key, v, lo, hi),
            None => Ok(default),
        }
    }

    /// An `IP:port` socket address.
    fn addr(&self, key: &str, v: &Spanned<String>) -> Result<SocketAddr, ConfigError> {
        v.get_ref().parse::<SocketAddr>().map_err(|_| {
            self.invalid(
                Some(v.span()),
                format!(
                    "{key} = {}: not an IP address and port (such as \"192.0.2.1:8116\" or \"[2001:db8::1]:8116\")",
                    quote(v.get_ref())
                ),
            )
        })
    }

    /// A local bind address; `default` when the key is absent.
    fn bind(&self, key: &'static str, v: &Option<Spanned<String>>, default: SocketAddr) -> Result<Bind, ConfigError> {
        match v {
            Some(v) => Ok(Bind { key, addr: self.addr(key, v)?, span: Some(v.span()) }),
            None => Ok(Bind { key, addr: default, span: None }),
        }
    }

    /// A peer's address: something that can be sent to.
    fn remote(&self, key: &str, v: &Spanned<String>) -> Result<SocketAddr, ConfigError> {
        let addr = self.addr(key, v)?;
        if addr.ip().is_unspecified() || addr.port() == 0 {
            return Err(self.invalid(
                Some(v.span()),
                format!("{key} = {}: a peer address needs a specific IP and a non-zero port", quote(v.get_ref())),
            ));
        }
        Ok(addr)
    }

    fn convert(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let member_id: u16 = self.int("member_id", &raw.member_id, 1, i64::from(u16::MAX))?;
        let cluster_id: u16 = self.int("cluster_id", &raw.cluster_id, 1, i64::from(u16::MAX))?;
        let nice: Option<i32> = raw.nice.as_ref().map(|v| self.int("nice", v, -20, 19)).transpose()?;
        let device = self.device(&raw.device)?;

        let sync_bind = self.bind("sync.bind", &raw.sync.bind, any_addr(DEFAULT_SYNC_PORT))?;
        let stop_drain_ms: u64 = self.opt_int(
            "sync.stop_drain_ms",
            &raw.sync.stop_drain_ms,
            0,
            i64::from(MAX_STOP_DRAIN_MS),
            DEFAULT_STOP_DRAIN.as_millis() as u64,
        )?;
        let m = &raw.membership;
        let membership_bind = self.bind("membership.bind", &m.bind, any_addr(DEFAULT_MEMBERSHIP_PORT))?;
        let probe_ms: u64 = self.opt_int(
            "membership.probe_interval_ms",
            &m.probe_interval_ms,
            1,
            i64::from(MAX_PROBE_INTERVAL_MS),
            DEFAULT_PROBE_INTERVAL.as_millis() as u64,
        )?;
        let dead_after: u32 = self.opt_int(
            "membership.dead_after",
            &m.dead_after,
            i64::from(MIN_DEAD_AFTER),
            i64::from(u32::MAX),
            DEFAULT_DEAD_AFTER,
        )?;
        // Both UDP: they must not overlap. full_sync is TCP, a separate
        // port space.
        if overlaps(sync_bind.addr, membership_bind.addr) {
            // Report the key written last; the other is its cause.
            let (first, second) = match (&sync_bind.span, &membership_bind.span) {
                (Some(s), Some(m)) if s.start > m.start => (&membership_bind, &sync_bind),
                (Some(_), None) => (&membership_bind, &sync_bind),
                _ => (&sync_bind, &membership_bind),
            };
            return Err(self.invalid(
                second.span.clone(),
                format!(
                    "{} = \"{}\": conflicts with {} = \"{}\"{}: both are UDP",
                    second.key,
                    second.addr,
                    first.key,
                    first.addr,
                    self.line_of(&first.span)
                ),
            ));
        }

        let f = &raw.full_sync;
        let full_sync_bind = self.bind("full_sync.bind", &f.bind, any_addr(DEFAULT_FULL_SYNC_PORT))?;
        let chunk_records: u32 = self.opt_int(
            "full_sync.chunk_records",
            &f.chunk_records,
            1,
            i64::from(MAX_CHUNK_RECORDS),
            DEFAULT_CHUNK_RECORDS,
        )?;
        let timeout_ms: u64 = self.opt_int(
            "full_sync.timeout_ms",
            &f.timeout_ms,
            1,
            i64::from(MAX_FULL_SYNC_TIMEOUT_MS),
            DEFAULT_FULL_SYNC_TIMEOUT.as_millis() as u64,
        )?;

        let control = self.control(&raw.control)?;
        let security = SecurityConfig {
            encryption: raw.security.encryption.unwrap_or(true),
            key_file: self.opt_path("security.key_file", &raw.security.key_file)?,
            boot_file: self.opt_path("security.boot_file", &raw.security.boot_file)?,
        };
        let source = match &raw.source {
            None => TableSource::Control,
            Some(v) => match v.get_ref().as_str() {
                "control" => TableSource::Control,
                "conntrack" => TableSource::Conntrack,
                other => {
                    return Err(self.invalid(
                        Some(v.span()),
                        format!("source = {}: must be \"control\" or \"conntrack\"", quote(other)),
                    ))
                }
            },
        };
        let conntrack = match &raw.conntrack {
            None => ConntrackConfig::default(),
            Some(c) if source != TableSource::Conntrack => {
                return Err(self.invalid(
                    Some(c.span()),
                    "[conntrack] is set but source is not \"conntrack\" (add source = \"conntrack\" at the top of the file)"
                        .to_owned(),
                ))
            }
            Some(c) => self.conntrack(c.get_ref())?,
        };
        let locals = [&sync_bind, &membership_bind, &full_sync_bind];
        let peers = self.peers(&raw.peers, member_id, &locals)?;

        Ok(Config {
            member_id,
            cluster_id,
            mode: raw.mode,
            device,
            sync: SyncConfig { bind: sync_bind.addr, stop_drain: Duration::from_millis(stop_drain_ms) },
            membership: MembershipConfig {
                bind: membership_bind.addr,
                probe_interval: Duration::from_millis(probe_ms),
                dead_after,
            },
            full_sync: FullSyncConfig {
                bind: full_sync_bind.addr,
                chunk_records,
                timeout: Duration::from_millis(timeout_ms),
            },
            control,
            security,
            source,
            conntrack,
            peers,
            nice,
        })
    }

    fn conntrack(&self, c: &RawConntrack) -> Result<ConntrackConfig, ConfigError> {
        let commit = match &c.commit {
            None => CommitMode::default(),
            Some(v) => match v.get_ref().as_str() {
                "on-active" => CommitMode::OnActive,
                "always" => CommitMode::Always,
                "never" => CommitMode::Never,
                other => {
                    return Err(self.invalid(
                        Some(v.span()),
                        format!("conntrack.commit = {}: must be \"on-active\", \"always\" or \"never\"", quote(other)),
                    ))
                }
            },
        };
        let delay_ms: u64 = self.opt_int("conntrack.delay_ms", &c.delay_ms, 0, MAX_CONNTRACK_DELAY_MS, 0)?;
        let event_buffer_bytes: usize = self.opt_int(
            "conntrack.event_buffer_bytes",
            &c.event_buffer_bytes,
            4096,
            1 << 30,
            nicsync_conntrack::client::EVENT_RCVBUF,
        )?;
        let f = &c.filter;
        let mut filter = SyncFilter::default();
        for v in f.protocols.iter().flatten() {
            let p = match v.get_ref() {
                toml::Value::String(s) => match s.to_ascii_lowercase().as_str() {
                    "tcp" => Some(6),
                    "udp" => Some(17),
                    "icmp" => Some(1),
                    "icmpv6" => Some(58),
                    "sctp" => Some(132),
                    "gre" => Some(47),
                    _ => None,
                },
                toml::Value::Integer(n) => u8::try_from(*n).ok(),
                _ => None,
            };
            let p = p.ok_or_else(|| {
                self.invalid(
                    Some(v.span()),
                    format!(
                        "conntrack.filter.protocols: {}: a protocol name (tcp, udp, icmp, icmpv6, sctp, gre) or number 0..=255",
                        v.get_ref()
                    ),
                )
            })?;
            filter.protocols.push(p);
        }
        let prefixes = |key: &str, list: &Option<Vec<Spanned<String>>>| -> Result<Vec<Prefix>, ConfigError> {
            list.iter()
                .flatten()
                .map(|v| {
                    v.get_ref()
                        .parse::<Prefix>()
                        .map_err(|e| self.invalid(Some(v.span()), format!("conntrack.filter.{key}: {e}")))
                })
                .collect()
        };
        filter.addresses = prefixes("addresses", &f.addresses)?;
        filter.ignore_addresses = prefixes("ignore_addresses", &f.ignore_addresses)?;
        let ranges = |key: &str, list: &Option<Vec<Spanned<toml::Value>>>| -> Result<Vec<(u16, u16)>, ConfigError> {
            list.iter()
                .flatten()
                .map(|v| {
                    let r = match v.get_ref() {
                        toml::Value::Integer(n) => u16::try_from(*n).ok().map(|p| (p, p)),
                        toml::Value::String(s) => match s.split_once('-') {
                            Some((a, b)) => match (a.trim().parse::<u16>(), b.trim().parse::<u16>()) {
                                (Ok(a), Ok(b)) if a <= b => Some((a, b)),
                                _ => None,
                            },
                            None => s.trim().parse::<u16>().ok().map(|p| (p, p)),
                        },
                        _ => None,
                    };
                    r.ok_or_else(|| {
                        self.invalid(
                            Some(v.span()),
                            format!(
                                "conntrack.filter.{key}: {}: a port 0..=65535 or a range \"LOW-HIGH\"",
                                v.get_ref()
                            ),
                        )
                    })
                })
                .collect()
        };
        filter.ports = ranges("ports", &f.ports)?;
        filter.ignore_ports = ranges("ignore_ports", &f.ignore_ports)?;
        for v in f.tcp_states.iter().flatten() {
            let st = crate::control::parse_tcp_state(v.get_ref()).ok_or_else(|| {
                self.invalid(
                    Some(v.span()),
                    format!(
                        "conntrack.filter.tcp_states: {}: not a TCP state ({})",
                        quote(v.get_ref()),
                        crate::control::tcp_state_names()
                    ),
                )
            })?;
            filter.tcp_states.push(st);
        }
        Ok(ConntrackConfig { commit, delay: Duration::from_millis(delay_ms), filter, event_buffer_bytes })
    }

    fn device(&self, d: &RawDevice) -> Result<DeviceConfig, ConfigError> {
        let kind = match (&d.kind, &d.bdf) {
            (Some(k), Some(bdf)) if *k.get_ref() == RawKind::Vfio => {
                if !valid_bdf(bdf.get_ref()) {
                    return Err(self.invalid(
                        Some(bdf.span()),
                        format!(
                            "device.bdf = {}: not a PCI address DDDD:BB:DD.F (hex domain, bus, device \
                             up to 1f, function 0-7, such as \"0000:03:00.0\")",
                            quote(bdf.get_ref())
                        ),
                    ));
                }
                DeviceKind::Vfio { bdf: bdf.get_ref().clone() }
            }
            (Some(k), None) if *k.get_ref() == RawKind::Vfio => {
                return Err(self.invalid(
                    Some(k.span()),
                    "device.kind = \"vfio\": needs device.bdf, the PCI address of the device".to_owned(),
                ));
            }
            (_, Some(bdf)) => {
                return Err(self.invalid(
                    Some(bdf.span()),
                    format!("device.bdf = {}: only allowed with device.kind = \"vfio\"", quote(bdf.get_ref())),
                ));
            }
            (_, None) => DeviceKind::Emulated,
        };
        let table_capacity = match &d.table_capacity {
            Some(v) => {
                let value = *v.get_ref();
                match u32::try_from(value) {
                    Ok(c) if c.is_power_of_two() && (MIN_TABLE_CAPACITY..=MAX_TABLE_CAPACITY).contains(&c) => c,
                    _ => {
                        return Err(self.invalid(
                            Some(v.span()),
                            format!(
                                "device.table_capacity = {value}: must be a power of two between \
                                 {MIN_TABLE_CAPACITY} and {MAX_TABLE_CAPACITY}"
                            ),
                        ))
                    }
                }
            }
            None => DEFAULT_TABLE_CAPACITY,
        };
        let aging_period_ms = self.opt_int(
            "device.aging_period_ms",
            &d.aging_period_ms,
            0,
            i64::from(u32::MAX),
            DEFAULT_AGING_PERIOD_MS,
        )?;
        Ok(DeviceConfig { kind, table_capacity, aging_period_ms, fault_recovery: d.fault_recovery.unwrap_or(true) })
    }

    fn opt_path(&self, key: &str, v: &Option<Spanned<String>>) -> Result<Option<PathBuf>, ConfigError> {
        let Some(v) = v else { return Ok(None) };
        let path = v.get_ref();
        if path.is_empty() || path.contains('\0') {
            return Err(self.invalid(Some(v.span()), format!("{key} = {}: must be a non-empty path", quote(path))));
        }
        Ok(Some(PathBuf::from(path)))
    }

    fn control(&self, c: &RawControl) -> Result<ControlConfig, ConfigError> {
        let socket = match &c.socket {
            Some(s) => {
                let path = s.get_ref();
                let reason = if path.is_empty() {
                    Some("must not be empty".to_owned())
                } else if path.contains('\0') {
                    Some("must not contain a NUL character".to_owned())
                } else if path.len() > MAX_SOCKET_PATH_LEN {
                    Some(format!(
                        "is {} bytes long; a UNIX socket path holds at most {MAX_SOCKET_PATH_LEN}",
                        path.len()
                    ))
                } else {
                    None
                };
                if let Some(reason) = reason {
                    return Err(self.invalid(Some(s.span()), format!("control.socket = {}: {reason}", quote(path))));
                }
                PathBuf::from(path)
            }
            None => PathBuf::from(DEFAULT_CONTROL_SOCKET),
        };
        let socket_mode = match &c.socket_mode {
            Some(v) => {
                let mode = match v.get_ref() {
                    toml::Value::String(s) => parse_octal_mode(s).ok_or_else(|| {
                        format!("control.socket_mode = {}: must be an octal string no greater than \"0777\"", quote(s))
                    }),
                    other => Err(format!(
                        "control.socket_mode = {other}: must be an octal string such as \"0600\", in quotes"
                    )),
                };
                mode.map_err(|reason| self.invalid(Some(v.span()), reason))?
            }
            None => DEFAULT_SOCKET_MODE,
        };
        let mut allow_uids = Vec::new();
        for uid in c.allow_uids.iter().flatten() {
            // u32::MAX is (uid_t)-1, "no uid".
            allow_uids.push(self.int("control.allow_uids", uid, 0, i64::from(u32::MAX) - 1)?);
        }
        Ok(ControlConfig { socket, socket_mode, allow_uids })
    }

    fn peers(
        &self,
        raw: &[Spanned<RawPeer>],
        member_id: u16,
        locals: &[&Bind],
    ) -> Result<Vec<PeerConfig>, ConfigError> {
        let mut peers: Vec<PeerConfig> = Vec::with_capacity(raw.len());
        // Span of each accepted peer's id, for duplicate messages.
        let mut id_spans: Vec<Range<usize>> = Vec::with_capacity(raw.len());
        for (i, p) in raw.iter().enumerate() {
            if i == MAX_PEERS {
                return Err(self.invalid(
                    Some(p.span()),
                    format!("peer[{i}]: at most {MAX_PEERS} peers (the membership protocol's limit)"),
                ));
            }
            let p = p.get_ref();
            let key = |field: &str| format!("peer[{i}].{field}");
            let id: u16 = self.int(&key("id"), &p.id, 1, i64::from(u16::MAX))?;
            if id == member_id {
                return Err(self.invalid(Some(p.id.span()), format!("{} = {id}: same as member_id", key("id"))));
            }
            if let Some(j) = peers.iter().position(|q| q.id == id) {
                let line = self.line_col(id_spans[j].start).0;
                return Err(self.invalid(
                    Some(p.id.span()),
                    format!("{} = {id}: duplicate of peer[{j}].id (line {line})", key("id")),
                ));
            }
            let sync = self.remote(&key("sync"), &p.sync)?;
            let membership = self.remote(&key("membership"), &p.membership)?;
            let mut full_sync = Vec::new();
            match p.full_sync.get_ref() {
                AddrList::One(s) => {
                    full_sync.push(self.remote(&key("full_sync"), &Spanned::new(p.full_sync.span(), s.clone()))?);
                }
                AddrList::Many(list) => {
                    for s in list {
                        full_sync.push(self.remote(&key("full_sync"), s)?);
                    }
                }
            }
            if full_sync.is_empty() {
                return Err(self.invalid(
                    Some(p.full_sync.span()),
                    format!("{} = []: needs at least one address", key("full_sync")),
                ));
            }
            // A peer at one of this member's own addresses is this member.
            let own = [(locals[0], &p.sync, sync), (locals[1], &p.membership, membership)];
            for (local, v, addr) in own {
                if local.addr == addr {
                    return Err(self.invalid(
                        Some(v.span()),
                        format!("{} = \"{addr}\": this member's own {}", key(field_of(local.key)), local.key),
                    ));
                }
            }
            // A socket bound to a loopback address reaches nothing else: the
            // member would hear nobody and go Active alone, its sends
            // failing.
            let reaches = [(locals[0], p.sync.span(), sync), (locals[1], p.membership.span(), membership)]
                .into_iter()
                .chain(full_sync.iter().map(|a| (locals[2], p.full_sync.span(), *a)));
            for (local, span, addr) in reaches {
                if local.addr.ip().is_loopback() && !addr.ip().is_loopback() {
                    return Err(self.invalid(
                        Some(span),
                        format!(
                            "{} = \"{addr}\": not reachable from this member's {} \"{}\", a loopback address",
                            key(field_of(local.key)),
                            local.key,
                            local.addr
                        ),
                    ));
                }
            }
            if full_sync.contains(&locals[2].addr) {
                return Err(self.invalid(
                    Some(p.full_sync.span()),
                    format!(
                        "{}: contains \"{}\", this member's own {}",
                        key("full_sync"),
                        locals[2].addr,
                        locals[2].key
                    ),
                ));
            }
            // Two peers at the same address cannot both be right.
            for (j, q) in peers.iter().enumerate() {
                let clash = if q.sync == sync {
                    Some(("sync", &p.sync, sync))
                } else if q.membership == membership {
                    Some(("membership", &p.membership, membership))
                } else {
                    None
                };
                if let Some((field, v, addr)) = clash {
                    return Err(
                        self.invalid(Some(v.span()), format!("{} = \"{addr}\": same as peer[{j}].{field}", key(field)))
                    );
                }
            }
            id_spans.push(p.id.span());
            peers.push(PeerConfig { id, sync, membership, full_sync });
        }
        Ok(peers)
    }
}

/// The key of the array of tables `[[peer]]`.
const PEER: &str = "peer";

/// One step of a key path in the document.
enum Seg<'a> {
    /// A key of a table.
    Key(&'a str),
    /// An element of an array; `header` is the span of its `[[...]]`
    /// header when the array is an array of tables.
    Index { index: usize, header: Option<Range<usize>> },
}

/// Finds the value whose span (or whose key's span) is `at`, the deepest
/// one where several share it (an array of tables and its first table),
/// and leaves the keys and indices that lead to it in `path`.
fn locate<'a, 'i>(
    text: &str,
    table: &'a DeTable<'i>,
    at: &Range<usize>,
    path: &mut Vec<Seg<'a>>,
) -> Option<&'a Spanned<DeValue<'i>>> {
    for (key, value) in table.iter() {
        path.push(Seg::Key(key.get_ref().as_ref()));
        if let Some(found) = locate_in(text, value, at, path) {
            return Some(found);
        }
        if key.span() == *at {
            return Some(value);
        }
        path.pop();
    }
    None
}

fn locate_in<'a, 'i>(
    text: &str,
    value: &'a Spanned<DeValue<'i>>,
    at: &Range<usize>,
    path: &mut Vec<Seg<'a>>,
) -> Option<&'a Spanned<DeValue<'i>>> {
    match value.get_ref() {
        DeValue::Table(table) => {
            if let Some(found) = locate(text, table, at, path) {
                return Some(found);
            }
        }
        DeValue::Array(items) => {
            let of_tables = array_of_tables(value);
            for (index, item) in items.iter().enumerate() {
                let header =
                    of_tables.then(|| item.span()).filter(|s| text.get(s.clone()).is_some_and(|t| t.starts_with("[[")));
                path.push(Seg::Index { index, header });
                if let Some(found) = locate_in(text, item, at, path) {
                    return Some(found);
                }
                path.pop();
            }
        }
        _ => {}
    }
    (value.span() == *at).then_some(value)
}

/// Whether `value` is an array of tables written with `[[...]]` headers:
/// its span is its first table's header.
fn array_of_tables(value: &Spanned<DeValue<'_>>) -> bool {
    match value.get_ref() {
        DeValue::Array(items) => {
            items.first().is_some_and(|first| first.span() == value.span() && first.get_ref().is_table())
        }
        _ => false,
    }
}

/// `device.fault_recovery`, `peer[1]`, `peer[0].full_sync`: keys joined by
/// dots, with the index of each array element the path goes through; an
/// index at the end is written only with `last_index` (a value in an array
/// is named by its key, as the other errors do: `control.allow_uids = -1`).
fn key_path(path: &[Seg<'_>], last_index: bool) -> String {
    let mut out = String::new();
    for (i, seg) in path.iter().enumerate() {
        match seg {
            Seg::Key(key) => {
                if !out.is_empty() {
                    out.push('.');
                }
                if !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                    out.push_str(key);
                } else {
                    out.push_str(&quote(key));
                }
            }
            Seg::Index { index, .. } if last_index || i + 1 < path.len() => {
                let _ = write!(out, "[{index}]");
            }
            Seg::Index { .. } => {}
        }
    }
    out
}

/// The TOML type of a value, with its article.
fn type_name(value: &DeValue<'_>) -> &'static str {
    match value {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a date-time",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

/// serde's words for types as TOML's: `i64` → `an integer`, `f64` → `a
/// float`, `struct RawPeer` → `a table`, `a sequence` → `an array`, `a map`
/// → `a table`. Names in backquotes (fields, variants) are left alone.
fn toml_words(message: &str) -> String {
    let mut out = Vec::new();
    let mut words = message.split(' ').peekable();
    // Inside `…` or "…" (a key or a value as written): left alone.
    let mut quoted = false;
    while let Some(word) = words.next() {
        let quotes = word.chars().filter(|c| matches!(c, '`' | '"')).count();
        if quoted || quotes > 0 {
            quoted ^= quotes % 2 == 1;
            out.push(word.to_owned());
            continue;
        }
        let core = word.trim_end_matches([',', ';', ':', ')']);
        let tail = &word[core.len()..];
        let plain = match core {
            "i8" | "i16" | "i32" | "i64" | "i128" | "isize" | "u8" | "u16" | "u32" | "u64" | "u128" | "usize" => {
                Some("an integer")
            }
            "f32" | "f64" => Some("a float"),
            "struct" if words.peek().is_some() => {
                // `struct RawPeer` (and its punctuation).
                let name = words.next().unwrap_or_default();
                let name_core = name.trim_end_matches([',', ';', ':', ')']);
                out.push(format!("a table{}", &name[name_core.len()..]));
                continue;
            }
            "a" | "an" => match words.peek().map(|w| w.trim_end_matches([',', ';', ':', ')'])) {
                Some(next @ ("sequence" | "map")) => {
                    let next_word = words.next().unwrap_or_default();
                    let rest = &next_word[next.len()..];
                    out.push(format!("{}{rest}", if next == "sequence" { "an array" } else { "a table" }));
                    continue;
                }
                _ => None,
            },
            "sequence" => Some("array"),
            "map" => Some("table"),
            _ => None,
        };
        match plain {
            Some(p) => out.push(format!("{p}{tail}")),
            None => out.push(word.to_owned()),
        }
    }
    out.join(" ")
}

/// `sync.bind` → `sync`.
fn field_of(key: &str) -> &str {
    key.split('.').next().unwrap_or(key)
}

/// Whether two local UDP binds would collide: same port, and the same IP or
/// a wildcard covering the other (`[::]` is dual-stack on Linux).
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() != b.port() || a.port() == 0 {
        return false;
    }
    let covers = |x: SocketAddr, y: SocketAddr| x.ip().is_unspecified() && (x.is_ipv6() || y.is_ipv4());
    a.ip() == b.ip() || covers(a, b) || covers(b, a)
}

/// `DDDD:BB:DD.F`: hex domain (4 digits), bus (2), device (2, at most
/// 0x1f), function (one digit, 0-7).
fn valid_bdf(s: &str) -> bool {
    let hex = |part: &str, len: usize| part.len() == len && part.chars().all(|c| c.is_ascii_hexdigit());
    let mut parts = s.split(':');
    let (Some(domain), Some(bus), Some(devfn), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let Some((dev, func)) = devfn.split_once('.') else {
        return false;
    };
    hex(domain, 4)
        && hex(bus, 2)
        && hex(dev, 2)
        && u8::from_str_radix(dev, 16).is_ok_and(|d| d <= 0x1f)
        && func.len() == 1
        && func.chars().all(|c| ('0'..='7').contains(&c))
}

/// `"0600"`, `"600"` or `"0o600"`: octal digits only, at most `0o777`.
fn parse_octal_mode(s: &str) -> Option<u32> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    if digits.is_empty() || digits.len() > 4 || !digits.chars().all(|c| ('0'..='7').contains(&c)) {
        return None;
    }
    u32::from_str_radix(digits, 8).ok().filter(|m| *m <= 0o777)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("member.toml"))
    }

    /// The error of `text`, displayed.
    fn error(text: &str) -> String {
        match parse(text) {
            Ok(c) => panic!("accepted: {c:?}\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    /// `text` is rejected at `line`, with a message that names `key`.
    fn rejects(text: &str, line: usize, key: &str) {
        let e = error(text);
        assert!(e.starts_with(&format!("member.toml:{line}: ")), "wrong line (want {line}): {e}");
        assert!(e.contains(key), "does not name {key}: {e}");
    }

    const MINIMAL: &str = "member_id = 1\ncluster_id = 1\n";

    const FULL: &str = r#"# member 1 of a two-member cluster
member_id = 1
cluster_id = 7
mode = "load-sharing"
nice = -20

[device]
kind = "vfio"
bdf = "0000:03:00.0"
table_capacity = 65536
aging_period_ms = 0

[sync]
bind = "192.0.2.1:8116"

[membership]
bind = "192.0.2.1:8117"
probe_interval_ms = 20
dead_after = 3

[full_sync]
bind = "[::]:8118"
chunk_records = 4096
timeout_ms = 5000

[control]
socket = "/tmp/nicsync test \"1\".sock"
socket_mode = "0660"
allow_uids = [1000, 1001]

[[peer]]
id = 2
sync = "192.0.2.2:8116"
membership = "192.0.2.2:8117"
full_sync = ["192.0.2.2:8118", "[2001:db8::2]:8118"]

[[peer]]
id = 3
sync = "192.0.2.3:8116"
membership = "192.0.2.3:8117"
full_sync = "192.0.2.3:8118"
"#;

    #[test]
    fn defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.member_id, 1);
        assert_eq!(c.cluster_id, 1);
        assert_eq!(c.mode, ClusterMode::HighAvailability);
        assert_eq!(c.device.kind, DeviceKind::Emulated);
        assert_eq!(c.device.table_capacity, 1_048_576);
        assert_eq!(c.device.aging_period_ms, 1000);
        assert_eq!(c.sync.bind, "0.0.0.0:8116".parse().unwrap());
        assert_eq!(c.membership.bind, "0.0.0.0:8117".parse().unwrap());
        assert_eq!(c.membership.probe_interval, Duration::from_millis(10));
        assert_eq!(c.membership.dead_after, 5);
        assert_eq!(c.full_sync.bind, "0.0.0.0:8118".parse().unwrap());
        assert_eq!(c.full_sync.chunk_records, 32768);
        assert_eq!(c.full_sync.timeout, Duration::from_millis(2000));
        assert_eq!(c.control.socket, PathBuf::from("/run/nicsync/nicsync.sock"));
        assert_eq!(c.control.socket_mode, 0o600);
        assert!(c.control.allow_uids.is_empty());
        assert!(c.peers.is_empty());
        // Empty tables are the same as absent ones.
        let c2 = parse(&format!("{MINIMAL}[device]\n[sync]\n[membership]\n[full_sync]\n[control]\n")).unwrap();
        assert_eq!(c2, Config::default());
    }

    #[test]
    fn full_example_parses() {
        let c = parse(FULL).unwrap();
        assert_eq!(c.member_id, 1);
        assert_eq!(c.cluster_id, 7);
        assert_eq!(c.mode, ClusterMode::LoadSharing);
        assert_eq!(c.device.kind, DeviceKind::Vfio { bdf: "0000:03:00.0".into() });
        assert_eq!(c.device.table_capacity, 65536);
        assert_eq!(c.device.aging_period_ms, 0);
        assert_eq!(c.sync.bind, "192.0.2.1:8116".parse().unwrap());
        assert_eq!(c.membership.bind, "192.0.2.1:8117".parse().unwrap());
        assert_eq!(c.membership.probe_interval, Duration::from_millis(20));
        assert_eq!(c.membership.dead_after, 3);
        assert_eq!(c.full_sync.bind, "[::]:8118".parse().unwrap());
        assert_eq!(c.full_sync.chunk_records, 4096);
        assert_eq!(c.full_sync.timeout, Duration::from_secs(5));
        assert_eq!(c.control.socket, PathBuf::from("/tmp/nicsync test \"1\".sock"));
        assert_eq!(c.control.socket_mode, 0o660);
        assert_eq!(c.control.allow_uids, vec![1000, 1001]);
        assert_eq!(c.peers.len(), 2);
        assert_eq!(c.peers[0].id, 2);
        assert_eq!(c.peers[0].sync, "192.0.2.2:8116".parse().unwrap());
        assert_eq!(c.peers[0].membership, "192.0.2.2:8117".parse().unwrap());
        assert_eq!(
            c.peers[0].full_sync,
            vec!["192.0.2.2:8118".parse().unwrap(), "[2001:db8::2]:8118".parse().unwrap()]
        );
        // A single string is a one-element list.
        assert_eq!(c.peers[1].full_sync, vec!["192.0.2.3:8118".parse().unwrap()]);
    }

    /// docs/config.md's complete example parses, and writes out every
    /// table a daemon needs (a key file, since encryption is on by default).
    #[test]
    fn docs_complete_example_parses() {
        let docs = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/config.md")).unwrap();
        let section = docs.split("## Complete example").nth(1).unwrap();
        let toml = section.split("```toml\n").nth(1).and_then(|s| s.split("```").next()).unwrap();
        let c = parse(toml).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((c.member_id, c.peers.len()), (1, 2));
        assert!(c.security.encryption && c.security.key_file.is_some(), "{:?}", c.security);
        assert!(matches!(c.device.kind, DeviceKind::Vfio { .. }), "{:?}", c.device.kind);
    }

    #[test]
    fn example_cluster_files_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/cluster");
        let mut configs = Vec::new();
        for n in 1..=3u16 {
            let path = dir.join(format!("member{n}.toml"));
            let c = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(c.member_id, n);
            let base = 18116 + n * 10;
            assert_eq!(c.sync.bind, SocketAddr::from(([127, 0, 0, 1], base)));
            assert_eq!(c.membership.bind, SocketAddr::from(([127, 0, 0, 1], base + 1)));
            assert_eq!(c.full_sync.bind, SocketAddr::from(([127, 0, 0, 1], base + 2)));
            assert_eq!(c.control.socket, PathBuf::from(format!("/tmp/nicsync-member{n}.sock")));
            assert_eq!(c.device.table_capacity, 1_048_576);
            assert_eq!(c.peers.len(), 2);
            configs.push(c);
        }
        // Each member's peers are the other two, at their own addresses.
        for c in &configs {
            assert!(configs.iter().all(|o| o.cluster_id == c.cluster_id && o.mode == c.mode));
            for p in &c.peers {
                let other = configs.iter().find(|o| o.member_id == p.id).unwrap();
                assert_ne!(other.member_id, c.member_id);
                assert_eq!(p.sync, other.sync.bind);
                assert_eq!(p.membership, other.membership.bind);
                assert_eq!(p.full_sync, vec![other.full_sync.bind]);
            }
        }
    }

    #[test]
    fn docs_examples_parse() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/config.md");
        let doc = std::fs::read_to_string(&path).unwrap();
        let blocks: Vec<&str> = doc.split("```toml\n").skip(1).map(|b| b.split("```").next().unwrap()).collect();
        assert_eq!(blocks.len(), 2, "docs/config.md: a complete and a minimal example");
        let full = parse(blocks[0]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(full.peers.len(), 2);
        assert_eq!(full.device.kind, DeviceKind::Vfio { bdf: "0000:03:00.0".into() });
        assert_eq!(parse(blocks[1]).unwrap(), Config::default());
    }

    #[test]
    fn load_reports_missing_file() {
        let e = Config::load(Path::new("/nonexistent/nicsync.toml")).unwrap_err();
        assert!(matches!(e, ConfigError::Io { .. }));
        assert!(e.to_string().starts_with("/nonexistent/nicsync.toml: cannot read: "), "{e}");
    }

    #[test]
    fn nice_is_a_nice_value() {
        assert_eq!(parse(FULL).unwrap().nice, Some(-20));
        assert_eq!(parse(MINIMAL).unwrap().nice, None);
        assert_eq!(parse("member_id = 1\ncluster_id = 1\nnice = 19\n").unwrap().nice, Some(19));
        rejects("member_id = 1\ncluster_id = 1\nnice = -21\n", 3, "nice = -21: must be between -20 and 19");
        rejects("member_id = 1\ncluster_id = 1\nnice = 20\n", 3, "nice");
    }

    #[test]
    fn round_trip() {
        for text in [MINIMAL, FULL] {
            let c = parse(text).unwrap();
            let written = c.to_toml();
            let back = parse(&written).unwrap_or_else(|e| panic!("{e}\n{written}"));
            assert_eq!(back, c, "{written}");
            assert_eq!(back.to_toml(), written);
        }
        let mut c = Config::default();
        c.peers.push(PeerConfig {
            id: 9,
            sync: "10.0.0.9:8116".parse().unwrap(),
            membership: "10.0.0.9:8117".parse().unwrap(),
            full_sync: vec!["10.0.0.9:8118".parse().unwrap()],
        });
        assert_eq!(parse(&c.to_toml()).unwrap(), c);
    }

    const CONNTRACK: &str = r#"member_id = 1
cluster_id = 1
source = "conntrack"

[conntrack]
commit = "always"
delay_ms = 3000
event_buffer_bytes = 1048576

[conntrack.filter]
protocols = ["tcp", 17]
addresses = ["10.0.0.0/8", "2001:db8::1"]
ignore_addresses = ["10.9.0.0/16"]
ports = [443, "8000-8099"]
ignore_ports = ["22"]
tcp_states = ["established", "fin_wait"]
"#;

    #[test]
    fn conntrack_source_with_filter_and_delay() {
        let c = parse(CONNTRACK).unwrap();
        assert_eq!(c.source, TableSource::Conntrack);
        let ct = &c.conntrack;
        assert_eq!((ct.commit, ct.delay, ct.event_buffer_bytes), (CommitMode::Always, Duration::from_secs(3), 1 << 20));
        let f = &ct.filter;
        assert_eq!(f.protocols, vec![6, 17]);
        assert_eq!(f.addresses[1], Prefix { addr: "2001:db8::1".parse().unwrap(), len: 128 });
        assert_eq!(f.ignore_addresses, vec![Prefix { addr: "10.9.0.0".parse().unwrap(), len: 16 }]);
        assert_eq!((f.ports.clone(), f.ignore_ports.clone()), (vec![(443, 443), (8000, 8099)], vec![(22, 22)]));
        assert_eq!(f.tcp_states.len(), 2);
        let written = c.to_toml();
        assert_eq!(parse(&written).unwrap_or_else(|e| panic!("{e}\n{written}")), c);
        // Defaults.
        let c = parse("member_id = 1\ncluster_id = 1\nsource = \"conntrack\"\n").unwrap();
        assert_eq!(c.conntrack, ConntrackConfig::default());
        assert_eq!(parse(MINIMAL).unwrap().source, TableSource::Control);
    }

    #[test]
    fn conntrack_errors_name_the_key_and_line() {
        let base = "member_id = 1\ncluster_id = 1\nsource = \"conntrack\"\n";
        rejects("member_id = 1\ncluster_id = 1\nsource = \"kernel\"\n", 3, "source");
        rejects("member_id = 1\ncluster_id = 1\n[conntrack]\ndelay_ms = 5\n", 3, "source = \"conntrack\"");
        rejects(&format!("{base}[conntrack]\ncommit = \"later\"\n"), 5, "conntrack.commit");
        rejects(&format!("{base}[conntrack]\ndelay_ms = -1\n"), 5, "conntrack.delay_ms");
        rejects(&format!("{base}[conntrack.filter]\naddresses = [\"10.0.0.0/40\"]\n"), 5, "conntrack.filter.addresses");
        rejects(&format!("{base}[conntrack.filter]\nports = [\"90-80\"]\n"), 5, "conntrack.filter.ports");
        rejects(&format!("{base}[conntrack.filter]\nprotocols = [\"tpc\"]\n"), 5, "conntrack.filter.protocols");
        rejects(&format!("{base}[conntrack.filter]\ntcp_states = [\"open\"]\n"), 5, "conntrack.filter.tcp_states");
        rejects(&format!("{base}[conntrack.filter]\nstates = []\n"), 5, "unknown field");
    }

    #[test]
    fn unknown_keys_rejected_with_line() {
        rejects(&format!("{MINIMAL}colour = 1\n"), 3, "colour");
        rejects(&format!("{MINIMAL}[membership]\nbind = \"0.0.0.0:9000\"\nprobe_interval = 5\n"), 5, "probe_interval");
        rejects(&format!("{MINIMAL}[gossip]\nport = 1\n"), 3, "gossip");
        rejects(&format!("{FULL}extra = true\n"), 42, "extra");
        rejects(&format!("{MINIMAL}[control]\nallow_gids = []\n"), 4, "allow_gids");
    }

    #[test]
    fn syntax_error_reports_line_and_column() {
        let e = parse(&format!("{MINIMAL}[membership\ndead_after = 3\n")).unwrap_err();
        match &e {
            ConfigError::Syntax { line, column, .. } => {
                assert_eq!(*line, 3);
                assert_eq!(*column, 12);
            }
            other => panic!("{other:?}"),
        }
        assert!(e.to_string().starts_with("member.toml:3:12: "), "{e}");
        let e = error("member_id = 1\ncluster_id = \n");
        assert!(e.starts_with("member.toml:2:"), "{e}");
        // A key given twice is a TOML error too.
        let e = error("member_id = 1\ncluster_id = 1\nmember_id = 2\n");
        assert!(e.starts_with("member.toml:3:1: "), "{e}");
        assert!(e.contains("member_id"), "{e}");
    }

    #[test]
    fn wrong_types_rejected_with_line() {
        rejects("member_id = \"one\"\ncluster_id = 1\n", 1, "string");
        rejects(&format!("{MINIMAL}mode = \"active\"\n"), 3, "load-sharing");
        rejects(&format!("{MINIMAL}[device]\nkind = \"pcie\"\n"), 4, "vfio");
        rejects(
            &format!(
                "{MINIMAL}[[peer]]\nid = 2\nsync = \"127.0.0.1:1\"\nmembership = \"127.0.0.1:2\"\nfull_sync = 3\n"
            ),
            7,
            "address",
        );
    }

    #[test]
    fn required_keys() {
        let e = error("cluster_id = 1\n");
        assert_eq!(e, "member.toml: missing field `member_id`");
        let e = error("member_id = 1\n");
        assert!(e.contains("cluster_id"), "{e}");
        let e = error(&format!("{MINIMAL}\n[[peer]]\nid = 2\nsync = \"127.0.0.1:1\"\nmembership = \"127.0.0.1:2\"\n"));
        assert!(e.contains("full_sync"), "{e}");
        assert!(e.starts_with("member.toml"), "{e}");
    }

    #[test]
    fn ids_must_be_non_zero() {
        rejects("member_id = 0\ncluster_id = 1\n", 1, "member_id = 0");
        rejects("member_id = 1\ncluster_id = 0\n", 2, "cluster_id = 0");
        rejects("member_id = 65536\ncluster_id = 1\n", 1, "member_id = 65536");
        rejects("member_id = 1\ncluster_id = -3\n", 2, "cluster_id");
        let ok = parse("member_id = 65535\ncluster_id = 65535\n").unwrap();
        assert_eq!((ok.member_id, ok.cluster_id), (65535, 65535));
    }

    fn peer(id: &str, n: u16) -> String {
        format!(
            "\n[[peer]]\nid = {id}\nsync = \"10.0.0.{n}:8116\"\nmembership = \"10.0.0.{n}:8117\"\nfull_sync = \"10.0.0.{n}:8118\"\n"
        )
    }

    #[test]
    fn peer_ids() {
        // Line 5 is the first peer's id, line 11 the second's.
        rejects(&format!("{MINIMAL}{}", peer("0", 2)), 5, "peer[0].id = 0");
        rejects(&format!("{MINIMAL}{}", peer("1", 2)), 5, "same as member_id");
        let e = error(&format!("{MINIMAL}{}{}", peer("2", 2), peer("2", 3)));
        assert!(e.starts_with("member.toml:11: peer[1].id = 2: duplicate of peer[0].id (line 5)"), "{e}");
        assert_eq!(parse(&format!("{MINIMAL}{}{}", peer("2", 2), peer("3", 3))).unwrap().peers.len(), 2);
    }

    /// A member bound to loopback reaches no peer elsewhere: refused at
    /// load, naming the peer's address and the bind (it used to start, hear
    /// nobody and go Active alone, its sends failing with EINVAL).
    #[test]
    fn a_loopback_bind_cannot_reach_a_peer_elsewhere() {
        let lo = "[sync]\nbind = \"127.0.0.1:8116\"\n";
        let e = error(&format!("{MINIMAL}{lo}{}", peer("2", 2)));
        assert_eq!(
            e,
            "member.toml:8: peer[0].sync = \"10.0.0.2:8116\": not reachable from this member's sync.bind \
             \"127.0.0.1:8116\", a loopback address"
        );
        let local_peer =
            "\n[[peer]]\nid = 2\nsync = \"127.0.0.2:8116\"\nmembership = \"10.0.0.2:8117\"\nfull_sync = \"10.0.0.2:8118\"\n";
        assert!(parse(&format!("{MINIMAL}{lo}{local_peer}")).is_ok());
    }

    #[test]
    fn addresses_must_parse() {
        rejects(&format!("{MINIMAL}[sync]\nbind = \"localhost:8116\"\n"), 4, "sync.bind");
        rejects(&format!("{MINIMAL}[membership]\nbind = \"0.0.0.0\"\n"), 4, "membership.bind");
        rejects(&format!("{MINIMAL}[full_sync]\nbind = \"0.0.0.0:70000\"\n"), 4, "full_sync.bind");
        let p = "\n[[peer]]\nid = 2\nsync = \"10.0.0.2:8116\"\nmembership = \"10.0.0.2:8117\"\n";
        rejects(&format!("{MINIMAL}{p}full_sync = \"10.0.0.2\"\n"), 8, "peer[0].full_sync");
        rejects(
            &format!("{MINIMAL}{p}full_sync = [\n  \"10.0.0.2:8118\",\n  \"nope\",\n]\n"),
            10,
            "peer[0].full_sync = \"nope\"",
        );
        rejects(&format!("{MINIMAL}{p}full_sync = []\n"), 8, "at least one");
        rejects(&format!("{MINIMAL}{p}full_sync = \"0.0.0.0:8118\"\n"), 8, "specific IP");
        rejects(&format!("{MINIMAL}{p}full_sync = \"10.0.0.2:0\"\n"), 8, "non-zero port");
        let bad_sync = "\n[[peer]]\nid = 2\nsync = \"10.0.0.2:x\"\nmembership = \"10.0.0.2:8117\"\nfull_sync = \"10.0.0.2:8118\"\n";
        rejects(&format!("{MINIMAL}{bad_sync}"), 6, "peer[0].sync");
        let bad_m = "\n[[peer]]\nid = 2\nsync = \"10.0.0.2:8116\"\nmembership = \"2\"\nfull_sync = \"10.0.0.2:8118\"\n";
        rejects(&format!("{MINIMAL}{bad_m}"), 7, "peer[0].membership");
    }

    #[test]
    fn peer_addresses_distinct() {
        // Same sync address as the first peer.
        let p3 = "\n[[peer]]\nid = 3\nsync = \"10.0.0.2:8116\"\nmembership = \"10.0.0.3:8117\"\nfull_sync = \"10.0.0.3:8118\"\n";
        rejects(&format!("{MINIMAL}{}{p3}", peer("2", 2)), 12, "peer[1].sync");
        // A peer at this member's own address.
        let binds = "[sync]\nbind = \"127.0.0.1:9116\"\n";
        let me = "\n[[peer]]\nid = 2\nsync = \"127.0.0.1:9116\"\nmembership = \"127.0.0.1:9117\"\nfull_sync = \"127.0.0.1:9118\"\n";
        rejects(&format!("{MINIMAL}{binds}{me}"), 8, "own sync.bind");
    }

    #[test]
    fn table_capacity_rules() {
        for bad in ["0", "8", "1000", "33554432", "-16", "4294967296"] {
            rejects(&format!("{MINIMAL}[device]\ntable_capacity = {bad}\n"), 4, "device.table_capacity");
        }
        for good in [16u32, 1024, 16_777_216] {
            let c = parse(&format!("{MINIMAL}[device]\ntable_capacity = {good}\n")).unwrap();
            assert_eq!(c.device.table_capacity, good);
        }
    }

    #[test]
    fn aging_period_rules() {
        rejects(&format!("{MINIMAL}[device]\naging_period_ms = -1\n"), 4, "device.aging_period_ms");
        assert_eq!(parse(&format!("{MINIMAL}[device]\naging_period_ms = 0\n")).unwrap().device.aging_period_ms, 0);
    }

    #[test]
    fn device_kind_and_bdf() {
        rejects(&format!("{MINIMAL}[device]\nkind = \"vfio\"\n"), 4, "device.bdf");
        rejects(&format!("{MINIMAL}[device]\nbdf = \"0000:03:00.0\"\n"), 4, "device.bdf");
        rejects(&format!("{MINIMAL}[device]\nkind = \"emulated\"\nbdf = \"0000:03:00.0\"\n"), 5, "device.bdf");
        for bad in
            ["03:00.0", "0000:03:00", "0000:3:00.0", "0000:03:20.0", "0000:03:00.8", "000g:03:00.0", "0000:03:00.0:1"]
        {
            rejects(&format!("{MINIMAL}[device]\nkind = \"vfio\"\nbdf = \"{bad}\"\n"), 5, "device.bdf");
        }
        let c = parse(&format!("{MINIMAL}[device]\nkind = \"vfio\"\nbdf = \"abcd:ef:1f.7\"\n")).unwrap();
        assert_eq!(c.device.kind, DeviceKind::Vfio { bdf: "abcd:ef:1f.7".into() });
    }

    #[test]
    fn membership_rules() {
        let m = |k: &str| format!("{MINIMAL}[membership]\n{k}\n");
        rejects(&m("probe_interval_ms = 0"), 4, "membership.probe_interval_ms = 0");
        rejects(&m("probe_interval_ms = 10001"), 4, "membership.probe_interval_ms = 10001");
        let e = error(&format!("{MINIMAL}\n\n\n[membership]\ndead_after = 1\n"));
        assert_eq!(e, "member.toml:7: membership.dead_after = 1: must be at least 2");
        assert_eq!(parse(&m("dead_after = 2")).unwrap().membership.dead_after, 2);
        assert_eq!(parse(&m("probe_interval_ms = 10000")).unwrap().membership.probe_interval, Duration::from_secs(10));
    }

    #[test]
    fn sync_rules() {
        let y = |k: &str| format!("{MINIMAL}[sync]\n{k}\n");
        assert_eq!(parse(MINIMAL).unwrap().sync.stop_drain, DEFAULT_STOP_DRAIN);
        rejects(&y("stop_drain_ms = -1"), 4, "sync.stop_drain_ms = -1");
        rejects(&y("stop_drain_ms = 60001"), 4, "sync.stop_drain_ms = 60001");
        assert_eq!(parse(&y("stop_drain_ms = 0")).unwrap().sync.stop_drain, Duration::ZERO);
        assert_eq!(parse(&y("stop_drain_ms = 60000")).unwrap().sync.stop_drain, Duration::from_secs(60));
    }

    #[test]
    fn full_sync_rules() {
        let f = |k: &str| format!("{MINIMAL}[full_sync]\n{k}\n");
        rejects(&f("chunk_records = 0"), 4, "full_sync.chunk_records = 0");
        rejects(&f("chunk_records = 65537"), 4, "full_sync.chunk_records = 65537");
        rejects(&f("timeout_ms = 0"), 4, "full_sync.timeout_ms = 0");
        rejects(&f("timeout_ms = 600001"), 4, "full_sync.timeout_ms");
        assert_eq!(parse(&f("chunk_records = 65536")).unwrap().full_sync.chunk_records, 65536);
    }

    #[test]
    fn control_rules() {
        let c = |k: &str| format!("{MINIMAL}[control]\n{k}\n");
        for bad in ["\"0800\"", "\"1777\"", "\"\"", "\"rw\"", "\"+600\"", "\"0o1000\""] {
            rejects(&c(&format!("socket_mode = {bad}")), 4, "control.socket_mode");
        }
        rejects(&c("socket_mode = 384"), 4, "control.socket_mode");
        for (good, mode) in [("\"0600\"", 0o600), ("\"660\"", 0o660), ("\"0o777\"", 0o777), ("\"0\"", 0)] {
            assert_eq!(parse(&c(&format!("socket_mode = {good}"))).unwrap().control.socket_mode, mode);
        }
        rejects(&c("socket = \"\""), 4, "control.socket");
        rejects(&c(&format!("socket = \"/tmp/{}\"", "x".repeat(110))), 4, "control.socket");
        rejects(&c("allow_uids = [0, -1]"), 4, "control.allow_uids = -1");
        rejects(&c("allow_uids = [4294967295]"), 4, "control.allow_uids");
        assert_eq!(parse(&c("allow_uids = [0, 4294967294]")).unwrap().control.allow_uids, vec![0, u32::MAX - 1]);
    }

    #[test]
    fn local_binds_must_not_conflict() {
        // Both UDP: same address, or a wildcard covering the other.
        let e =
            error(&format!("{MINIMAL}[sync]\nbind = \"127.0.0.1:9000\"\n[membership]\nbind = \"127.0.0.1:9000\"\n"));
        assert!(e.starts_with("member.toml:6: membership.bind = \"127.0.0.1:9000\": conflicts with sync.bind"), "{e}");
        assert!(e.contains("(line 4)"), "{e}");
        // Membership written first: the later key is reported.
        rejects(
            &format!("{MINIMAL}[membership]\nbind = \"0.0.0.0:9000\"\n[sync]\nbind = \"127.0.0.1:9000\"\n"),
            6,
            "sync.bind",
        );
        // Against a default.
        rejects(&format!("{MINIMAL}[membership]\nbind = \"127.0.0.1:8116\"\n"), 4, "membership.bind");
        rejects(&format!("{MINIMAL}[sync]\nbind = \"[::]:8117\"\n"), 4, "sync.bind");
        // Different IPs, ephemeral ports, or TCP vs UDP are fine.
        for ok in [
            "[sync]\nbind = \"127.0.0.1:9000\"\n[membership]\nbind = \"127.0.0.2:9000\"\n",
            "[sync]\nbind = \"127.0.0.1:0\"\n[membership]\nbind = \"0.0.0.0:0\"\n",
            "[sync]\nbind = \"127.0.0.1:9000\"\n[full_sync]\nbind = \"127.0.0.1:9000\"\n",
            "[sync]\nbind = \"[::1]:9000\"\n[membership]\nbind = \"0.0.0.0:9000\"\n",
        ] {
            parse(&format!("{MINIMAL}{ok}")).unwrap_or_else(|e| panic!("{e}"));
        }
    }

    #[test]
    fn syntax_and_invalid_variants() {
        assert!(matches!(parse("member_id = ").unwrap_err(), ConfigError::Syntax { .. }));
        assert!(matches!(
            parse("member_id = 0\ncluster_id = 1\n").unwrap_err(),
            ConfigError::Invalid { line: Some(1), .. }
        ));
    }

    #[test]
    fn type_errors_name_the_key_path() {
        let cases = [
            (
                format!("{MINIMAL}\n[device]\nfault_recovery = \"yes\"\n"),
                "member.toml:5: device.fault_recovery = \"yes\": expected a boolean, found a string",
            ),
            (
                "member_id = \"1\"\ncluster_id = 1\n".to_owned(),
                "member.toml:1: member_id = \"1\": expected an integer, found a string",
            ),
            (
                format!("{MINIMAL}[device]\ntable_capacity = 1.5\n"),
                "member.toml:4: device.table_capacity = 1.5: expected an integer, found a float",
            ),
            (format!("{MINIMAL}nice = \"x\"\n"), "member.toml:3: nice = \"x\": expected an integer, found a string"),
            (
                format!("{MINIMAL}[sync]\nbind = 8116\n"),
                "member.toml:4: sync.bind = 8116: expected a string, found an integer",
            ),
            (
                format!("{MINIMAL}sync = {{ bind = 8116 }}\n"),
                "member.toml:3: sync.bind = 8116: expected a string, found an integer",
            ),
            (
                format!("{MINIMAL}[security]\nencryption = 1\n"),
                "member.toml:4: security.encryption = 1: expected a boolean, found an integer",
            ),
            (
                format!("{MINIMAL}source = \"conntrack\"\n[conntrack]\ndelay_ms = \"x\"\n"),
                "member.toml:5: conntrack.delay_ms = \"x\": expected an integer, found a string",
            ),
            (
                format!("{MINIMAL}[conntrack.filter]\naddresses = 1\n"),
                "member.toml:4: conntrack.filter.addresses = 1: expected an array, found an integer",
            ),
            // A value in an array is named by its key, as in the other errors.
            (
                format!("{MINIMAL}[control]\nallow_uids = [\n  1,\n  \"x\",\n]\n"),
                "member.toml:6: control.allow_uids = \"x\": expected an integer, found a string",
            ),
            // A value on several lines is not repeated.
            (
                format!("{MINIMAL}[device]\nfault_recovery = [\n  1,\n]\n"),
                "member.toml:4: device.fault_recovery: expected a boolean, found an array",
            ),
            (format!("{MINIMAL}device = 3\n"), "member.toml:3: device = 3: expected a table, found an integer"),
            // Enums.
            (format!("{MINIMAL}mode = 3\n"), "member.toml:3: mode = 3: expected a string, found an integer"),
            (
                format!("{MINIMAL}mode = \"active\"\n"),
                "member.toml:3: mode = \"active\": expected `ha` or `load-sharing`",
            ),
            (
                format!("{MINIMAL}[device]\nkind = \"pcie\"\n"),
                "member.toml:4: device.kind = \"pcie\": expected `emulated` or `vfio`",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(error(&text), want, "{text}");
        }
    }

    #[test]
    fn peer_errors_name_the_peer() {
        let p = |id: u16| {
            format!("\n[[peer]]\nid = {id}\nsync = \"10.0.0.{id}:8116\"\nmembership = \"10.0.0.{id}:8117\"\n")
        };
        // The second peer (its header on line 10) lacks `membership`.
        let no_membership = "\n[[peer]]\nid = 3\nsync = \"10.0.0.3:8116\"\nfull_sync = \"10.0.0.3:8118\"\n";
        let e = error(&format!("{MINIMAL}{}full_sync = \"10.0.0.2:8118\"\n{no_membership}", p(2)));
        assert_eq!(e, "member.toml:10: peer[1]: missing field `membership`");
        let e = error(&format!("{MINIMAL}{}", p(2)));
        assert_eq!(e, "member.toml:4: peer[0]: missing field `full_sync`");
        let e = error(&format!("{MINIMAL}{}full_sync = [\"10.0.0.2:8118\", 1]\n", p(2)));
        assert_eq!(e, "member.toml:8: peer[0].full_sync = 1: expected a string, found an integer");
        let e = error(&format!("{MINIMAL}{}full_sync = 3\n", p(2)));
        assert_eq!(
            e,
            "member.toml:8: peer[0].full_sync = 3: expected an address string or an array of address strings, \
             found an integer"
        );
        // The second peer's id, on line 11.
        let quoted_id = "\n[[peer]]\nid = \"3\"\n";
        let e = error(&format!("{MINIMAL}{}full_sync = \"10.0.0.2:8118\"\n{quoted_id}", p(2)));
        assert_eq!(e, "member.toml:11: peer[1].id = \"3\": expected an integer, found a string");
        // Inline tables are peers too.
        let e = error(&format!("{MINIMAL}peer = [{{ id = 2 }}]\n"));
        assert_eq!(e, "member.toml:3: peer[0]: missing field `sync`");
        let e = error(&format!("{MINIMAL}peer = [1]\n"));
        assert_eq!(e, "member.toml:3: peer[0] = 1: expected a table, found an integer");
    }

    #[test]
    fn tables_written_with_the_wrong_brackets() {
        let peer = "id = 2\nsync = \"10.0.0.2:8116\"\nmembership = \"10.0.0.2:8117\"\nfull_sync = \"10.0.0.2:8118\"\n";
        let e = error(&format!("{MINIMAL}\n[peer]\n{peer}"));
        assert_eq!(e, "member.toml:4: peer: a single [peer] table; peers are written [[peer]], one table per peer");
        // Two of them: TOML itself refuses the second, with the same hint.
        let e = error(&format!("{MINIMAL}\n[peer]\n{peer}\n[peer]\n{peer}"));
        assert!(e.contains("duplicate key") && e.ends_with("(peers are written [[peer]], one table per peer)"), "{e}");
        // A file mode written the Unix way.
        let e = error(&format!("{MINIMAL}[control]\nsocket_mode = 0600\n"));
        assert!(e.starts_with("member.toml:4") && e.contains("write a file mode as a string"), "{e}");
        let e = error(&format!("{MINIMAL}peer = {{ id = 2 }}\n"));
        assert_eq!(e, "member.toml:3: peer = { id = 2 }: expected an array, found a table");
        let e = error(&format!("{MINIMAL}[[device]]\nkind = \"vfio\"\n"));
        assert_eq!(
            e,
            "member.toml:3: device: an array of [[device]] tables; device is a single table, written [device]"
        );
        let e = error(&format!("{MINIMAL}[[device]]\n"));
        assert_eq!(
            e,
            "member.toml:3: device: an array of [[device]] tables; device is a single table, written [device]"
        );
        // Keys that are no table at all get no such hint.
        let e = error(&format!("{MINIMAL}[[control.allow_uids]]\nx = 1\n"));
        assert_eq!(e, "member.toml:3: control.allow_uids[0]: expected an integer, found a table");
        let e = error(&format!("{MINIMAL}[[mode]]\nx = 1\n"));
        assert_eq!(e, "member.toml:3: mode[0]: expected a string, found a table");
        // A top-level key written after a table's header is in that table.
        let e = error(&format!("{MINIMAL}[sync]\nnice = 5\n"));
        assert_eq!(e, "member.toml:4: unknown field `nice` in [sync], expected `bind` or `stop_drain_ms`");
        let e = error(&format!("{MINIMAL}source = \"conntrack\"\n[[conntrack.filter]]\n"));
        assert_eq!(
            e,
            "member.toml:4: conntrack.filter: an array of [[conntrack.filter]] tables; conntrack.filter is a single \
             table, written [conntrack.filter]"
        );
    }

    #[test]
    fn documented_schema_errors_unchanged() {
        // docs/config.md, "Errors": an unknown key names itself, a missing
        // top-level key has no line.
        let e = error(&format!("{MINIMAL}\n\n\n\n[membership]\nbind = \"0.0.0.0:8117\"\ndead_afer = 3\n"));
        assert_eq!(
            e,
            "member.toml:9: unknown field `dead_afer` in [membership], expected one of `bind`, `probe_interval_ms`, \
             `dead_after`"
        );
        assert_eq!(error("cluster_id = 1\n"), "member.toml: missing field `member_id`");
    }

    #[test]
    fn rust_type_names_become_toml_words() {
        assert_eq!(
            toml_words("invalid type: string \"1\", expected i64"),
            "invalid type: string \"1\", expected an integer"
        );
        assert_eq!(toml_words("expected u16, f64 or struct RawPeer"), "expected an integer, a float or a table");
        assert_eq!(toml_words("invalid type: map, expected a sequence"), "invalid type: table, expected an array");
        assert_eq!(toml_words("expected a map"), "expected a table");
        assert_eq!(toml_words("missing field `u8`"), "missing field `u8`");
        // Quoted names and values are the user's, words and all.
        assert_eq!(toml_words("unknown field `x u8 y`, expected i64"), "unknown field `x u8 y`, expected an integer");
        assert_eq!(toml_words("string \"a map of u8\", expected u8"), "string \"a map of u8\", expected an integer");
    }

    #[test]
    fn at_most_max_peers() {
        let peers = |n: usize| -> String {
            (0..n)
                .map(|i| {
                    let id = i + 2;
                    format!(
                        "\n[[peer]]\nid = {id}\nsync = \"10.0.{i}.1:8116\"\nmembership = \"10.0.{i}.1:8117\"\n\
                         full_sync = \"10.0.{i}.1:8118\"\n"
                    )
                })
                .collect()
        };
        assert_eq!(MAX_PEERS, 64);
        assert_eq!(parse(&format!("{MINIMAL}{}", peers(MAX_PEERS))).unwrap().peers.len(), MAX_PEERS);
        // Each peer takes 6 lines after the 2 of MINIMAL; the 65th's header
        // is on line 2 + 64 * 6 + 2.
        let e = error(&format!("{MINIMAL}{}", peers(MAX_PEERS + 1)));
        assert_eq!(e, "member.toml:388: peer[64]: at most 64 peers (the membership protocol's limit)");
    }
}
