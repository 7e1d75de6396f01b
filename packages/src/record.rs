//! The record of the packages this agent installed: `installed.json` (0600, written
//! atomically) in the package executor's state directory, so that an uninstall can purge
//! exactly those.

use std::collections::BTreeSet;
use std::path::Path;

use runos_protocol::{ErrorCode, ErrorPayload};
use serde::{Deserialize, Serialize};

/// The file's name in the state directory.
pub const FILE: &str = "installed.json";

/// Most names kept (a bound on a file the agent reads back).
pub const MAX_RECORDED: usize = 4096;

#[derive(Debug, Default, Serialize, Deserialize)]
struct File {
    installed: BTreeSet<String>,
}

fn internal(what: &str, e: impl std::fmt::Display) -> ErrorPayload {
    ErrorPayload::new(
        ErrorCode::Internal,
        format!("the package record: {what}: {e}"),
    )
}

/// The recorded names (none when the file does not exist).
pub fn load(dir: &Path) -> Result<BTreeSet<String>, ErrorPayload> {
    let path = dir.join(FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
        Err(e) => return Err(internal("cannot read it", e)),
    };
    if bytes.len() > 1024 * 1024 {
        return Err(internal("cannot read it", "larger than 1 MiB"));
    }
    let f: File = serde_json::from_slice(&bytes).map_err(|e| internal("cannot parse it", e))?;
    Ok(f.installed)
}

/// Add `added` and drop `dropped`, then write the file (atomically, 0600; the directory is
/// created 0700).
pub fn update(
    dir: &Path,
    added: impl IntoIterator<Item = String>,
    dropped: &[String],
) -> Result<(), ErrorPayload> {
    let mut names = load(dir)?;
    let before = names.clone();
    names.extend(added);
    for d in dropped {
        names.remove(d);
    }
    if names == before {
        return Ok(());
    }
    if names.len() > MAX_RECORDED {
        return Err(internal("cannot write it", "too many names"));
    }
    runos_executors::handle::ensure_dir(dir)
        .map_err(|e| internal("cannot create its directory", e))?;
    let data = serde_json::to_vec_pretty(&File { installed: names })
        .map_err(|e| internal("cannot encode it", e))?;
    runos_executors::handle::write_atomic(&dir.join(FILE), &data, 0o600)
        .map_err(|e| internal("cannot write it", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("packages");
        assert!(load(&dir).unwrap().is_empty());
        update(&dir, ["b".to_string(), "a".to_string()], &[]).unwrap();
        update(&dir, ["c".to_string()], &["b".to_string()]).unwrap();
        assert_eq!(
            load(&dir).unwrap().into_iter().collect::<Vec<_>>(),
            ["a", "c"]
        );
        let mode = std::fs::metadata(dir.join(FILE))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::write(dir.join(FILE), b"not json").unwrap();
        assert_eq!(load(&dir).unwrap_err().code, ErrorCode::Internal);
    }
}
