//! Cluster keys: the key file, the keyring built from it, boot numbers.
//!
//! # Key file
//!
//! A text file, readable by its owner only (mode 0600: anything else is
//! refused), one directive per line, `#` starts a comment:
//!
//! ```text
//! # nicsync cluster key file
//! send 2
//! key 1 3f9c…(64 hex digits: 32 random bytes)
//! key 2 a07e…
//! ```
//!
//! `key ID HEX` adds a key with id 1..=255; `send ID` names the key that
//! seals what this member sends. Every listed key opens what arrives, so a
//! rotation goes: add the new key to every member's file (not sending yet)
//! and reload; switch `send` to it everywhere and reload; drop the old key
//! and reload. `nicsync key` does each step (docs/security.md).
//!
//! Keys are never used directly: HKDF-SHA256 derives one AEAD key per
//! traffic class (Delta Sync frames, membership datagrams) and one per Full
//! Sync session from each cluster key, so that no two kinds of traffic ever
//! share a nonce space.

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use ring::aead::{LessSafeKey, UnboundKey, AES_256_GCM};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};

/// Bytes of a cluster key.
pub const KEY_LEN: usize = 32;
/// Keys a keyring holds at most (a rotation needs two).
pub const MAX_KEYS: usize = 8;
/// HKDF salt: binds every derived key to this protocol and version.
const HKDF_SALT: &[u8] = b"nicsync sync security v1";

/// Why a key file or keyring is refused.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file cannot be read or written.
    #[error("key file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
    /// Group or others may read or write the file.
    #[error(
        "key file {path} has mode {mode:04o}: it must be readable by its owner only (chmod 600 {path})",
        path = path.display()
    )]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Not a regular file.
    #[error("key file {0} is not a regular file")]
    NotAFile(PathBuf),
    /// The boot state file ([`next_boot`]) cannot be read or written.
    #[error(
        "boot state file {path}: {source} (security.boot_file: the daemon must be able to write it and its \
         directory; under systemd's ProtectSystem=strict, list the directory in ReadWritePaths=)",
        path = path.display()
    )]
    BootFile {
        /// The file.
        path: PathBuf,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
    /// A line that does not parse.
    #[error("{path}:{line}: {reason}", path = path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// The keys do not make a usable keyring.
    #[error("{0}")]
    Invalid(String),
    /// The system random generator failed.
    #[error("the system random number generator failed")]
    Random,
}

/// Traffic classes, each sealed with its own derived key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TrafficClass {
    /// Delta Sync frames (sealed by the device's sync port).
    Delta,
    /// Membership (CCP) datagrams (sealed by the host).
    Membership,
}

impl TrafficClass {
    fn label(self) -> &'static [u8] {
        match self {
            TrafficClass::Delta => b"delta",
            TrafficClass::Membership => b"membership",
        }
    }
}

/// One cluster key, held only as its HKDF pseudo-random key and the AEAD
/// keys derived from it.
pub struct ClusterKey {
    id: u8,
    prk: hkdf::Prk,
    delta: LessSafeKey,
    membership: LessSafeKey,
    fingerprint: [u8; 8],
    table_hash_seed: [u64; 2],
}

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterKey").field("id", &self.id).field("fingerprint", &self.fingerprint()).finish()
    }
}

/// Wraps a length for ring's HKDF expand.
struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn derive_aead(prk: &hkdf::Prk, info: &[&[u8]]) -> Result<LessSafeKey, KeyError> {
    let okm = prk.expand(info, &AES_256_GCM).map_err(|_| KeyError::Invalid("key derivation failed".into()))?;
    Ok(LessSafeKey::new(UnboundKey::from(okm)))
}

impl ClusterKey {
    /// Derives the working keys of cluster key `id` from its 32 secret bytes.
    pub fn new(id: u8, secret: &[u8; KEY_LEN]) -> Result<Self, KeyError> {
        if id == 0 {
            return Err(KeyError::Invalid("key id 0 is reserved; use 1..=255".into()));
        }
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, HKDF_SALT).extract(secret);
        let delta = derive_aead(&prk, &[TrafficClass::Delta.label()])?;
        let membership = derive_aead(&prk, &[TrafficClass::Membership.label()])?;
        let mut fingerprint = [0u8; 8];
        prk.expand(&[b"fingerprint"], Len(8))
            .and_then(|okm| okm.fill(&mut fingerprint))
            .map_err(|_| KeyError::Invalid("key derivation failed".into()))?;
        let mut seed = [0u8; 16];
        prk.expand(&[b"table hash seed"], Len(16))
            .and_then(|okm| okm.fill(&mut seed))
            .map_err(|_| KeyError::Invalid("key derivation failed".into()))?;
        let words: [zerocopy::little_endian::U64; 2] = zerocopy::transmute!(seed);
        let table_hash_seed = words.map(|w| w.get());
        Ok(ClusterKey { id, prk, delta, membership, fingerprint, table_hash_seed })
    }

    /// The key id carried in every sealed datagram.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// A public fingerprint (hex) to compare keys across members without
    /// showing them.
    pub fn fingerprint(&self) -> String {
        self.fingerprint.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The seed of the cards' table hash (ABI 1.9, `TABLE_HASH_SEED`):
    /// derived from the key, so every member that holds it seeds its card
    /// alike (a Full Sync then arrives in the receiving card's order) and
    /// no one without it can aim keys at one bucket.
    pub fn table_hash_seed(&self) -> [u64; 2] {
        self.table_hash_seed
    }

    /// The AEAD key of a traffic class.
    pub fn aead(&self, class: TrafficClass) -> &LessSafeKey {
        match class {
            TrafficClass::Delta => &self.delta,
            TrafficClass::Membership => &self.membership,
        }
    }

    /// A per-session AEAD key (Full Sync): `info` must hold what makes the
    /// session unique (both sides' random values, member ids, direction).
    pub fn session_key(&self, info: &[&[u8]]) -> Result<LessSafeKey, KeyError> {
        derive_aead(&self.prk, info)
    }
}

/// The keys a member seals and opens with.
#[derive(Debug)]
pub struct Keyring {
    keys: Vec<ClusterKey>,
    send: u8,
}

impl Keyring {
    /// A keyring of `keys`, sealing with `send`.
    pub fn new(keys: Vec<ClusterKey>, send: u8) -> Result<Self, KeyError> {
        if keys.is_empty() {
            return Err(KeyError::Invalid("no key".into()));
        }
        if keys.len() > MAX_KEYS {
            return Err(KeyError::Invalid(format!("{} keys; at most {MAX_KEYS}", keys.len())));
        }
        for (i, k) in keys.iter().enumerate() {
            if keys[..i].iter().any(|o| o.id == k.id) {
                return Err(KeyError::Invalid(format!("key id {} listed twice", k.id)));
            }
        }
        if !keys.iter().any(|k| k.id == send) {
            return Err(KeyError::Invalid(format!("the send key {send} is not listed")));
        }
        Ok(Keyring { keys, send })
    }

    /// A keyring with one fresh random key (id 1): for clusters that live in
    /// one process (`nicsync cluster`, benchmarks, the simulator).
    pub fn ephemeral() -> Result<Self, KeyError> {
        let secret = random_secret()?;
        Keyring::new(vec![ClusterKey::new(1, &secret)?], 1)
    }

    /// Reads and checks a key file (see the module docs).
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let file = KeyFile::read(path)?;
        file.keyring(path)
    }

    /// The key that seals.
    pub fn send_key(&self) -> &ClusterKey {
        // `new` guarantees the send key is listed.
        self.get(self.send).unwrap_or(&self.keys[0])
    }

    /// The key with id `id`.
    pub fn get(&self, id: u8) -> Option<&ClusterKey> {
        self.keys.iter().find(|k| k.id == id)
    }

    /// Every key.
    pub fn keys(&self) -> &[ClusterKey] {
        &self.keys
    }
}

/// A keyring shared between the host (which loads and reloads the key file)
/// and the sealers and openers that use it (the device's sync port, the
/// membership socket, Full Sync), as a key register bank is shared between
/// a driver and a crypto engine. Users keep an `Arc<Keyring>` and check
/// [`SharedKeyring::version`] (one relaxed load) to see a reload.
#[derive(Debug)]
pub struct SharedKeyring {
    current: Mutex<Arc<Keyring>>,
    version: AtomicU64,
}

impl SharedKeyring {
    /// Shares `ring`.
    pub fn new(ring: Keyring) -> Arc<Self> {
        Arc::new(SharedKeyring { current: Mutex::new(Arc::new(ring)), version: AtomicU64::new(1) })
    }

    /// The current keyring.
    pub fn get(&self) -> Arc<Keyring> {
        self.current.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Replaced on every [`SharedKeyring::replace`].
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Installs a new keyring (a reload after a rotation step).
    pub fn replace(&self, ring: Keyring) {
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = Arc::new(ring);
        self.version.fetch_add(1, Ordering::AcqRel);
    }
}

/// A keyring handle with a cached copy, refreshed when the shared one is
/// replaced.
#[derive(Debug, Clone)]
pub struct KeyringHandle {
    shared: Arc<SharedKeyring>,
    cached: Arc<Keyring>,
    version: u64,
}

impl KeyringHandle {
    /// A handle on `shared`.
    pub fn new(shared: Arc<SharedKeyring>) -> Self {
        let version = shared.version();
        let cached = shared.get();
        KeyringHandle { shared, cached, version }
    }

    /// The current keyring (refreshed if it was replaced).
    pub fn current(&mut self) -> &Keyring {
        let v = self.shared.version();
        if v != self.version {
            self.cached = self.shared.get();
            self.version = v;
        }
        &self.cached
    }
}

/// Fresh random key bytes from the operating system.
pub fn random_secret() -> Result<[u8; KEY_LEN], KeyError> {
    let mut s = [0u8; KEY_LEN];
    SystemRandom::new().fill(&mut s).map_err(|_| KeyError::Random)?;
    Ok(s)
}

/// The parsed text of a key file, which the `nicsync key` commands edit.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyFile {
    /// `(id, secret)` in file order.
    pub keys: Vec<(u8, [u8; KEY_LEN])>,
    /// The send key id.
    pub send: u8,
}

impl fmt::Debug for KeyFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<u8> = self.keys.iter().map(|k| k.0).collect();
        f.debug_struct("KeyFile").field("ids", &ids).field("send", &self.send).finish()
    }
}

fn parse_hex(s: &str) -> Option<[u8; KEY_LEN]> {
    if s.len() != 2 * KEY_LEN || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; KEY_LEN];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

impl KeyFile {
    /// Reads `path`, refusing it unless it is a regular file of mode 0600
    /// (or stricter).
    pub fn read(path: &Path) -> Result<Self, KeyError> {
        let io = |source| KeyError::Io { path: path.to_path_buf(), source };
        let meta = fs::metadata(path).map_err(io)?;
        if !meta.is_file() {
            return Err(KeyError::NotAFile(path.to_path_buf()));
        }
        let mode = meta.mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions { path: path.to_path_buf(), mode });
        }
        if meta.len() > 64 * 1024 {
            return Err(KeyError::Invalid(format!("key file {} is larger than 64 KiB", path.display())));
        }
        let text = fs::read_to_string(path).map_err(io)?;
        KeyFile::parse(&text, path)
    }

    /// Parses key file text (`path` only names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, KeyError> {
        let err = |line: usize, reason: String| KeyError::Syntax { path: path.to_path_buf(), line, reason };
        let mut keys: Vec<(u8, [u8; KEY_LEN])> = Vec::new();
        let mut send = None;
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let body = raw.split('#').next().unwrap_or("").trim();
            if body.is_empty() {
                continue;
            }
            let words: Vec<&str> = body.split_whitespace().collect();
            let id = |w: Option<&&str>| -> Result<u8, KeyError> {
                let w = w.ok_or_else(|| err(line, "missing key id".into()))?;
                match w.parse::<u8>() {
                    Ok(0) | Err(_) => Err(err(line, format!("key id {w:?} is not in 1..=255"))),
                    Ok(v) => Ok(v),
                }
            };
            match words[0] {
                "key" => {
                    if words.len() != 3 {
                        return Err(err(line, "expected `key ID HEX`".into()));
                    }
                    let kid = id(words.get(1))?;
                    let secret = parse_hex(words[2])
                        .ok_or_else(|| err(line, format!("the key must be {} hex digits", 2 * KEY_LEN)))?;
                    if keys.iter().any(|k| k.0 == kid) {
                        return Err(err(line, format!("key id {kid} listed twice")));
                    }
                    if keys.len() == MAX_KEYS {
                        return Err(err(line, format!("more than {MAX_KEYS} keys")));
                    }
                    keys.push((kid, secret));
                }
                "send" => {
                    if words.len() != 2 {
                        return Err(err(line, "expected `send ID`".into()));
                    }
                    if send.is_some() {
                        return Err(err(line, "`send` given twice".into()));
                    }
                    send = Some(id(words.get(1))?);
                }
                other => return Err(err(line, format!("unknown directive {other:?} (expected `key` or `send`)"))),
            }
        }
        let send = send.ok_or_else(|| KeyError::Invalid(format!("{}: no `send ID` line", path.display())))?;
        if !keys.iter().any(|k| k.0 == send) {
            return Err(KeyError::Invalid(format!("{}: the send key {send} is not listed", path.display())));
        }
        Ok(KeyFile { keys, send })
    }

    /// The keyring these keys make.
    pub fn keyring(&self, path: &Path) -> Result<Keyring, KeyError> {
        let keys = self.keys.iter().map(|(id, s)| ClusterKey::new(*id, s)).collect::<Result<Vec<_>, _>>()?;
        Keyring::new(keys, self.send).map_err(|e| KeyError::Invalid(format!("{}: {e}", path.display())))
    }

    /// A new file with one random key, id 1, sending.
    pub fn generate() -> Result<Self, KeyError> {
        Ok(KeyFile { keys: vec![(1, random_secret()?)], send: 1 })
    }

    /// Adds a random key with the next free id (not sending); returns it.
    pub fn add_key(&mut self) -> Result<u8, KeyError> {
        if self.keys.len() >= MAX_KEYS {
            return Err(KeyError::Invalid(format!("the file already holds {MAX_KEYS} keys; retire one first")));
        }
        let max = self.keys.iter().map(|k| k.0).max().unwrap_or(0);
        let id = if max < 255 {
            max + 1
        } else {
            (1..=255u8)
                .find(|i| !self.keys.iter().any(|k| k.0 == *i))
                .ok_or_else(|| KeyError::Invalid("no free key id".into()))?
        };
        self.keys.push((id, random_secret()?));
        Ok(id)
    }

    /// Makes `id` the send key.
    pub fn use_key(&mut self, id: u8) -> Result<(), KeyError> {
        if !self.keys.iter().any(|k| k.0 == id) {
            return Err(KeyError::Invalid(format!("no key with id {id} in the file")));
        }
        self.send = id;
        Ok(())
    }

    /// Removes key `id` (never the send key).
    pub fn retire(&mut self, id: u8) -> Result<(), KeyError> {
        if id == self.send {
            return Err(KeyError::Invalid(format!("key {id} is the send key; `use` another key first")));
        }
        let before = self.keys.len();
        self.keys.retain(|k| k.0 != id);
        if self.keys.len() == before {
            return Err(KeyError::Invalid(format!("no key with id {id} in the file")));
        }
        Ok(())
    }

    /// The file's text.
    pub fn render(&self) -> String {
        let mut s = String::from("# nicsync cluster key file: keep it mode 0600, identical on every member\n");
        s.push_str(&format!("send {}\n", self.send));
        for (id, secret) in &self.keys {
            let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
            s.push_str(&format!("key {id} {hex}\n"));
        }
        s
    }

    /// Writes the file atomically (a temporary file of mode 0600 in the same
    /// directory, synced, then renamed over `path`).
    pub fn write(&self, path: &Path) -> Result<(), KeyError> {
        write_private(path, self.render().as_bytes())
    }
}

/// Writes `bytes` to `path` atomically with mode 0600.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), KeyError> {
    let io = |source| KeyError::Io { path: path.to_path_buf(), source };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "key".into());
    let tmp = path.with_file_name(format!(".{name}.tmp{}", std::process::id()));
    let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(io)?;
    // An existing temporary file keeps its old mode through `open`.
    f.set_permissions(fs::Permissions::from_mode(0o600)).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

fn unix_seconds() -> u32 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs().min(u64::from(u32::MAX)) as u32)
}

/// Last boot number handed out in this process (for sealers without a
/// state file).
static PROCESS_BOOT: AtomicU32 = AtomicU32::new(0);

/// The boot number of a sealer starting now: greater than every boot number
/// handed out before under the same state.
///
/// With a state file (a daemon), the number is `max(stored + 1, unix
/// seconds)` and is written back (synced) before it is used, so it grows
/// across restarts, and a lost state file still cannot bring back an old
/// number unless the clock went back too. Without one (clusters inside one
/// process, whose keys are fresh per run), a process-wide counter does the
/// same.
pub fn next_boot(state_file: Option<&Path>) -> Result<u32, KeyError> {
    let floor = unix_seconds();
    let Some(path) = state_file else {
        let mut cur = PROCESS_BOOT.load(Ordering::Relaxed);
        loop {
            let next = cur.saturating_add(1).max(floor);
            match PROCESS_BOOT.compare_exchange(cur, next, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Ok(next),
                Err(v) => cur = v,
            }
        }
    };
    let stored = match fs::read_to_string(path) {
        Ok(t) => t.trim().parse::<u32>().map_err(|_| KeyError::Syntax {
            path: path.to_path_buf(),
            line: 1,
            reason: "the boot state file must hold one unsigned number".into(),
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(source) => return Err(KeyError::BootFile { path: path.to_path_buf(), source }),
    };
    if stored == u32::MAX {
        return Err(KeyError::Invalid(format!(
            "{}: boot numbers exhausted; generate a new cluster key and reset the file",
            path.display()
        )));
    }
    let next = (stored + 1).max(floor);
    write_private(path, format!("{next}\n").as_bytes()).map_err(|e| match e {
        KeyError::Io { path, source } => KeyError::BootFile { path, source },
        other => other,
    })?;
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory, removed with what it holds when dropped.
    struct ScratchDir(PathBuf);

    impl std::ops::Deref for ScratchDir {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for ScratchDir {
        fn drop(&mut self) {
            // Kept when the test fails, to look at.
            if !std::thread::panicking() {
                let _ = fs::remove_dir_all(&self.0);
            }
        }
    }

    fn tmpdir(tag: &str) -> ScratchDir {
        let d = std::env::temp_dir().join(format!("nicsync-seal-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).expect("tmpdir");
        ScratchDir(d)
    }

    #[test]
    fn file_round_trip_and_rotation_steps() {
        let d = tmpdir("rt");
        let p = d.join("cluster.key");
        let mut f = KeyFile::generate().expect("gen");
        f.write(&p).expect("write");
        assert_eq!(fs::metadata(&p).expect("meta").mode() & 0o777, 0o600);
        assert_eq!(KeyFile::read(&p).expect("read"), f);
        let id = f.add_key().expect("add");
        assert_eq!(id, 2);
        assert_eq!(f.send, 1);
        assert!(f.retire(1).is_err(), "the send key cannot be retired");
        f.use_key(2).expect("use");
        f.retire(1).expect("retire");
        f.write(&p).expect("write");
        let ring = Keyring::load(&p).expect("load");
        assert_eq!(ring.send_key().id(), 2);
        assert_eq!(ring.keys().len(), 1);
    }

    #[test]
    fn loose_permissions_are_refused() {
        let d = tmpdir("perm");
        let p = d.join("k");
        KeyFile::generate().expect("gen").write(&p).expect("write");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = Keyring::load(&p).expect_err("must refuse");
        assert!(matches!(e, KeyError::Permissions { mode: 0o644, .. }), "{e}");
        assert!(e.to_string().contains("chmod 600"), "{e}");
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let p = Path::new("k");
        let bad = [
            ("send 1\nkey 1 00\n", 2, "hex digits"),
            ("send 1\nkey 0 00", 2, "1..=255"),
            ("send 1\nfoo\n", 2, "unknown directive"),
            ("send 1\nsend 1\n", 2, "twice"),
        ];
        for (text, line, what) in bad {
            match KeyFile::parse(text, p) {
                Err(KeyError::Syntax { line: l, reason, .. }) => {
                    assert_eq!(l, line, "{text:?}");
                    assert!(reason.contains(what), "{text:?}: {reason}");
                }
                other => panic!("{text:?}: {other:?}"),
            }
        }
        let hex = "ab".repeat(32);
        assert!(KeyFile::parse(&format!("key 1 {hex}\n"), p).is_err(), "no send line");
        assert!(KeyFile::parse(&format!("send 2\nkey 1 {hex}\n"), p).is_err(), "send key not listed");
        assert!(KeyFile::parse(&format!("send 1 # comment\nkey 1 {hex}\n"), p).is_ok());
    }

    #[test]
    fn boot_numbers_grow_across_restarts() {
        let d = tmpdir("boot");
        let p = d.join("boot");
        let a = next_boot(Some(&p)).expect("a");
        let b = next_boot(Some(&p)).expect("b");
        let c = next_boot(Some(&p)).expect("c");
        assert!(a < b && b < c, "{a} {b} {c}");
        fs::write(&p, "junk").expect("write");
        assert!(next_boot(Some(&p)).is_err());
        let x = next_boot(None).expect("x");
        let y = next_boot(None).expect("y");
        assert!(x < y);
        // A boot file the daemon cannot write is named as one, not as the
        // key file.
        let e = next_boot(Some(&d.join("missing-dir").join("boot"))).map(|_| ()).unwrap_err().to_string();
        assert!(e.starts_with("boot state file ") && e.contains("ReadWritePaths"), "{e}");
    }

    #[test]
    fn fingerprints_tell_keys_apart_without_showing_them() {
        let a = ClusterKey::new(1, &[7; 32]).expect("a");
        let b = ClusterKey::new(1, &[7; 32]).expect("b");
        let c = ClusterKey::new(1, &[8; 32]).expect("c");
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_ne!(a.fingerprint(), c.fingerprint());
        assert!(!a.fingerprint().contains("0707"));
    }

    #[test]
    fn members_holding_one_key_seed_their_tables_alike() {
        let a = ClusterKey::new(1, &[7; 32]).expect("a");
        let b = ClusterKey::new(2, &[7; 32]).expect("b");
        let c = ClusterKey::new(1, &[8; 32]).expect("c");
        assert_eq!(a.table_hash_seed(), b.table_hash_seed(), "the id is not part of the seed");
        assert_ne!(a.table_hash_seed(), c.table_hash_seed());
        // Not the fingerprint (which is public), nor its bytes.
        let fp = u64::from_str_radix(&a.fingerprint(), 16).expect("hex");
        assert!(a.table_hash_seed().iter().all(|w| *w != fp && *w != fp.swap_bytes() && *w != 0));
    }
}
