//! What this agent removed: a small file in the executor's state directory, so that a repeated
//! removal is answered `already_done` (with what and when) instead of `not_found`.

use std::io::Read as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The record file's name in the state directory.
pub const RECORD_FILE: &str = "removed-members.json";
/// The most removals remembered (the oldest are forgotten first).
pub const MAX_RECORDS: usize = 64;
const MAX_RECORD_BYTES: u64 = 256 * 1024;

/// One removal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Removal {
    /// The member id (16 hex digits).
    pub id: String,
    /// Its name.
    pub name: String,
    /// Its peer URLs.
    pub peer_urls: Vec<String>,
    /// When it was removed (RFC 3339, UTC).
    pub removed_at: String,
}

impl Removal {
    /// Whether this removal was of `ip` (a peer URL host) or of `id`.
    pub fn matches(&self, ip: Option<IpAddr>, id: Option<u64>) -> bool {
        if let Some(id) = id {
            return crate::info::parse_id(&self.id).ok() == Some(id);
        }
        ip.is_some_and(|ip| crate::rules::peer_urls_match(&self.peer_urls, ip))
    }
}

fn path(dir: &Path) -> PathBuf {
    dir.join(RECORD_FILE)
}

/// The removals recorded in `dir` (none when the file is missing; an unreadable or corrupt file
/// is an error).
pub fn load(dir: &Path) -> Result<Vec<Removal>, String> {
    let p = path(dir);
    let f = match std::fs::File::open(&p) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("cannot read {}: {e}", p.display())),
    };
    let mut buf = Vec::new();
    f.take(MAX_RECORD_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(|e| format!("cannot read {}: {e}", p.display()))?;
    if buf.len() as u64 > MAX_RECORD_BYTES {
        return Err(format!(
            "{} is larger than {MAX_RECORD_BYTES} bytes",
            p.display()
        ));
    }
    serde_json::from_slice(&buf)
        .map_err(|e| format!("{} is not a removal record: {e}", p.display()))
}

/// Add `r` to the record in `dir` (created 0700; the file written atomically, 0600), keeping
/// the newest [`MAX_RECORDS`]. A corrupt record is replaced.
pub fn append(dir: &Path, r: Removal) -> Result<(), String> {
    runos_executors::handle::ensure_dir(dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut all = load(dir).unwrap_or_default();
    all.retain(|x| x.id != r.id);
    all.push(r);
    let cut = all.len().saturating_sub(MAX_RECORDS);
    all.drain(..cut);
    let data = serde_json::to_vec_pretty(&all).map_err(|e| e.to_string())?;
    runos_executors::handle::write_atomic(&path(dir), &data, 0o600)
        .map_err(|e| format!("cannot write {}: {e}", path(dir).display()))
}

/// Now, RFC 3339 UTC.
pub(crate) fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_kept_bounded_and_matched_exactly() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        assert!(load(&dir).unwrap().is_empty());
        for i in 0..(MAX_RECORDS as u64 + 5) {
            append(
                &dir,
                Removal {
                    id: crate::info::id_hex(i + 1),
                    name: format!("n{i}"),
                    peer_urls: vec![format!("https://10.0.{}.{}:2380", i / 250, i % 250 + 1)],
                    removed_at: now_rfc3339(),
                },
            )
            .unwrap();
        }
        let all = load(&dir).unwrap();
        assert_eq!(all.len(), MAX_RECORDS);
        assert_eq!(all.last().unwrap().name, format!("n{}", MAX_RECORDS + 4));
        let last = all.last().unwrap();
        assert!(last.matches(Some("10.0.0.69".parse().unwrap()), None));
        assert!(!last.matches(Some("10.0.0.6".parse().unwrap()), None));
        assert!(last.matches(None, Some(MAX_RECORDS as u64 + 5)));
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.join(RECORD_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(dir.join(RECORD_FILE), b"{nope").unwrap();
        assert!(load(&dir).is_err());
    }
}
