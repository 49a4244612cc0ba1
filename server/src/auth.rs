//! Tokens, namespaces and the failed-attempt budget.
//!
//! A token is `nst_<id>_<secret>`: `id` is 16 hex digits (public: `token
//! list` and `token revoke` name tokens by it), `secret` 64 hex digits (32
//! random bytes). The data folder keeps only the SHA-256 of the whole token
//! in `tokens` (one line per token); a token is checked by looking its id up
//! and comparing hashes in constant time. A plain hash is enough: the
//! secret has 256 random bits, so there is nothing to brute-force (password
//! hashing exists for low-entropy secrets).
//!
//! The `tokens` file is written whole (temporary file, fsync, rename) by the
//! `token` subcommands, which may run while a server serves the folder: the
//! server re-reads it when it changes ([`Tokens::reload_if_changed`]) and
//! ends the connections of revoked tokens.
//!
//! Invariants:
//! - Nothing but hashes of secrets is ever written to disk or logged.
//! - A namespace name is `[a-z0-9][a-z0-9_-]{0,63}`, so it is safe as a
//!   folder name (`tenants::namespace_dir`).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The namespace of connections on a server without authentication, and
/// of the data written before namespaces existed.
pub const DEFAULT_NAMESPACE: &str = "default";
/// File (in the data folder) holding the token hashes.
pub const TOKENS_FILE: &str = "tokens";
const LOCK_FILE: &str = "tokens.lock";
const HEADER: &str = "# notesync tokens: id namespace access sha256(token) created_unix\n";

/// What a token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    ReadWrite,
    ReadOnly,
}

impl Access {
    fn as_str(self) -> &'static str {
        match self {
            Access::ReadWrite => "rw",
            Access::ReadOnly => "ro",
        }
    }
}

/// One stored token (its hash, never its secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    pub id: String,
    pub namespace: String,
    pub access: Access,
    hash: [u8; 32],
    pub created_unix: u64,
}

/// Who a connection is, once its hello was accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// None: no token (a server without authentication).
    pub token_id: Option<String>,
    pub namespace: String,
    pub access: Access,
}

impl Identity {
    /// A connection on a server without authentication.
    pub fn anonymous() -> Self {
        Identity {
            token_id: None,
            namespace: DEFAULT_NAMESPACE.to_owned(),
            access: Access::ReadWrite,
        }
    }
}

/// Errors of the token file and the `token` subcommands.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}, line {line}: {what}")]
    Parse {
        path: PathBuf,
        line: usize,
        what: String,
    },
    #[error(
        "invalid namespace {0:?}: 1 to 64 characters of a-z, 0-9, '_' and '-', starting with a letter or digit"
    )]
    BadNamespace(String),
    #[error("no token with id {0}")]
    NoSuchToken(String),
    #[error("another token command holds {0} (if none is running, remove the file and retry)")]
    Locked(PathBuf),
    #[error("cannot get random bytes for a token: {0}")]
    Random(String),
}

/// Whether `name` is a valid namespace name.
pub fn valid_namespace(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'-')
}

fn hash_token(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// The id part of a well-formed token.
fn token_id(token: &[u8]) -> Option<&str> {
    let s = std::str::from_utf8(token).ok()?;
    let rest = s.strip_prefix("nst_")?;
    let (id, secret) = rest.split_once('_')?;
    let hex = |x: &str, n: usize| x.len() == n && x.bytes().all(|c| c.is_ascii_hexdigit());
    (hex(id, 16) && hex(secret, 64)).then_some(id)
}

fn parse(path: &Path, text: &str) -> Result<Vec<TokenRecord>, TokenError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |what: &str| TokenError::Parse {
            path: path.to_owned(),
            line: i + 1,
            what: what.to_owned(),
        };
        let f: Vec<&str> = line.split_ascii_whitespace().collect();
        let [id, namespace, access, hash, created] = f[..] else {
            return Err(bad("expected 5 fields: id namespace access hash created"));
        };
        if id.len() != 16 || !id.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad("the id is not 16 hex digits"));
        }
        if !valid_namespace(namespace) {
            return Err(bad("invalid namespace name"));
        }
        let access = match access {
            "rw" => Access::ReadWrite,
            "ro" => Access::ReadOnly,
            _ => return Err(bad("access is neither rw nor ro")),
        };
        let mut h = [0u8; 32];
        hex::decode_to_slice(hash, &mut h).map_err(|_| bad("the hash is not 64 hex digits"))?;
        let created_unix = created
            .parse()
            .map_err(|_| bad("the creation time is not a number"))?;
        out.push(TokenRecord {
            id: id.to_owned(),
            namespace: namespace.to_owned(),
            access,
            hash: h,
            created_unix,
        });
    }
    Ok(out)
}

/// Reads the tokens of a data folder (none if the file does not exist).
pub fn read_tokens(data_dir: &Path) -> Result<Vec<TokenRecord>, TokenError> {
    let path = data_dir.join(TOKENS_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => parse(&path, &text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(TokenError::Io { path, source }),
    }
}

fn write_tokens(data_dir: &Path, tokens: &[TokenRecord]) -> Result<(), TokenError> {
    let path = data_dir.join(TOKENS_FILE);
    let tmp = data_dir.join(format!("{TOKENS_FILE}.tmp"));
    let io = |p: &Path| {
        let p = p.to_owned();
        move |source| TokenError::Io { path: p, source }
    };
    let mut text = String::from(HEADER);
    for t in tokens {
        let _ = writeln!(
            text,
            "{} {} {} {} {}",
            t.id,
            t.namespace,
            t.access.as_str(),
            hex::encode(t.hash),
            t.created_unix
        );
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp).map_err(io(&tmp))?;
    f.write_all(text.as_bytes()).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    // The rename itself must survive a crash too.
    if let Ok(d) = std::fs::File::open(data_dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Holds `tokens.lock` while a `token` subcommand rewrites the file.
struct FileLock(PathBuf);

impl FileLock {
    fn take(data_dir: &Path) -> Result<FileLock, TokenError> {
        let path = data_dir.join(LOCK_FILE);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(_) => return Ok(FileLock(path)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    if Instant::now() > deadline {
                        return Err(TokenError::Locked(path));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(source) => return Err(TokenError::Io { path, source }),
            }
        }
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn random_hex(bytes: usize) -> Result<String, TokenError> {
    let mut b = vec![0u8; bytes];
    getrandom::fill(&mut b).map_err(|e| TokenError::Random(e.to_string()))?;
    Ok(hex::encode(b))
}

/// Creates a token for `namespace`; returns its record and the token
/// itself (shown once: only its hash is kept).
pub fn add_token(
    data_dir: &Path,
    namespace: &str,
    access: Access,
) -> Result<(TokenRecord, String), TokenError> {
    if !valid_namespace(namespace) {
        return Err(TokenError::BadNamespace(namespace.to_owned()));
    }
    std::fs::create_dir_all(data_dir).map_err(|source| TokenError::Io {
        path: data_dir.to_owned(),
        source,
    })?;
    let _lock = FileLock::take(data_dir)?;
    let mut tokens = read_tokens(data_dir)?;
    let id = loop {
        let id = random_hex(8)?;
        if !tokens.iter().any(|t| t.id == id) {
            break id;
        }
    };
    let token = format!("nst_{id}_{}", random_hex(32)?);
    let rec = TokenRecord {
        id,
        namespace: namespace.to_owned(),
        access,
        hash: hash_token(token.as_bytes()),
        created_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    tokens.push(rec.clone());
    write_tokens(data_dir, &tokens)?;
    Ok((rec, token))
}

/// Removes the token with this id; a running server ends its connections.
pub fn revoke_token(data_dir: &Path, id: &str) -> Result<TokenRecord, TokenError> {
    let _lock = FileLock::take(data_dir)?;
    let mut tokens = read_tokens(data_dir)?;
    let Some(i) = tokens.iter().position(|t| t.id == id) else {
        return Err(TokenError::NoSuchToken(id.to_owned()));
    };
    let rec = tokens.remove(i);
    write_tokens(data_dir, &tokens)?;
    Ok(rec)
}

/// The server's view of the token file.
pub struct Tokens {
    dir: PathBuf,
    state: Mutex<TokensState>,
}

struct TokensState {
    by_id: HashMap<String, TokenRecord>,
    /// The file's stamp when last read; None: no file.
    seen: Option<Stamp>,
}

/// (modified, length, inode): the token commands replace the file by a
/// rename, so a new inode shows a change even within one mtime tick and at
/// the same length.
type Stamp = (SystemTime, u64, u64);

fn file_stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let ino = std::os::unix::fs::MetadataExt::ino(&m);
    #[cfg(not(unix))]
    let ino = 0;
    Some((m.modified().ok()?, m.len(), ino))
}

impl Tokens {
    /// Loads the data folder's tokens.
    pub fn load(data_dir: &Path) -> Result<Tokens, TokenError> {
        let seen = file_stamp(&data_dir.join(TOKENS_FILE));
        let by_id = read_tokens(data_dir)?
            .into_iter()
            .map(|t| (t.id.clone(), t))
            .collect();
        Ok(Tokens {
            dir: data_dir.to_owned(),
            state: Mutex::new(TokensState { by_id, seen }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TokensState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_empty(&self) -> bool {
        self.lock().by_id.is_empty()
    }

    pub fn len(&self) -> usize {
        self.lock().by_id.len()
    }

    /// The identity a token grants, if it is valid now.
    pub fn verify(&self, token: &[u8]) -> Option<Identity> {
        let id = token_id(token)?;
        let hash = hash_token(token);
        let state = self.lock();
        let rec = state.by_id.get(id)?;
        bool::from(rec.hash.ct_eq(&hash)).then(|| Identity {
            token_id: Some(rec.id.clone()),
            namespace: rec.namespace.clone(),
            access: rec.access,
        })
    }

    /// Whether the token with this id still exists.
    pub fn contains(&self, id: &str) -> bool {
        self.lock().by_id.contains_key(id)
    }

    /// Re-reads the file if it changed; returns the ids that disappeared.
    /// A file that cannot be read or parsed keeps the tokens as they were
    /// (and is reported), so a half-edited file never locks everyone out
    /// nor lets anyone in.
    pub fn reload_if_changed(&self) -> Result<Vec<String>, TokenError> {
        let stamp = file_stamp(&self.dir.join(TOKENS_FILE));
        if stamp == self.lock().seen {
            return Ok(Vec::new());
        }
        let fresh: HashMap<String, TokenRecord> = read_tokens(&self.dir)?
            .into_iter()
            .map(|t| (t.id.clone(), t))
            .collect();
        let mut state = self.lock();
        let gone = state
            .by_id
            .keys()
            .filter(|id| !fresh.contains_key(*id))
            .cloned()
            .collect();
        state.by_id = fresh;
        state.seen = stamp;
        Ok(gone)
    }
}

/// Failed authentication attempts per IP address: past `max` failures
/// within `window`, the address is refused until the window ends.
pub struct FailBudget {
    max: u32,
    window: Duration,
    map: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

/// Addresses tracked at most; past it, expired entries are dropped, then
/// the oldest (an attacker with many addresses cannot grow it unbounded).
const MAX_TRACKED: usize = 65_536;

impl FailBudget {
    pub fn new(max: u32, window: Duration) -> Self {
        FailBudget {
            max,
            window,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, (u32, Instant)>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// If `ip` has used up its budget: how long until it may try again.
    pub fn blocked(&self, ip: IpAddr) -> Option<Duration> {
        let now = Instant::now();
        let map = self.lock();
        let (n, start) = map.get(&ip)?;
        let end = *start + self.window;
        (*n >= self.max && end > now).then(|| end - now)
    }

    /// Counts one failed attempt from `ip`.
    pub fn fail(&self, ip: IpAddr) {
        let now = Instant::now();
        let mut map = self.lock();
        if map.len() >= MAX_TRACKED && !map.contains_key(&ip) {
            let window = self.window;
            map.retain(|_, (_, start)| now.duration_since(*start) < window);
            if map.len() >= MAX_TRACKED
                && let Some(oldest) = map.iter().min_by_key(|(_, (_, s))| *s).map(|(k, _)| *k)
            {
                map.remove(&oldest);
            }
        }
        let e = map.entry(ip).or_insert((0, now));
        if now.duration_since(e.1) >= self.window {
            *e = (0, now);
        }
        e.0 = e.0.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_through_the_file_and_verify() {
        let dir = tempfile::tempdir().unwrap();
        let (rw, t1) = add_token(dir.path(), "alice", Access::ReadWrite).unwrap();
        let (ro, t2) = add_token(dir.path(), "alice", Access::ReadOnly).unwrap();
        let text = std::fs::read_to_string(dir.path().join(TOKENS_FILE)).unwrap();
        assert!(
            !text.contains(&t1[4..]) && !text.contains(&t2[4..]),
            "{text}"
        );
        let tokens = Tokens::load(dir.path()).unwrap();
        assert_eq!(tokens.len(), 2);
        let id = tokens.verify(t1.as_bytes()).unwrap();
        assert_eq!(
            (id.namespace.as_str(), id.access, id.token_id.as_deref()),
            ("alice", Access::ReadWrite, Some(rw.id.as_str()))
        );
        assert_eq!(
            tokens.verify(t2.as_bytes()).unwrap().access,
            Access::ReadOnly
        );
        // One changed secret digit, a truncated token, another id: refused.
        let mut wrong = t1.clone().into_bytes();
        let last = wrong.len() - 1;
        wrong[last] = if wrong[last] == b'0' { b'1' } else { b'0' };
        assert_eq!(tokens.verify(&wrong), None);
        assert_eq!(tokens.verify(&t1.as_bytes()[..t1.len() - 1]), None);
        assert_eq!(tokens.verify(b""), None);
        revoke_token(dir.path(), &ro.id).unwrap();
        // A changed file is noticed even within the same mtime tick: its
        // length changed.
        assert_eq!(tokens.reload_if_changed().unwrap(), vec![ro.id.clone()]);
        assert_eq!(tokens.verify(t2.as_bytes()), None);
        assert!(tokens.verify(t1.as_bytes()).is_some());
        assert!(matches!(
            revoke_token(dir.path(), &ro.id),
            Err(TokenError::NoSuchToken(_))
        ));
    }

    #[test]
    fn namespace_names_are_safe_folder_names() {
        for ok in ["default", "a", "team-1", "x_y", &"a".repeat(64)] {
            assert!(valid_namespace(ok), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "_a",
            "A",
            "a/b",
            "..",
            "a.b",
            "é",
            &"a".repeat(65),
        ] {
            assert!(!valid_namespace(bad), "{bad}");
        }
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            add_token(dir.path(), "../x", Access::ReadWrite),
            Err(TokenError::BadNamespace(_))
        ));
    }

    #[test]
    fn a_corrupt_token_file_is_an_error_naming_the_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(TOKENS_FILE), "# c\n0123 ns rw zz 1\n").unwrap();
        let e = read_tokens(dir.path()).unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn the_fail_budget_blocks_after_max_failures_in_the_window() {
        let b = FailBudget::new(3, Duration::from_secs(60));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..2 {
            b.fail(ip);
        }
        assert!(b.blocked(ip).is_none());
        b.fail(ip);
        assert!(b.blocked(ip).is_some());
        assert!(b.blocked(other).is_none());
        let short = FailBudget::new(1, Duration::ZERO);
        short.fail(ip);
        assert!(
            short.blocked(ip).is_none(),
            "an expired window blocks nothing"
        );
    }
}
