//! The admin socket: how `export`, `check` and `backup` reach a running
//! server.
//!
//! redb locks a database file for one process, so while a server runs no
//! other process can open its databases. The server therefore listens on a
//! Unix socket in its data folder, `DATA/admin.sock` (mode 0600: only the
//! server's user, and root, can connect), removed on a clean shutdown. A
//! socket left by a server that died is stale: the next server replaces it
//! (it holds the folder's lock by then, so no other server is using it),
//! and a command that finds nobody listening opens the databases itself.
//!
//! The protocol is one request line, then one reply until the server
//! closes the connection:
//!
//! - request: `check`, `export NAMESPACE DOC_HEX`, or `backup ABSOLUTE_DEST`;
//! - reply: a status line, `ok`, `fail` (a check found problems) or
//!   `error`, then the body: the text, the report, or the error message.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use redb::ReadableDatabase;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ops::{self, BackupReport, CheckReport, OpsError};
use crate::tenants::{TenantError, Tenants, namespaces_on_disk};

/// File name of the admin socket in the data folder.
pub const SOCKET_FILE: &str = "admin.sock";
/// Longest request line.
const MAX_REQUEST: u64 = 8192;
/// Time a client has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an operations command failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Ops(#[from] OpsError),
    #[error("the running server: {0}")]
    Server(String),
    #[error("admin socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the check found {0} problem(s)")]
    Problems(u64),
    #[error("writing the output: {0}")]
    Output(#[source] std::io::Error),
    /// A path given to `backup` could not be made absolute (the wording
    /// is the one this error always had).
    #[error("the running server: cannot resolve the path {}: {source}", path.display())]
    Resolve {
        path: PathBuf,
        source: std::io::Error,
    },
}

// ---------------------------------------------------------------- server side

/// Why the running server could not answer a request: the `error` reply's
/// body is its text.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error(transparent)]
    Ops(#[from] OpsError),
    #[error(transparent)]
    Tenant(#[from] TenantError),
    /// Listing the namespaces in the data folder.
    #[error(transparent)]
    Folder(#[from] std::io::Error),
    #[error("the task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("usage: export NAMESPACE DOC_HEX")]
    Usage,
    #[error("unknown request {0:?}")]
    Unknown(String),
}

/// The bound admin socket; its file is removed when this is dropped.
pub(crate) struct AdminSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl AdminSocket {
    /// Binds `DATA/admin.sock`, replacing a stale one. Call only while
    /// holding the data folder's lock (the `default` database).
    pub fn bind(data_dir: &Path) -> std::io::Result<AdminSocket> {
        use std::os::unix::fs::PermissionsExt;
        let path = data_dir.join(SOCKET_FILE);
        // Bound under a temporary name and renamed once it is 0600, so
        // nobody can connect while it has the default mode.
        let tmp = data_dir.join(format!("{SOCKET_FILE}.{}", std::process::id()));
        remove_if_there(&tmp)?;
        let listener = std::os::unix::net::UnixListener::bind(&tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&tmp, &path)?;
        listener.set_nonblocking(true)?;
        Ok(AdminSocket {
            listener: UnixListener::from_std(listener)?,
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for AdminSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn remove_if_there(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Answers admin requests until `shutdown`; handlers run on `tracker`, so
/// shutdown waits for a backup in progress (up to its timeout).
pub(crate) async fn serve(
    socket: AdminSocket,
    tenants: Arc<Tenants>,
    data_dir: PathBuf,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            r = socket.listener.accept() => r,
        };
        match accepted {
            Ok((stream, _)) => {
                let tenants = tenants.clone();
                let data_dir = data_dir.clone();
                tracker.spawn(async move {
                    if let Err(e) = handle(stream, &tenants, &data_dir).await {
                        tracing::debug!(error = %e, "admin connection");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "admin socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    drop(socket);
}

async fn handle(stream: UnixStream, tenants: &Tenants, data_dir: &Path) -> std::io::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut line = String::new();
    let read = tokio::time::timeout(
        REQUEST_TIMEOUT,
        BufReader::new(rd.take(MAX_REQUEST)).read_line(&mut line),
    )
    .await;
    if !matches!(read, Ok(Ok(_))) || !line.ends_with('\n') {
        wr.write_all(b"error\nno complete request line\n").await?;
        return wr.shutdown().await;
    }
    let line = line.trim_end_matches(['\n', '\r']);
    tracing::info!(request = line, "admin request");
    let (status, body) = match answer(line, tenants, data_dir).await {
        Ok((true, body)) => ("ok", body),
        Ok((false, body)) => ("fail", body),
        Err(e) => ("error", format!("{e}\n")),
    };
    wr.write_all(format!("{status}\n").as_bytes()).await?;
    wr.write_all(body.as_bytes()).await?;
    wr.shutdown().await
}

/// (passed, body) for a request.
async fn answer(
    line: &str,
    tenants: &Tenants,
    data_dir: &Path,
) -> Result<(bool, String), RequestError> {
    let (cmd, arg) = line.split_once(' ').unwrap_or((line, ""));
    match cmd {
        "check" if arg.is_empty() => {
            let mut passed = true;
            let mut body = String::new();
            for name in namespaces_on_disk(data_dir)? {
                let tenant = tenants.get(&name).await?;
                let report: CheckReport = blocking(move || {
                    let txn = tenant.db.begin_read().map_err(redb::Error::from)?;
                    ops::check_namespace(&tenant.name, &txn)
                })
                .await?;
                passed &= report.ok();
                body.push_str(&report.to_string());
            }
            Ok((passed, body))
        }
        "export" => {
            let (namespace, doc) = arg.split_once(' ').ok_or(RequestError::Usage)?;
            let doc = ops::parse_doc_id(doc)?;
            ops::existing_namespace(data_dir, namespace)?;
            let tenant = tenants.get(namespace).await?;
            let text = blocking(move || {
                let txn = tenant.db.begin_read().map_err(redb::Error::from)?;
                ops::export_document(&tenant.name, &txn, doc)
            })
            .await?;
            Ok((true, text))
        }
        "backup" if Path::new(arg).is_absolute() => {
            let dest = PathBuf::from(arg);
            let created = ops::prepare_backup_dest(&dest)?;
            let result = backup_running(tenants, data_dir, &dest).await;
            match result {
                Ok(report) => Ok((true, report.to_string())),
                Err(e) => {
                    ops::discard_backup(&dest, created);
                    Err(e)
                }
            }
        }
        _ => Err(RequestError::Unknown(line.to_owned())),
    }
}

async fn backup_running(
    tenants: &Tenants,
    data_dir: &Path,
    dest: &Path,
) -> Result<BackupReport, RequestError> {
    let mut report = BackupReport::default();
    for name in namespaces_on_disk(data_dir)? {
        let tenant = tenants.get(&name).await?;
        let dest = dest.to_owned();
        let rows = blocking(move || {
            let txn = tenant.db.begin_read().map_err(redb::Error::from)?;
            ops::backup_namespace(&tenant.name, &txn, &dest)
        })
        .await?;
        report.namespaces.push((name, rows));
    }
    let (data, to) = (data_dir.to_owned(), dest.to_owned());
    report.tokens = blocking(move || {
        let copied = ops::backup_tokens(&data, &to)?;
        ops::finish_backup(&to)?;
        Ok(copied)
    })
    .await?;
    Ok(report)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, OpsError> + Send + 'static,
) -> Result<T, RequestError> {
    Ok(tokio::task::spawn_blocking(f).await??)
}

// ---------------------------------------------------------------- client side

/// A running server's reply.
enum Reply {
    Ok(String),
    Fail(String),
    Error(String),
}

/// Sends `request` to the server running on `data`; `None` if none is
/// (no socket, or a stale one nobody listens on).
fn ask(data: &Path, request: &str) -> Result<Option<Reply>, AdminError> {
    let path = data.join(SOCKET_FILE);
    let err = |source| AdminError::Socket {
        path: path.clone(),
        source,
    };
    let mut stream = match std::os::unix::net::UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(err(e)),
    };
    stream
        .write_all(format!("{request}\n").as_bytes())
        .map_err(err)?;
    stream.shutdown(std::net::Shutdown::Write).map_err(err)?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).map_err(err)?;
    let reply = String::from_utf8(reply).map_err(|_| {
        err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the reply is not UTF-8",
        ))
    })?;
    let (status, body) = reply.split_once('\n').unwrap_or((reply.as_str(), ""));
    let body = body.to_owned();
    match status {
        "ok" => Ok(Some(Reply::Ok(body))),
        "fail" => Ok(Some(Reply::Fail(body))),
        "error" => Ok(Some(Reply::Error(body.trim_end().to_owned()))),
        other => Err(err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unexpected reply status {other:?}"),
        ))),
    }
}

fn write_out(out: &mut dyn Write, s: &str) -> Result<(), AdminError> {
    out.write_all(s.as_bytes())
        .and_then(|()| out.flush())
        .map_err(AdminError::Output)
}

/// `notesync-server export`: writes the document's text to `out`.
pub fn export(
    data: &Path,
    namespace: &str,
    doc: &str,
    out: &mut dyn Write,
) -> Result<(), AdminError> {
    let id = ops::parse_doc_id(doc)?;
    if namespace.contains(char::is_whitespace) {
        return Err(OpsError::NoNamespace {
            namespace: namespace.to_owned(),
            data: data.to_owned(),
        }
        .into());
    }
    let text = match ask(data, &format!("export {namespace} {id:032x}"))? {
        Some(Reply::Ok(text)) => text,
        Some(Reply::Fail(e) | Reply::Error(e)) => return Err(AdminError::Server(e)),
        None => ops::export_offline(data, namespace, id)?,
    };
    write_out(out, &text)
}

/// `notesync-server check`: writes the report to `out`; an error if it
/// found problems.
pub fn check(data: &Path, out: &mut dyn Write) -> Result<(), AdminError> {
    match ask(data, "check")? {
        Some(Reply::Ok(body)) => write_out(out, &body),
        Some(Reply::Fail(body)) => {
            write_out(out, &body)?;
            Err(AdminError::Server(
                "the check found problems (listed above)".into(),
            ))
        }
        Some(Reply::Error(e)) => Err(AdminError::Server(e)),
        None => {
            let reports = ops::check_offline(data)?;
            let mut problems = 0;
            for r in &reports {
                write_out(out, &r.to_string())?;
                problems += r.problem_count;
            }
            if problems > 0 {
                Err(AdminError::Problems(problems))
            } else {
                Ok(())
            }
        }
    }
}

/// `notesync-server backup`: copies the data folder to `dest` (which must
/// not exist or be empty) and writes what it copied to `out`.
pub fn backup(data: &Path, dest: &Path, out: &mut dyn Write) -> Result<(), AdminError> {
    let absolute = |p: &Path| {
        std::path::absolute(p).map_err(|source| AdminError::Resolve {
            path: p.to_owned(),
            source,
        })
    };
    let dest = absolute(dest)?;
    let data_abs = std::fs::canonicalize(data).or_else(|_| absolute(data))?;
    let dest_in = std::fs::canonicalize(dest.parent().unwrap_or(&dest))
        .map(|p| p.join(dest.file_name().unwrap_or_default()))
        .unwrap_or_else(|_| dest.clone());
    if dest_in.starts_with(&data_abs) {
        return Err(AdminError::Server(format!(
            "backup destination {} is inside the data folder {}; choose a folder outside it",
            dest.display(),
            data_abs.display()
        )));
    }
    let dest_str = dest.to_str().filter(|s| !s.contains('\n')).ok_or_else(|| {
        AdminError::Server(format!(
            "backup destination {} must be valid UTF-8 without line breaks",
            dest.display()
        ))
    })?;
    let body = match ask(data, &format!("backup {dest_str}"))? {
        Some(Reply::Ok(body)) => body,
        Some(Reply::Fail(e) | Reply::Error(e)) => return Err(AdminError::Server(e)),
        None => ops::backup_offline(data, &dest)?.to_string(),
    };
    write_out(out, &body)
}
