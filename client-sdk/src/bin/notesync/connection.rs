//! The connection a folder remembers (`.notesync/connection.json`): the
//! server address, the TLS settings and the token file's path of the last
//! successful `sync` or `watch`, so later commands may omit them.
//!
//! Never the token itself: only the path of the file that holds it (a
//! token from `NOTESYNC_TOKEN` is not stored at all), so the folder can be
//! copied or backed up without leaking a secret. The file is small,
//! versioned JSON, written atomically (`fsutil::write_atomic`) and only
//! when it changes.
//!
//! May touch: the folder's `.notesync/connection.json`, nothing else.

use std::io;
use std::path::{Path, PathBuf};

use notesync_client::fsutil::write_atomic;
use serde::{Deserialize, Serialize};

/// The format version this binary reads and writes.
const VERSION: u32 = 1;

/// Where a folder keeps its connection.
pub(crate) fn connection_path(dir: &Path) -> PathBuf {
    dir.join(".notesync").join("connection.json")
}

/// How a folder connects to its server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Connection {
    /// Format version ([`VERSION`]).
    pub(crate) version: u32,
    /// `host:port`.
    pub(crate) server: String,
    /// Connect with TLS (also implied by `tls_ca` or `tls_name`).
    pub(crate) tls: bool,
    /// The CA to trust, an absolute path; none: the public web roots.
    pub(crate) tls_ca: Option<PathBuf>,
    /// The name the certificate must carry, if not the host of `server`.
    pub(crate) tls_name: Option<String>,
    /// The file holding the token, an absolute path.
    pub(crate) token_file: Option<PathBuf>,
}

/// Why the stored connection cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectionError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a stored connection (delete it and give --server again): {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "{path} has format version {found}; this notesync reads version {VERSION} \
         (a newer notesync wrote it)"
    )]
    Version { path: PathBuf, found: u32 },
    #[error("cannot store the connection in {path}: {source}")]
    Encode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot store the connection in {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl Connection {
    pub(crate) fn new(server: String) -> Connection {
        Connection {
            version: VERSION,
            server,
            tls: false,
            tls_ca: None,
            tls_name: None,
            token_file: None,
        }
    }

    /// The connection stored in `dir`, if there is one.
    pub(crate) fn load(dir: &Path) -> Result<Option<Connection>, ConnectionError> {
        let path = connection_path(dir);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(ConnectionError::Read { path, source }),
        };
        let c: Connection =
            serde_json::from_slice(&bytes).map_err(|source| ConnectionError::Parse {
                path: path.clone(),
                source,
            })?;
        if c.version != VERSION {
            return Err(ConnectionError::Version {
                path,
                found: c.version,
            });
        }
        Ok(Some(c))
    }

    /// Stores this connection in `dir` unless it is already what is stored.
    pub(crate) fn store(
        &self,
        dir: &Path,
        stored: Option<&Connection>,
    ) -> Result<(), ConnectionError> {
        if stored == Some(self) {
            return Ok(());
        }
        let path = connection_path(dir);
        // (A path that is not UTF-8 has no JSON form.)
        let mut bytes = match serde_json::to_vec_pretty(self) {
            Ok(b) => b,
            Err(source) => return Err(ConnectionError::Encode { path, source }),
        };
        bytes.push(b'\n');
        write_atomic(&path, &bytes).map_err(|source| ConnectionError::Write { path, source })
    }

    /// One line for `status` and the sync messages: the address and how.
    pub(crate) fn describe(&self) -> String {
        let mut how = Vec::new();
        if self.tls {
            how.push("TLS".to_owned());
        }
        if let Some(ca) = &self.tls_ca {
            how.push(format!("CA {}", ca.display()));
        }
        if let Some(name) = &self.tls_name {
            how.push(format!("name {name}"));
        }
        if how.is_empty() {
            self.server.clone()
        } else {
            format!("{} ({})", self.server, how.join(", "))
        }
    }
}
