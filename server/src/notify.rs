//! systemd's readiness protocol (`Type=notify`, sd_notify(3)): one
//! datagram such as `READY=1` to the Unix socket named by `$NOTIFY_SOCKET`
//! (a path, or `@name` in the abstract namespace). Without the variable it
//! does nothing, so the server behaves the same outside systemd.
//!
//! Touches only that socket; used by the binary (`main.rs`).

use std::io;
use std::os::unix::net::UnixDatagram;

/// What the service manager is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// `READY=1`: the server is listening.
    Ready,
    /// `STOPPING=1`: graceful shutdown has begun.
    Stopping,
}

impl State {
    fn message(self) -> &'static [u8] {
        match self {
            State::Ready => b"READY=1",
            State::Stopping => b"STOPPING=1",
        }
    }
}

/// Why the notification could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("cannot create a datagram socket for $NOTIFY_SOCKET: {0}")]
    Socket(#[source] io::Error),
    #[error("cannot send {state:?} to $NOTIFY_SOCKET {socket}: {source}")]
    Send {
        state: State,
        socket: String,
        #[source]
        source: io::Error,
    },
}

/// Sends `state` to `$NOTIFY_SOCKET`; `Ok(false)` when the variable is not
/// set (not run by systemd, or a unit without `Type=notify`).
pub fn notify(state: State) -> Result<bool, NotifyError> {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let socket = socket.to_string_lossy().into_owned();
    let sock = UnixDatagram::unbound().map_err(NotifyError::Socket)?;
    send_to(&sock, &socket, state.message()).map_err(|source| NotifyError::Send {
        state,
        socket,
        source,
    })?;
    Ok(true)
}

fn send_to(sock: &UnixDatagram, socket: &str, message: &[u8]) -> io::Result<usize> {
    match socket.strip_prefix('@') {
        Some(name) => send_abstract(sock, name, message),
        None => sock.send_to(message, socket),
    }
}

#[cfg(target_os = "linux")]
fn send_abstract(sock: &UnixDatagram, name: &str, message: &[u8]) -> io::Result<usize> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    sock.send_to_addr(message, &addr)
}

#[cfg(not(target_os = "linux"))]
fn send_abstract(_: &UnixDatagram, _: &str, _: &[u8]) -> io::Result<usize> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract socket names exist only on Linux",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_datagram_reaches_a_path_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let rx = UnixDatagram::bind(&path).expect("bind");
        let tx = UnixDatagram::unbound().expect("socket");
        send_to(&tx, path.to_str().expect("utf-8"), State::Ready.message()).expect("send");
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"READY=1");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_datagram_reaches_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("notesync-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .expect("abstract address");
        let rx = UnixDatagram::bind_addr(&addr).expect("bind");
        let tx = UnixDatagram::unbound().expect("socket");
        send_to(&tx, &format!("@{name}"), State::Stopping.message()).expect("send");
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"STOPPING=1");
    }
}
