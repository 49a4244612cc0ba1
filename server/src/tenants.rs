//! Namespaces: one database, index and writer per namespace.
//!
//! Every document, the synclist index, sites and sessions belong to a
//! namespace (a token's). Each namespace is its own redb database in its
//! own folder, with its own writer thread: isolation holds by construction
//! (no query can reach another namespace's keys), a namespace can be backed
//! up, moved or removed as a folder, and tenants never share a commit.
//!
//! Layout of a data folder:
//! - `notesync.redb`: namespace `default` (data written without tokens
//!   lives here; it also holds the folder's lock and the boot count);
//! - `namespaces/NAME/notesync.redb`: every other namespace;
//! - `tokens`: token hashes (`auth`).
//!
//! Namespaces other than `default` are opened on their first authenticated
//! connection and stay open until shutdown.
//!
//! Touches the store (open), the index (rebuilt at open) and the writer
//! (spawned per namespace, stopped at shutdown).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redb::Database;
use tokio::sync::{OnceCell, mpsc};
use tokio::time::timeout;

use crate::auth::{DEFAULT_NAMESPACE, valid_namespace};
use crate::config::Config;
use crate::feed::Feed;
use crate::index::Index;
use crate::store::{self, OpenError, ServerClock};
use crate::writer::{self, Request, WriterStats};

/// How long shutdown waits for each writer's last commit.
pub(crate) const WRITER_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Folder (in the data folder) of the namespaces other than `default`.
pub const NAMESPACES_DIR: &str = "namespaces";

/// The folder holding a namespace's database.
pub fn namespace_dir(data_dir: &Path, namespace: &str) -> PathBuf {
    if namespace == DEFAULT_NAMESPACE {
        data_dir.to_owned()
    } else {
        data_dir.join(NAMESPACES_DIR).join(namespace)
    }
}

/// The namespaces that have a database in `data_dir`, `default` first.
pub fn namespaces_on_disk(data_dir: &Path) -> std::io::Result<Vec<String>> {
    let mut out = Vec::new();
    if data_dir.join(store::DB_FILE).exists() {
        out.push(DEFAULT_NAMESPACE.to_owned());
    }
    let dir = data_dir.join(NAMESPACES_DIR);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    let mut names = Vec::new();
    for e in entries {
        let e = e?;
        if let Some(name) = e.file_name().to_str()
            && valid_namespace(name)
            && name != DEFAULT_NAMESPACE
            && e.path().join(store::DB_FILE).exists()
        {
            names.push(name.to_owned());
        }
    }
    names.sort();
    out.extend(names);
    Ok(out)
}

/// One namespace's open database, index and writer.
pub(crate) struct Tenant {
    pub name: String,
    pub db: Arc<Database>,
    pub index: Arc<Index>,
    /// The change feed's fan-out (PROTOCOL.md 3.8), fed by `index`.
    pub feed: Feed,
    pub writer: mpsc::Sender<Request>,
    pub stats: Arc<WriterStats>,
    pub boot: u64,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Why a namespace could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("namespace {namespace}: cannot start the writer thread: {source}")]
    Writer {
        namespace: String,
        source: std::io::Error,
    },
    #[error("namespace {namespace}: opening task failed: {source}")]
    Task {
        namespace: String,
        source: tokio::task::JoinError,
    },
}

/// Why a tenant could not stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum StopError {
    #[error("namespace {0}: the writer thread did not stop within {WRITER_STOP_TIMEOUT:?}")]
    WriterStuck(String),
    #[error("namespace {0}: the writer thread panicked")]
    WriterPanicked(String),
    #[error("namespace {0}: closing the database: {1}")]
    Close(String, #[source] redb::DatabaseError),
}

impl Tenant {
    /// Opens (creating if needed) the namespace's database and starts its
    /// writer. Blocking: call from a blocking context.
    fn open(config: &Config, name: &str) -> Result<Tenant, TenantError> {
        let started = Instant::now();
        let opened = store::open(&namespace_dir(&config.data_dir, name))?;
        let docs = opened.doc_times.len();
        let index = Arc::new(Index::rebuild(
            opened.doc_times,
            opened.deleted,
            opened.clock,
        ));
        let db = Arc::new(opened.db);
        let clock = ServerClock::new(config.wall_clock.clone(), opened.clock);
        let (writer, thread, stats) = writer::spawn_with(
            db.clone(),
            clock,
            index.clone(),
            config.writer_queue,
            config.max_batch,
            writer::Compaction {
                horizon: config.tombstone_horizon,
                interval: config.compaction_interval,
            },
        )
        .map_err(|source| TenantError::Writer {
            namespace: name.to_owned(),
            source,
        })?;
        tracing::info!(
            namespace = name,
            path = %opened.path.display(),
            documents = docs,
            boot = opened.boot,
            open_ms = started.elapsed().as_secs_f64() * 1e3,
            "namespace open, index rebuilt"
        );
        Ok(Tenant {
            name: name.to_owned(),
            db,
            feed: Feed::new(index.clone()),
            index,
            writer,
            stats,
            boot: opened.boot,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Commits what is queued, then stops the writer.
    async fn stop_writer(&self) -> Result<(), StopError> {
        // Stop is queued behind everything already sent, so it is all
        // committed before the writer exits.
        let queued = timeout(WRITER_STOP_TIMEOUT, self.writer.send(Request::Stop)).await;
        if !matches!(queued, Ok(Ok(()))) {
            tracing::warn!(namespace = %self.name, "could not queue the writer's stop");
        }
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(thread) = thread else { return Ok(()) };
        let joined = timeout(
            WRITER_STOP_TIMEOUT,
            tokio::task::spawn_blocking(move || thread.join()),
        )
        .await;
        match joined {
            Err(_) => Err(StopError::WriterStuck(self.name.clone())),
            Ok(Err(_)) | Ok(Ok(Err(_))) => Err(StopError::WriterPanicked(self.name.clone())),
            Ok(Ok(Ok(()))) => Ok(()),
        }
    }

    /// Closes the database if nothing else holds it (otherwise it closes
    /// when the last holder ends).
    fn close(self: Arc<Self>) -> Result<(), StopError> {
        let name = self.name.clone();
        let db = match Arc::try_unwrap(self) {
            Ok(t) => Arc::try_unwrap(t.db).ok(),
            Err(_) => None,
        };
        match db {
            Some(db) => db.close().map_err(|e| StopError::Close(name, e)),
            None => {
                tracing::warn!(
                    namespace = %name,
                    "database still referenced by unfinished connections; it closes when they end"
                );
                Ok(())
            }
        }
    }
}

/// The server's open namespaces.
pub(crate) struct Tenants {
    config: Config,
    default: Arc<Tenant>,
    others: Mutex<HashMap<String, Arc<OnceCell<Arc<Tenant>>>>>,
}

impl Tenants {
    /// Opens the `default` namespace (which takes the data folder's lock).
    pub async fn open(config: Config) -> Result<Tenants, TenantError> {
        let c = config.clone();
        let default = tokio::task::spawn_blocking(move || Tenant::open(&c, DEFAULT_NAMESPACE))
            .await
            .map_err(|source| TenantError::Task {
                namespace: DEFAULT_NAMESPACE.to_owned(),
                source,
            })??;
        Ok(Tenants {
            config,
            default: Arc::new(default),
            others: Mutex::new(HashMap::new()),
        })
    }

    pub fn default_tenant(&self) -> &Arc<Tenant> {
        &self.default
    }

    /// The namespace's tenant, opened now if it is not open yet.
    pub async fn get(&self, name: &str) -> Result<Arc<Tenant>, TenantError> {
        if name == DEFAULT_NAMESPACE {
            return Ok(self.default.clone());
        }
        let cell = self
            .others
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name.to_owned())
            .or_default()
            .clone();
        let config = self.config.clone();
        let name = name.to_owned();
        cell.get_or_try_init(|| async move {
            let namespace = name.clone();
            tokio::task::spawn_blocking(move || Tenant::open(&config, &name).map(Arc::new))
                .await
                .map_err(|source| TenantError::Task { namespace, source })?
        })
        .await
        .cloned()
    }

    /// Every open tenant, `default` first.
    pub fn open_tenants(&self) -> Vec<Arc<Tenant>> {
        let mut out = vec![self.default.clone()];
        let others = self.others.lock().unwrap_or_else(|p| p.into_inner());
        let mut names: Vec<_> = others.keys().cloned().collect();
        names.sort();
        out.extend(names.iter().filter_map(|n| others[n].get().cloned()));
        out
    }

    /// Stops every tenant's writer (after its last commit) and closes the
    /// databases: others first, `default` (the folder's lock) last.
    /// Reports the first failure after trying them all.
    pub async fn stop(self: Arc<Self>) -> Result<(), StopError> {
        let mut first = None;
        let open = self.open_tenants();
        for t in open.iter().rev() {
            if let Err(e) = t.stop_writer().await {
                tracing::error!(error = %e, "stopping a namespace");
                first.get_or_insert(e);
            }
        }
        drop(open);
        let tenants = match Arc::try_unwrap(self) {
            Ok(t) => t,
            Err(_) => {
                tracing::warn!("namespaces still referenced; databases close when they end");
                return first.map_or(Ok(()), Err);
            }
        };
        let Tenants {
            default, others, ..
        } = tenants;
        for cell in others
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
            .into_values()
        {
            let t = match Arc::try_unwrap(cell) {
                Ok(cell) => cell.into_inner(),
                Err(cell) => cell.get().cloned(),
            };
            if let Some(t) = t
                && let Err(e) = t.close()
            {
                first.get_or_insert(e);
            }
        }
        if let Err(e) = default.close() {
            first.get_or_insert(e);
        }
        first.map_or(Ok(()), Err)
    }
}
