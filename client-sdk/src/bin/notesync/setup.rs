//! What every command starts from: the server arguments (over the
//! folder's stored connection, [`crate::connection`]), the failure type
//! with its exit status, and opening the folder under its lock (one
//! notesync command at a time per folder).
//!
//! May touch: the folder's `.notesync/cli.lock`, the token file, the
//! stored connection through [`crate::connection`]; the folder itself only
//! by opening it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use notesync_client::folder::{Folder, FolderError};
use notesync_client::{ServerConfig, StoreError, TlsSettings};

use crate::connection::{Connection, ConnectionError};

pub(crate) const EXIT_ERROR: u8 = 1;
pub(crate) const EXIT_SYNC_FAILED: u8 = 3;
pub(crate) const EXIT_REFUSED: u8 = 4;

#[derive(Args)]
pub(crate) struct ServerArgs {
    /// The server's address; default: the one this folder last synced
    /// with (stored in .notesync/connection.json)
    #[arg(long, value_name = "HOST:PORT")]
    server: Option<String>,
    /// Longest wait for any one reply from the server, in seconds
    #[arg(long, value_name = "SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..))]
    timeout: u64,
    /// File holding the access token (from `notesync-server token add`);
    /// default: the stored one, else the NOTESYNC_TOKEN environment
    /// variable, if set. (Not a flag value: command lines are visible to
    /// other users.)
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Connect with TLS (the server runs with --tls-cert/--tls-key)
    #[arg(long)]
    tls: bool,
    /// Connect without TLS, forgetting the stored TLS settings
    #[arg(long, conflicts_with_all = ["tls", "tls_ca", "tls_name"])]
    no_tls: bool,
    /// PEM file of the certificate authority to trust (a self-signed
    /// server); default: the public web roots. Implies --tls
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// Name the server's certificate must carry, if not the host of
    /// --server. Implies --tls
    #[arg(long, value_name = "NAME")]
    tls_name: Option<String>,
}

/// The connection a command uses: the flags over what the folder stored.
pub(crate) struct Resolved {
    pub(crate) config: ServerConfig,
    pub(crate) conn: Connection,
    stored: Option<Connection>,
}

impl Resolved {
    /// After a successful sync: the folder remembers this connection.
    pub(crate) fn remember(&self, dir: &Path) -> Result<(), Fail> {
        Ok(self.conn.store(dir, self.stored.as_ref())?)
    }
}

impl ServerArgs {
    /// Each flag given overrides its stored value; `--no-tls` clears the
    /// TLS ones. Paths are made absolute, so the stored ones still hold
    /// when a later command runs elsewhere.
    pub(crate) fn resolve(&self, dir: &Path) -> Result<Resolved, Fail> {
        let stored = Connection::load(dir)?;
        let server = match (&self.server, &stored) {
            (Some(s), _) => s.clone(),
            (None, Some(c)) => c.server.clone(),
            (None, None) => {
                return Err(Fail::new(format!(
                    "no server for {}: give --server HOST:PORT (a folder remembers \
                     it after its first successful sync)",
                    dir.display()
                )));
            }
        };
        let mut conn = stored
            .clone()
            .unwrap_or_else(|| Connection::new(server.clone()));
        conn.server = server;
        if self.no_tls {
            (conn.tls, conn.tls_ca, conn.tls_name) = (false, None, None);
        }
        if let Some(ca) = &self.tls_ca {
            conn.tls_ca = Some(absolute(ca)?);
        }
        if let Some(name) = &self.tls_name {
            conn.tls_name = Some(name.clone());
        }
        conn.tls |= self.tls || conn.tls_ca.is_some() || conn.tls_name.is_some();
        if let Some(file) = &self.token_file {
            conn.token_file = Some(absolute(file)?);
        }
        let config = config(&conn, Duration::from_secs(self.timeout))?;
        Ok(Resolved {
            config,
            conn,
            stored,
        })
    }
}

fn absolute(path: &Path) -> Result<PathBuf, Fail> {
    std::path::absolute(path).map_err(|e| Fail::new(format!("{}: {e}", path.display())))
}

/// The SDK's settings for `conn`, with the token read from its file (or
/// `NOTESYNC_TOKEN` when there is none).
fn config(conn: &Connection, reply_timeout: Duration) -> Result<ServerConfig, Fail> {
    let mut c = ServerConfig::new(conn.server.clone());
    c.reply_timeout = reply_timeout;
    c.token = match &conn.token_file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| {
                Fail::new(format!(
                    "cannot read the token file {}: {e}",
                    path.display()
                ))
            })?
            .trim()
            .as_bytes()
            .to_vec(),
        None => std::env::var("NOTESYNC_TOKEN")
            .map(|t| t.trim().as_bytes().to_vec())
            .unwrap_or_default(),
    };
    if c.token.len() > 255 {
        return Err(Fail::new(
            "the token is longer than 255 bytes: is it the right file?",
        ));
    }
    if conn.tls {
        c.tls = Some(TlsSettings {
            ca_file: conn.tls_ca.clone(),
            server_name: conn.tls_name.clone(),
        });
    }
    Ok(c)
}

/// A failure, with the exit status it gives.
pub(crate) struct Fail {
    pub(crate) code: u8,
    pub(crate) msg: String,
}

impl Fail {
    pub(crate) fn new(msg: impl Into<String>) -> Fail {
        Fail {
            code: EXIT_ERROR,
            msg: msg.into(),
        }
    }
}

impl From<FolderError> for Fail {
    fn from(e: FolderError) -> Fail {
        Fail::new(e.to_string())
    }
}

impl From<ConnectionError> for Fail {
    fn from(e: ConnectionError) -> Fail {
        Fail::new(e.to_string())
    }
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Fail {
        Fail::new(e.to_string())
    }
}

/// Holds the folder's lock until dropped (the process exits).
pub(crate) struct Lock(#[allow(dead_code)] File);

/// The folder, created if asked; one notesync command at a time.
pub(crate) fn open_folder(
    dir: &Path,
    create: bool,
    server: ServerConfig,
) -> Result<(Folder, Lock), Fail> {
    if create && !dir.exists() {
        fs::create_dir_all(dir).map_err(|e| Fail::new(format!("{}: {e}", dir.display())))?;
        println!("created {}", dir.display());
    }
    if !dir.is_dir() {
        return Err(Fail::new(format!("{} is not a folder", dir.display())));
    }
    if !create && !dir.join(".notesync").join("state.json").is_file() {
        return Err(Fail::new(format!(
            "{} is not a notesync folder (no .notesync/state.json); \
             `notesync sync {} --server HOST:PORT` makes it one",
            dir.display(),
            dir.display()
        )));
    }
    let lock = lock(dir)?;
    let folder = Folder::open(dir, server)?;
    Ok((folder, lock))
}

fn lock(dir: &Path) -> Result<Lock, Fail> {
    let state = dir.join(".notesync");
    let path = state.join("cli.lock");
    let fail = |e: io::Error| Fail::new(format!("{}: {e}", path.display()));
    fs::create_dir_all(&state).map_err(fail)?;
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(fail)?;
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a file descriptor this function owns.
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r != 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                let pid = fs::read_to_string(&path).unwrap_or_default();
                return Err(Fail::new(format!(
                    "{} is in use by another notesync command (pid {}); stop it first",
                    dir.display(),
                    pid.trim()
                )));
            }
            return Err(fail(e));
        }
        f.set_len(0).map_err(fail)?;
        write!(f, "{}", std::process::id()).map_err(fail)?;
    }
    Ok(Lock(f))
}
