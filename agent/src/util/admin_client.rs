//! The client side of the admin socket (`crate::daemon::admin`): one line of JSON each way,
//! bounded in time and size. Used by the CLI and by the updater's hand-off.

use std::io::{BufRead as _, Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

/// Bound on talking to the daemon.
pub const SOCKET_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest answer read from the daemon.
const MAX_ANSWER: u64 = 4 * 1024 * 1024;

/// Why an admin request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminError {
    /// No daemon answers on the socket (or its answer is unreadable).
    NotRunning(String),
    /// The daemon answered `{"error": …}`.
    Refused(String),
}

/// Send `req` (one line of JSON) to the daemon at `socket` and read its one-line answer.
pub fn request(socket: &Path, req: &Value) -> Result<Value, AdminError> {
    talk(socket, req)
        .map_err(AdminError::NotRunning)
        .and_then(|v| match v.get("error").and_then(Value::as_str) {
            Some(e) => Err(AdminError::Refused(format!(
                "the daemon refused the request: {e}"
            ))),
            None => Ok(v),
        })
}

fn talk(socket: &Path, req: &Value) -> Result<Value, String> {
    talk_with(socket, req, SOCKET_TIMEOUT)
}

/// Send `req` and read the one-line answer, waiting at most `timeout` for it. `Err` when no
/// daemon answers (an `{"error": …}` answer is returned as it is).
pub fn talk_with(socket: &Path, req: &Value, timeout: Duration) -> Result<Value, String> {
    let mut s = UnixStream::connect(socket).map_err(|e| format!("{}: {e}", socket.display()))?;
    s.set_read_timeout(Some(timeout))
        .and_then(|()| s.set_write_timeout(Some(SOCKET_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    let mut line = req.to_string().into_bytes();
    line.push(b'\n');
    s.write_all(&line)
        .map_err(|e| format!("sending the request: {e}"))?;
    let mut line = Vec::new();
    std::io::BufReader::new((&s).take(MAX_ANSWER))
        .read_until(b'\n', &mut line)
        .map_err(|e| format!("reading the answer: {e}"))?;
    serde_json::from_slice(&line).map_err(|_| "the daemon's answer is not JSON".to_string())
}
