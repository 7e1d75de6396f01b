//! SQLite state: tokens, nodes, certificates, instructions and their replies.
//!
//! All times are integers, milliseconds since the Unix epoch. The connection sits behind a
//! `std::sync::Mutex`; every method holds it for one short statement or transaction and never
//! across an `.await`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use runos_protocol::{Envelope, MessageType, Tag};
use rusqlite::{Connection, OptionalExtension as _, TransactionBehavior, params};

use crate::Error;

/// The schema version this binary writes (`PRAGMA user_version`).
pub(crate) const SCHEMA_VERSION: i64 = 1;

const SCHEMA_V1: &str = "
CREATE TABLE tokens (
    hash         TEXT PRIMARY KEY,
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL,
    used_at      INTEGER,
    used_by_node TEXT
);
CREATE TABLE nodes (
    id                TEXT PRIMARY KEY,
    machine_id        TEXT NOT NULL,
    hostname          TEXT NOT NULL,
    os                TEXT NOT NULL,
    agent_version     TEXT NOT NULL,
    registered_at     INTEGER NOT NULL,
    last_seen_at      INTEGER,
    boot_id           TEXT,
    revoked_at        INTEGER,
    instruction_types TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX nodes_hostname ON nodes(hostname);
CREATE TABLE certificates (
    serial_hex TEXT PRIMARY KEY,
    node_id    TEXT NOT NULL REFERENCES nodes(id),
    not_before INTEGER NOT NULL,
    not_after  INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE INDEX certificates_node ON certificates(node_id);
CREATE TABLE instructions (
    tag            TEXT PRIMARY KEY,
    node_id        TEXT NOT NULL REFERENCES nodes(id),
    type           TEXT NOT NULL,
    json_b64       TEXT NOT NULL,
    timeout_ms     INTEGER,
    created_at     INTEGER NOT NULL,
    sent_count     INTEGER NOT NULL DEFAULT 0,
    last_sent_at   INTEGER,
    reply_type     TEXT,
    reply_json_b64 TEXT,
    replied_at     INTEGER
);
CREATE INDEX instructions_node_pending ON instructions(node_id, replied_at, created_at);
";

/// Why a token could not be consumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenProblem {
    Unknown,
    Expired,
    Used,
}

/// A node to insert at enrolment.
#[derive(Debug)]
pub(crate) struct NewNode<'a> {
    pub id: &'a str,
    pub machine_id: &'a str,
    pub hostname: &'a str,
    pub os: &'a str,
    pub agent_version: &'a str,
}

/// A certificate to record.
#[derive(Debug)]
pub(crate) struct NewCert<'a> {
    pub serial_hex: &'a str,
    pub not_before_ms: i64,
    pub not_after_ms: i64,
}

/// A node row with derived facts.
#[derive(Debug, Clone)]
pub(crate) struct NodeRow {
    pub id: String,
    pub machine_id: String,
    pub hostname: String,
    pub os: String,
    pub agent_version: String,
    pub registered_at: i64,
    pub last_seen_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub instruction_types: Vec<String>,
    pub cert_not_after: Option<i64>,
    pub pending: u32,
}

/// A certificate row.
#[derive(Debug, Clone)]
pub(crate) struct CertRow {
    pub node_id: String,
    pub revoked_at: Option<i64>,
}

/// A stored final reply.
#[derive(Debug, Clone)]
pub(crate) struct StoredReply {
    pub kind: String,
    pub json_b64: String,
}

/// The state database.
#[derive(Debug)]
pub(crate) struct Db {
    conn: Mutex<Option<Connection>>,
    path: PathBuf,
}

impl Db {
    /// Open (creating if needed) the database at `path`, in WAL mode, schema up to date.
    pub fn open(path: &Path) -> Result<Db, Error> {
        let existed = path.exists();
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(mode, "SQLite did not switch to WAL mode");
        }
        conn.execute_batch("PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON;")?;
        if !existed {
            crate::util::chmod(path, 0o600)?;
        }
        let mut db = Db {
            conn: Mutex::new(Some(conn)),
            path: path.to_path_buf(),
        };
        db.migrate()?;
        Ok(db)
    }

    fn migrate(&mut self) -> Result<(), Error> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let v: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
            if v == 0 {
                tx.execute_batch(SCHEMA_V1)?;
                tx.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))?;
            }
            tx.commit()?;
            Ok(v)
        })
        .and_then(|v| {
            if v > SCHEMA_VERSION {
                Err(Error::Schema(format!(
                    "{} has schema version {v}, newer than this binary's {SCHEMA_VERSION}; \
                     use a newer runos-controlplane",
                    self.path.display()
                )))
            } else {
                Ok(())
            }
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> Result<T, Error> {
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let conn = guard.as_mut().ok_or(Error::ShuttingDown)?;
        Ok(f(conn)?)
    }

    /// Run `f` while holding SQLite's write lock (`BEGIN IMMEDIATE`), so that other processes
    /// using the same data directory wait. Used to create the CA exactly once.
    pub fn with_write_lock<T>(&self, f: impl FnOnce() -> Result<T, Error>) -> Result<T, Error> {
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let conn = guard.as_mut().ok_or(Error::ShuttingDown)?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = f()?;
        tx.commit()?;
        Ok(out)
    }

    /// Close the connection (checkpointing the WAL). Later calls fail with `ShuttingDown`.
    pub fn close(&self) {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(c) = conn
            && let Err((_, e)) = c.close()
        {
            tracing::warn!(error = %e, "closing the database failed");
        }
    }

    // ---- tokens ----

    pub fn insert_token(&self, hash: &str, now: i64, expires_at: i64) -> Result<(), Error> {
        self.with(|c| {
            c.execute(
                "INSERT INTO tokens (hash, created_at, expires_at) VALUES (?1, ?2, ?3)",
                params![hash, now, expires_at],
            )
        })?;
        Ok(())
    }

    /// Whether the token could be used now (without consuming it).
    pub fn token_status(
        &self,
        token_hash: &str,
        now: i64,
    ) -> Result<Result<(), TokenProblem>, Error> {
        let row: Option<(Option<i64>, i64)> = self.with(|c| {
            c.query_row(
                "SELECT used_at, expires_at FROM tokens WHERE hash = ?1",
                params![token_hash],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
        })?;
        Ok(match row {
            None => Err(TokenProblem::Unknown),
            Some((Some(_), _)) => Err(TokenProblem::Used),
            Some((None, exp)) if exp <= now => Err(TokenProblem::Expired),
            Some(_) => Ok(()),
        })
    }

    /// Consume the token and record the node and its certificate, in one transaction. The token
    /// is consumed by a single conditional UPDATE, so two concurrent enrolments with the same
    /// token cannot both succeed.
    pub fn enrol(
        &self,
        token_hash: &str,
        now: i64,
        node: &NewNode<'_>,
        cert: &NewCert<'_>,
    ) -> Result<Result<(), TokenProblem>, Error> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let n = tx.execute(
                "UPDATE tokens SET used_at = ?1, used_by_node = ?2 \
                 WHERE hash = ?3 AND used_at IS NULL AND expires_at > ?1",
                params![now, node.id, token_hash],
            )?;
            if n == 0 {
                let row: Option<(Option<i64>, i64)> = tx
                    .query_row(
                        "SELECT used_at, expires_at FROM tokens WHERE hash = ?1",
                        params![token_hash],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?;
                let problem = match row {
                    None => TokenProblem::Unknown,
                    Some((Some(_), _)) => TokenProblem::Used,
                    Some((None, _)) => TokenProblem::Expired,
                };
                return Ok(Err(problem));
            }
            tx.execute(
                "INSERT INTO nodes (id, machine_id, hostname, os, agent_version, registered_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    node.id,
                    node.machine_id,
                    node.hostname,
                    node.os,
                    node.agent_version,
                    now
                ],
            )?;
            tx.execute(
                "INSERT INTO certificates (serial_hex, node_id, not_before, not_after) \
                 VALUES (?1, ?2, ?3, ?4)",
                params![
                    cert.serial_hex,
                    node.id,
                    cert.not_before_ms,
                    cert.not_after_ms
                ],
            )?;
            tx.commit()?;
            Ok(Ok(()))
        })
    }

    // ---- nodes ----

    /// Ids of the nodes whose id is `key`, or else whose hostname is `key`.
    pub fn find_nodes(&self, key: &str) -> Result<Vec<String>, Error> {
        self.with(|c| {
            let by_id: Option<String> = c
                .query_row("SELECT id FROM nodes WHERE id = ?1", params![key], |r| {
                    r.get(0)
                })
                .optional()?;
            if let Some(id) = by_id {
                return Ok(vec![id]);
            }
            let mut st = c.prepare("SELECT id FROM nodes WHERE hostname = ?1 ORDER BY id")?;
            let ids = st
                .query_map(params![key], |r| r.get(0))?
                .collect::<rusqlite::Result<Vec<String>>>()?;
            if !ids.is_empty() {
                return Ok(ids);
            }
            // A unique prefix of an id (at least 4 characters, only id characters).
            if key.len() < 4
                || !key
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                return Ok(Vec::new());
            }
            let mut st = c.prepare(
                "SELECT id FROM nodes WHERE substr(id, 1, length(?1)) = ?1 ORDER BY id LIMIT 2",
            )?;
            let ids = st
                .query_map(params![key], |r| r.get(0))?
                .collect::<rusqlite::Result<Vec<String>>>()?;
            Ok(ids)
        })
    }

    const NODE_SELECT: &'static str = "SELECT n.id, n.machine_id, n.hostname, n.os, \
        n.agent_version, n.registered_at, n.last_seen_at, n.revoked_at, n.instruction_types, \
        (SELECT MAX(not_after) FROM certificates c WHERE c.node_id = n.id AND c.revoked_at IS NULL), \
        (SELECT COUNT(*) FROM instructions i WHERE i.node_id = n.id AND i.replied_at IS NULL) \
        FROM nodes n";

    fn node_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<NodeRow> {
        let types: String = r.get(8)?;
        let pending: i64 = r.get(10)?;
        Ok(NodeRow {
            id: r.get(0)?,
            machine_id: r.get(1)?,
            hostname: r.get(2)?,
            os: r.get(3)?,
            agent_version: r.get(4)?,
            registered_at: r.get(5)?,
            last_seen_at: r.get(6)?,
            revoked_at: r.get(7)?,
            instruction_types: serde_json::from_str(&types).unwrap_or_default(),
            cert_not_after: r.get(9)?,
            pending: u32::try_from(pending).unwrap_or(u32::MAX),
        })
    }

    pub fn node(&self, id: &str) -> Result<Option<NodeRow>, Error> {
        self.with(|c| {
            c.query_row(
                &format!("{} WHERE n.id = ?1", Self::NODE_SELECT),
                params![id],
                Self::node_from_row,
            )
            .optional()
        })
    }

    pub fn nodes(&self) -> Result<Vec<NodeRow>, Error> {
        self.with(|c| {
            let mut st = c.prepare(&format!(
                "{} ORDER BY n.registered_at, n.id",
                Self::NODE_SELECT
            ))?;
            let rows = st
                .query_map([], Self::node_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    pub fn update_hello(
        &self,
        id: &str,
        hostname: &str,
        agent_version: &str,
        boot_id: &str,
        instruction_types: &[String],
        now: i64,
    ) -> Result<(), Error> {
        let types = serde_json::to_string(instruction_types).unwrap_or_else(|_| "[]".into());
        self.with(|c| {
            c.execute(
                "UPDATE nodes SET hostname = ?2, agent_version = ?3, boot_id = ?4, \
                 instruction_types = ?5, last_seen_at = ?6 WHERE id = ?1",
                params![id, hostname, agent_version, boot_id, types, now],
            )
        })?;
        Ok(())
    }

    pub fn touch(&self, id: &str, now: i64) -> Result<(), Error> {
        self.with(|c| {
            c.execute(
                "UPDATE nodes SET last_seen_at = ?2 WHERE id = ?1",
                params![id, now],
            )
        })?;
        Ok(())
    }

    /// Mark the node and all its certificates revoked (idempotent).
    pub fn revoke(&self, id: &str, now: i64) -> Result<(), Error> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute(
                "UPDATE nodes SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
                params![id, now],
            )?;
            tx.execute(
                "UPDATE certificates SET revoked_at = ?2 WHERE node_id = ?1 AND revoked_at IS NULL",
                params![id, now],
            )?;
            tx.commit()
        })?;
        Ok(())
    }

    // ---- certificates ----

    /// Record a renewed certificate of `node_id`, in one transaction with the checks that the
    /// node and the certificate the request came with are still unrevoked. `Ok(false)` when
    /// either is revoked (or unknown): nothing is recorded.
    pub fn renew_cert(
        &self,
        node_id: &str,
        presented_serial: &str,
        cert: &NewCert<'_>,
    ) -> Result<bool, Error> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let node_ok: Option<i64> = tx
                .query_row(
                    "SELECT 1 FROM nodes WHERE id = ?1 AND revoked_at IS NULL",
                    params![node_id],
                    |r| r.get(0),
                )
                .optional()?;
            let cert_ok: Option<i64> = tx
                .query_row(
                    "SELECT 1 FROM certificates WHERE serial_hex = ?1 AND node_id = ?2 \
                     AND revoked_at IS NULL",
                    params![presented_serial, node_id],
                    |r| r.get(0),
                )
                .optional()?;
            if node_ok.is_none() || cert_ok.is_none() {
                return Ok(false);
            }
            tx.execute(
                "INSERT INTO certificates (serial_hex, node_id, not_before, not_after) \
                 VALUES (?1, ?2, ?3, ?4)",
                params![
                    cert.serial_hex,
                    node_id,
                    cert.not_before_ms,
                    cert.not_after_ms
                ],
            )?;
            tx.commit()?;
            Ok(true)
        })
    }

    pub fn cert(&self, serial_hex: &str) -> Result<Option<CertRow>, Error> {
        self.with(|c| {
            c.query_row(
                "SELECT node_id, revoked_at FROM certificates WHERE serial_hex = ?1",
                params![serial_hex],
                |r| {
                    Ok(CertRow {
                        node_id: r.get(0)?,
                        revoked_at: r.get(1)?,
                    })
                },
            )
            .optional()
        })
    }

    // ---- instructions ----

    /// Store a new instruction. `Ok(false)` when the tag is already used.
    pub fn insert_instruction(
        &self,
        node_id: &str,
        env: &Envelope,
        now: i64,
    ) -> Result<bool, Error> {
        let timeout = env.timeout_ms.map(|t| i64::try_from(t).unwrap_or(i64::MAX));
        let n = self.with(|c| {
            c.execute(
                "INSERT OR IGNORE INTO instructions (tag, node_id, type, json_b64, timeout_ms, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    env.tag.to_string(),
                    node_id,
                    env.kind.as_str(),
                    env.json_b64,
                    timeout,
                    now
                ],
            )
        })?;
        Ok(n == 1)
    }

    /// The node's instructions without a final reply, oldest first.
    #[cfg(test)]
    pub fn pending(&self, node_id: &str) -> Result<Vec<Envelope>, Error> {
        let rows: Vec<(String, String, String, Option<i64>)> = self.with(|c| {
            let mut st = c.prepare(
                "SELECT tag, type, json_b64, timeout_ms FROM instructions \
                 WHERE node_id = ?1 AND replied_at IS NULL ORDER BY created_at, rowid",
            )?;
            let rows = st
                .query_map(params![node_id], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })?;
        Ok(rows
            .into_iter()
            .filter_map(|(tag, kind, json_b64, timeout)| {
                instruction_env(tag, kind, json_b64, timeout)
            })
            .collect())
    }

    /// The node's instructions without a final reply whose row id is above `after`, oldest
    /// first, at most `limit` of them, with their row ids. A stored row that no longer parses
    /// is reported and comes back as `None`, so that the caller can move past it.
    pub fn pending_after(
        &self,
        node_id: &str,
        after: i64,
        limit: u32,
    ) -> Result<Vec<(i64, Option<Envelope>)>, Error> {
        let rows: Vec<(i64, String, String, String, Option<i64>)> = self.with(|c| {
            let mut st = c.prepare(
                "SELECT rowid, tag, type, json_b64, timeout_ms FROM instructions \
                 WHERE node_id = ?1 AND replied_at IS NULL AND rowid > ?2 \
                 ORDER BY rowid LIMIT ?3",
            )?;
            let rows = st
                .query_map(params![node_id, after, limit], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })?;
        Ok(rows
            .into_iter()
            .map(|(rowid, tag, kind, json_b64, timeout)| {
                (rowid, instruction_env(tag, kind, json_b64, timeout))
            })
            .collect())
    }

    /// One of the node's instructions, as stored, if it has no final reply yet.
    pub fn pending_instruction(&self, node_id: &str, tag: &Tag) -> Result<Option<Envelope>, Error> {
        let row: Option<(String, String, String, Option<i64>)> = self.with(|c| {
            c.query_row(
                "SELECT tag, type, json_b64, timeout_ms FROM instructions \
                 WHERE tag = ?1 AND node_id = ?2 AND replied_at IS NULL",
                params![tag.to_string(), node_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()
        })?;
        Ok(row.and_then(|(tag, kind, json_b64, timeout)| {
            instruction_env(tag, kind, json_b64, timeout)
        }))
    }

    pub fn mark_sent(&self, tag: &Tag, now: i64) -> Result<(), Error> {
        self.with(|c| {
            c.execute(
                "UPDATE instructions SET sent_count = sent_count + 1, last_sent_at = ?2 WHERE tag = ?1",
                params![tag.to_string(), now],
            )
        })?;
        Ok(())
    }

    /// The node an instruction was sent to.
    pub fn instruction_node(&self, tag: &Tag) -> Result<Option<String>, Error> {
        self.with(|c| {
            c.query_row(
                "SELECT node_id FROM instructions WHERE tag = ?1",
                params![tag.to_string()],
                |r| r.get(0),
            )
            .optional()
        })
    }

    /// Store the final reply unless one is stored already. `true` when this was the first.
    pub fn store_reply(
        &self,
        tag: &Tag,
        kind: &str,
        json_b64: &str,
        now: i64,
    ) -> Result<bool, Error> {
        let n = self.with(|c| {
            c.execute(
                "UPDATE instructions SET reply_type = ?2, reply_json_b64 = ?3, replied_at = ?4 \
                 WHERE tag = ?1 AND replied_at IS NULL",
                params![tag.to_string(), kind, json_b64, now],
            )
        })?;
        Ok(n == 1)
    }

    /// The stored final reply of an instruction: `None` when the tag is unknown,
    /// `Some(None)` when no reply arrived yet.
    pub fn reply(&self, tag: &Tag) -> Result<Option<Option<StoredReply>>, Error> {
        self.with(|c| {
            c.query_row(
                "SELECT reply_type, reply_json_b64 FROM instructions WHERE tag = ?1",
                params![tag.to_string()],
                |r| {
                    let kind: Option<String> = r.get(0)?;
                    let json_b64: Option<String> = r.get(1)?;
                    Ok(kind
                        .zip(json_b64)
                        .map(|(kind, json_b64)| StoredReply { kind, json_b64 }))
                },
            )
            .optional()
        })
    }
}

/// A stored instruction row as an envelope; `None` (reported) when it no longer parses. Rows are
/// validated on insert, so that means the database was changed behind our back.
fn instruction_env(
    tag: String,
    kind: String,
    json_b64: String,
    timeout: Option<i64>,
) -> Option<Envelope> {
    match (Tag::parse(&tag), MessageType::new(kind)) {
        (Ok(tag), Ok(kind)) => Some(Envelope {
            kind,
            tag,
            json_b64,
            timeout_ms: timeout.and_then(|t| u64::try_from(t).ok()),
        }),
        _ => {
            tracing::error!(tag, "stored instruction is malformed; skipped");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node<'a>(id: &'a str) -> NewNode<'a> {
        NewNode {
            id,
            machine_id: "m",
            hostname: "h",
            os: "linux",
            agent_version: "0.1.0",
        }
    }

    #[test]
    fn tokens_are_consumed_once_and_problems_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("state.db")).unwrap();
        db.insert_token("good", 1000, 5000).unwrap();
        db.insert_token("old", 1000, 1500).unwrap();
        let cert = |s| NewCert {
            serial_hex: s,
            not_before_ms: 0,
            not_after_ms: 1,
        };
        assert_eq!(
            db.enrol("good", 2000, &node("n1"), &cert("01")).unwrap(),
            Ok(())
        );
        assert_eq!(
            db.enrol("good", 2001, &node("n2"), &cert("02")).unwrap(),
            Err(TokenProblem::Used)
        );
        assert_eq!(
            db.enrol("old", 2000, &node("n3"), &cert("03")).unwrap(),
            Err(TokenProblem::Expired)
        );
        assert_eq!(
            db.enrol("nope", 2000, &node("n4"), &cert("04")).unwrap(),
            Err(TokenProblem::Unknown)
        );
        assert!(db.node("n1").unwrap().is_some());
        assert!(db.node("n2").unwrap().is_none());
        assert_eq!(db.cert("01").unwrap().unwrap().node_id, "n1");
    }

    #[test]
    fn replies_are_stored_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("state.db")).unwrap();
        db.insert_token("t", 0, i64::MAX).unwrap();
        db.enrol(
            "t",
            1,
            &node("n1"),
            &NewCert {
                serial_hex: "01",
                not_before_ms: 0,
                not_after_ms: 1,
            },
        )
        .unwrap()
        .unwrap();
        let env = Envelope::with_type("RUN_COMMAND", Tag::random(), &serde_json::json!({}));
        assert!(db.insert_instruction("n1", &env, 5).unwrap());
        assert!(!db.insert_instruction("n1", &env, 6).unwrap());
        assert_eq!(db.pending("n1").unwrap(), vec![env.clone()]);
        assert_eq!(db.node("n1").unwrap().unwrap().pending, 1);
        assert_eq!(
            db.pending_instruction("n1", &env.tag).unwrap(),
            Some(env.clone())
        );
        assert_eq!(db.pending_instruction("n2", &env.tag).unwrap(), None);
        let after = db.pending_after("n1", 0, 10).unwrap();
        assert_eq!(after.len(), 1);
        assert_eq!(after[0].1, Some(env.clone()));
        assert!(db.pending_after("n1", after[0].0, 10).unwrap().is_empty());
        assert!(db.store_reply(&env.tag, "NO_CONTENT", "e30=", 7).unwrap());
        assert!(!db.store_reply(&env.tag, "ERROR", "e30=", 8).unwrap());
        let r = db.reply(&env.tag).unwrap().unwrap().unwrap();
        assert_eq!(r.kind, "NO_CONTENT");
        assert!(db.pending("n1").unwrap().is_empty());
        assert_eq!(db.pending_instruction("n1", &env.tag).unwrap(), None);
        assert_eq!(db.reply(&Tag::random()).unwrap().map(|_| ()), None);
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.db");
        drop(Db::open(&p).unwrap());
        {
            let c = Connection::open(&p).unwrap();
            c.execute_batch("PRAGMA user_version = 99").unwrap();
        }
        assert!(matches!(Db::open(&p), Err(Error::Schema(_))));
    }
}
