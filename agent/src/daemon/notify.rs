//! systemd readiness notification (`sd_notify`) over `$NOTIFY_SOCKET`, without libsystemd.
//! A missing variable means "not under systemd": every call is then a no-op. Failures are
//! logged at debug level and never fatal.

use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The environment variable systemd sets.
pub const NOTIFY_SOCKET_ENV: &str = "NOTIFY_SOCKET";

/// Send `state` (e.g. `READY=1`) to `socket` (a path, or `@name` for an abstract socket).
pub fn send_to(socket: &str, state: &str) -> std::io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    let addr = if let Some(name) = socket.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        SocketAddr::from_abstract_name(name.as_bytes())?
    } else {
        SocketAddr::from_pathname(socket)?
    };
    sock.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}

/// Send `state` to `$NOTIFY_SOCKET` if set.
pub fn notify(state: &str) {
    if let Ok(socket) = std::env::var(NOTIFY_SOCKET_ENV)
        && !socket.is_empty()
        && let Err(e) = send_to(&socket, state)
    {
        tracing::debug!("sd_notify to {socket} failed: {e}");
    }
}

/// `READY=1`.
pub fn ready() {
    notify("READY=1");
}

/// `STATUS=<text>` (newlines replaced).
pub fn status(text: &str) {
    notify(&format!("STATUS={}", text.replace('\n', " ")));
}

/// `STOPPING=1`.
pub fn stopping() {
    notify("STOPPING=1");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_to_a_path_socket() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("notify.sock");
        let listener = UnixDatagram::bind(&p).unwrap();
        send_to(p.to_str().unwrap(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("runos-test-{}", rand::random::<u64>());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        send_to(&format!("@{name}"), "STOPPING=1").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }
}
