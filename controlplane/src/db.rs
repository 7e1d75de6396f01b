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
pub(crate) const SCHEMA_VERSION: i64 = 5;

/// The first schema. `instructions.sent_count` and `last_sent_at` are no longer written (they
/// stay 0 and NULL): nothing read them, and keeping them cost a write transaction per
/// instruction sent. They are kept so that an older binary can still open the database.
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

/// v1 → v2: the CA that issued each certificate (pin, lowercase hex sha256). Rows from v1 are
/// NULL until [`Db::attribute_certs`] assigns them the active CA at start-up (a v1 control
/// plane had one CA and could not rotate it).
const MIGRATE_V2: &str = "
ALTER TABLE certificates ADD COLUMN ca_sha256 TEXT;
CREATE INDEX certificates_ca ON certificates(ca_sha256, not_after);
";

/// v3: when a certificate first carried an admitted session (or probe session). A certificate
/// that was issued but never used (its RENEWED lost, its switch failed) does not count as held.
const MIGRATE_V3: &str = "
ALTER TABLE certificates ADD COLUMN used_at INTEGER;
";

/// v3 → v4: the outcome of each node's last self-update, as its agent reported it in HELLO
/// (JSON of `UpdateReport`).
const MIGRATE_V4: &str = "
ALTER TABLE nodes ADD COLUMN last_update TEXT;
";

/// v4 → v5: the node's WireGuard public key, as its agent reported it in HELLO.
const MIGRATE_V5: &str = "
ALTER TABLE nodes ADD COLUMN wireguard_public_key TEXT;
";

/// The index of a node's instructions without a final reply, in row order: the session takes
/// them from it a chunk at a time above a row id (a seek, where the index of v1, ordered by
/// creation time, read every pending row and sorted them for each chunk). It changes no
/// column, so it is not a schema version: an older binary opens the database as before.
const PENDING_INDEX: &str = "
CREATE INDEX IF NOT EXISTS instructions_node_replied ON instructions(node_id, replied_at);
DROP INDEX IF EXISTS instructions_node_pending;
";

/// Prepared statements kept per connection: every statement this file runs fits, so none is
/// parsed twice.
const STATEMENT_CACHE: usize = 64;

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
    /// The pin of the issuing CA.
    pub ca_sha256: &'a str,
}

/// A node that would be locked out by a CA cutover.
#[derive(Debug, Clone)]
pub(crate) struct BlockerRow {
    pub id: String,
    pub hostname: String,
    pub last_seen_at: Option<i64>,
    /// The latest expiry of its unrevoked certificates from the outgoing CA.
    pub cert_not_after: i64,
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
    /// JSON of the agent's last `UpdateReport`.
    pub last_update: Option<String>,
    /// The node's WireGuard public key.
    pub wireguard_public_key: Option<String>,
}

/// A certificate row.
#[derive(Debug, Clone)]
pub(crate) struct CertRow {
    pub node_id: String,
    pub revoked_at: Option<i64>,
    pub not_after: i64,
}

/// The outcome of [`Db::renew_cert`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Renewal {
    /// The new certificate is recorded.
    Recorded,
    /// The node, or the certificate the request came with, is revoked, expired or unknown.
    Refused,
    /// The node got a certificate moments ago (any session): try again later.
    TooSoon,
}

/// A stored final reply.
#[derive(Debug, Clone)]
pub(crate) struct StoredReply {
    pub kind: String,
    pub json_b64: String,
}

/// What became of a final reply handed to [`Db::store_replies`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stored {
    /// Stored: the instruction's first final reply.
    First,
    /// The instruction has a final reply already; this one is not stored.
    Duplicate,
    /// No instruction has this tag.
    UnknownTag,
    /// The tag is another node's instruction.
    OtherNode,
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
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
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
            let v: i64 = tx
                .prepare_cached("PRAGMA user_version")?
                .query_row([], |r| r.get(0))?;
            if v < SCHEMA_VERSION {
                if v < 1 {
                    tx.execute_batch(SCHEMA_V1)?;
                }
                if v < 2 {
                    tx.execute_batch(MIGRATE_V2)?;
                }
                if v < 3 {
                    tx.execute_batch(MIGRATE_V3)?;
                    // Certificates from before v3 are taken to be in use.
                    tx.execute_batch("UPDATE certificates SET used_at = not_before")?;
                }
                if v < 4 {
                    tx.execute_batch(MIGRATE_V4)?;
                }
                if v < 5 {
                    tx.execute_batch(MIGRATE_V5)?;
                }
                tx.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))?;
            }
            if v <= SCHEMA_VERSION {
                tx.execute_batch(PENDING_INDEX)?;
            }
            tx.commit()?;
            if (1..SCHEMA_VERSION).contains(&v) {
                tracing::info!(from = v, to = SCHEMA_VERSION, "database schema migrated");
            }
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
            c.prepare_cached(
                "INSERT INTO tokens (hash, created_at, expires_at) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![hash, now, expires_at])
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
            c.prepare_cached("SELECT used_at, expires_at FROM tokens WHERE hash = ?1")?
                .query_row(params![token_hash], |r| Ok((r.get(0)?, r.get(1)?)))
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
            let n = tx
                .prepare_cached(
                    "UPDATE tokens SET used_at = ?1, used_by_node = ?2 \
                 WHERE hash = ?3 AND used_at IS NULL AND expires_at > ?1",
                )?
                .execute(params![now, node.id, token_hash])?;
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
            tx.prepare_cached(
                "INSERT INTO nodes (id, machine_id, hostname, os, agent_version, registered_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                node.id,
                node.machine_id,
                node.hostname,
                node.os,
                node.agent_version,
                now
            ])?;
            tx.prepare_cached(
                "INSERT INTO certificates (serial_hex, node_id, not_before, not_after, ca_sha256) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![
                cert.serial_hex,
                node.id,
                cert.not_before_ms,
                cert.not_after_ms,
                cert.ca_sha256
            ])?;
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
            let mut st =
                c.prepare_cached("SELECT id FROM nodes WHERE hostname = ?1 ORDER BY id")?;
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
            let mut st = c.prepare_cached(
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
        (SELECT COUNT(*) FROM instructions i WHERE i.node_id = n.id AND i.replied_at IS NULL), \
        n.last_update, n.wireguard_public_key \
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
            last_update: r.get(11)?,
            wireguard_public_key: r.get(12)?,
        })
    }

    pub fn node(&self, id: &str) -> Result<Option<NodeRow>, Error> {
        self.with(|c| {
            c.prepare_cached(&format!("{} WHERE n.id = ?1", Self::NODE_SELECT))?
                .query_row(params![id], Self::node_from_row)
                .optional()
        })
    }

    pub fn nodes(&self) -> Result<Vec<NodeRow>, Error> {
        self.with(|c| {
            let mut st = c.prepare_cached(&format!(
                "{} ORDER BY n.registered_at, n.id",
                Self::NODE_SELECT
            ))?;
            let rows = st
                .query_map([], Self::node_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    #[allow(clippy::too_many_arguments)] // one column each; a HELLO is recorded in one place
    pub fn update_hello(
        &self,
        id: &str,
        hostname: &str,
        agent_version: &str,
        boot_id: &str,
        instruction_types: &[String],
        last_update: Option<&str>,
        wireguard_public_key: Option<&str>,
        now: i64,
    ) -> Result<(), Error> {
        let types = serde_json::to_string(instruction_types).unwrap_or_else(|_| "[]".into());
        self.with(|c| {
            c.prepare_cached(
                "UPDATE nodes SET hostname = ?2, agent_version = ?3, boot_id = ?4, \
                 instruction_types = ?5, last_seen_at = ?6, \
                 last_update = COALESCE(?7, last_update), \
                 wireguard_public_key = COALESCE(?8, wireguard_public_key) WHERE id = ?1",
            )?
            .execute(params![
                id,
                hostname,
                agent_version,
                boot_id,
                types,
                now,
                last_update,
                wireguard_public_key
            ])
        })?;
        Ok(())
    }

    pub fn touch(&self, id: &str, now: i64) -> Result<(), Error> {
        self.with(|c| {
            c.prepare_cached("UPDATE nodes SET last_seen_at = ?2 WHERE id = ?1")?
                .execute(params![id, now])
        })?;
        Ok(())
    }

    /// Mark the node and all its certificates revoked (idempotent).
    pub fn revoke(&self, id: &str, now: i64) -> Result<(), Error> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.prepare_cached(
                "UPDATE nodes SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
            )?
            .execute(params![id, now])?;
            tx.prepare_cached(
                "UPDATE certificates SET revoked_at = ?2 WHERE node_id = ?1 AND revoked_at IS NULL",
            )?
            .execute(params![id, now])?;
            tx.commit()
        })?;
        Ok(())
    }

    // ---- certificates ----

    /// Record a renewed certificate of `node_id`, in one transaction with the checks that the
    /// node and the certificate the request came with are still unrevoked and unexpired at
    /// `now`, and that the node got no certificate issued after `too_soon_since` (a per-node
    /// rate limit, across sessions). Nothing is recorded unless [`Renewal::Recorded`].
    pub fn renew_cert(
        &self,
        node_id: &str,
        presented_serial: &str,
        cert: &NewCert<'_>,
        now: i64,
        too_soon_since: i64,
    ) -> Result<Renewal, Error> {
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
                     AND revoked_at IS NULL AND not_after > ?3",
                    params![presented_serial, node_id, now],
                    |r| r.get(0),
                )
                .optional()?;
            if node_ok.is_none() || cert_ok.is_none() {
                return Ok(Renewal::Refused);
            }
            // not_before is backdated by the same amount for every node certificate, so the
            // newest one tells when the node last got one.
            let newest: Option<i64> = tx
                .prepare_cached("SELECT MAX(not_before) FROM certificates WHERE node_id = ?1")?
                .query_row(params![node_id], |r| r.get(0))?;
            if newest.is_some_and(|t| t > too_soon_since) {
                return Ok(Renewal::TooSoon);
            }
            tx.prepare_cached(
                "INSERT INTO certificates (serial_hex, node_id, not_before, not_after, ca_sha256) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![
                cert.serial_hex,
                node_id,
                cert.not_before_ms,
                cert.not_after_ms,
                cert.ca_sha256
            ])?;
            tx.commit()?;
            Ok(Renewal::Recorded)
        })
    }

    /// Delete certificates that expired before `before` (ms). The number deleted.
    pub fn prune_certs(&self, before: i64) -> Result<usize, Error> {
        self.with(|c| {
            c.prepare_cached("DELETE FROM certificates WHERE not_after < ?1")?
                .execute(params![before])
        })
    }

    /// Record that the certificate `serial_hex` carried an admitted session (first use only).
    pub fn mark_used(&self, serial_hex: &str, now: i64) -> Result<(), Error> {
        self.with(|c| {
            c.prepare_cached(
                "UPDATE certificates SET used_at = ?2 WHERE serial_hex = ?1 AND used_at IS NULL",
            )?
            .execute(params![serial_hex, now])
        })?;
        Ok(())
    }

    /// Assign certificates recorded without an issuer (by schema v1) to `ca_sha256`, the CA
    /// that is active when the database is first opened by this version. The number assigned.
    pub fn attribute_certs(&self, ca_sha256: &str) -> Result<usize, Error> {
        self.with(|c| {
            c.prepare_cached("UPDATE certificates SET ca_sha256 = ?1 WHERE ca_sha256 IS NULL")?
                .execute(params![ca_sha256])
        })
    }

    /// For each CA: how many unrevoked nodes hold an unrevoked certificate from it that is
    /// valid at `now`.
    pub fn cert_holders(&self, now: i64) -> Result<Vec<(String, u64)>, Error> {
        self.with(|c| {
            let mut st = c.prepare_cached(
                "SELECT c.ca_sha256, COUNT(DISTINCT c.node_id) FROM certificates c \
                 JOIN nodes n ON n.id = c.node_id \
                 WHERE c.revoked_at IS NULL AND n.revoked_at IS NULL AND c.not_after > ?1 \
                 AND c.ca_sha256 IS NOT NULL GROUP BY c.ca_sha256",
            )?;
            let rows = st
                .query_map(params![now], |r| {
                    let n: i64 = r.get(1)?;
                    Ok((r.get(0)?, u64::try_from(n).unwrap_or(0)))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    /// The unrevoked nodes seen (or, never seen, enrolled) at or after `seen_since` that hold
    /// an unrevoked certificate from `old_ca` valid at `now` and none from `new_ca`: a cutover
    /// to `new_ca` would lock them out. The total, and at most `limit` of them, most recently
    /// seen first.
    pub fn cutover_blockers(
        &self,
        old_ca: &str,
        new_ca: &str,
        now: i64,
        seen_since: i64,
        limit: u32,
    ) -> Result<(u64, Vec<BlockerRow>), Error> {
        const FROM: &str = "FROM nodes n JOIN certificates c ON c.node_id = n.id \
             WHERE n.revoked_at IS NULL AND c.revoked_at IS NULL AND c.not_after > ?3 \
             AND c.ca_sha256 = ?1 AND COALESCE(n.last_seen_at, n.registered_at) >= ?4 \
             AND NOT EXISTS (SELECT 1 FROM certificates c2 WHERE c2.node_id = n.id \
                 AND c2.revoked_at IS NULL AND c2.not_after > ?3 AND c2.ca_sha256 = ?2 \
                 AND c2.used_at IS NOT NULL)";
        self.with(|c| {
            let total: i64 = c
                .prepare_cached(&format!("SELECT COUNT(DISTINCT n.id) {FROM}"))?
                .query_row(params![old_ca, new_ca, now, seen_since], |r| r.get(0))?;
            let mut st = c.prepare_cached(&format!(
                "SELECT n.id, n.hostname, n.last_seen_at, MAX(c.not_after) {FROM} \
                 GROUP BY n.id ORDER BY COALESCE(n.last_seen_at, n.registered_at) DESC, n.id \
                 LIMIT ?5"
            ))?;
            let rows = st
                .query_map(params![old_ca, new_ca, now, seen_since, limit], |r| {
                    Ok(BlockerRow {
                        id: r.get(0)?,
                        hostname: r.get(1)?,
                        last_seen_at: r.get(2)?,
                        cert_not_after: r.get(3)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok((u64::try_from(total).unwrap_or(0), rows))
        })
    }

    pub fn cert(&self, serial_hex: &str) -> Result<Option<CertRow>, Error> {
        self.with(|c| {
            c.prepare_cached(
                "SELECT node_id, revoked_at, not_after FROM certificates WHERE serial_hex = ?1",
            )?
            .query_row(params![serial_hex], |r| {
                Ok(CertRow {
                    node_id: r.get(0)?,
                    revoked_at: r.get(1)?,
                    not_after: r.get(2)?,
                })
            })
            .optional()
        })
    }

    // ---- instructions ----

    /// The SQL that stores a new instruction, unless its tag is already used.
    const INSERT_INSTRUCTION: &'static str = "INSERT OR IGNORE INTO instructions \
        (tag, node_id, type, json_b64, timeout_ms, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)";

    /// Store a new instruction. `Ok(false)` when the tag is already used.
    pub fn insert_instruction(
        &self,
        node_id: &str,
        env: &Envelope,
        now: i64,
    ) -> Result<bool, Error> {
        let n = self.with(|c| insert_row(c, node_id, env, now))?;
        Ok(n == 1)
    }

    /// Store new instructions (node id, envelope) in one transaction: all of them, or none when
    /// a tag is already used (`Ok(Err(index))` of the first such one).
    pub fn insert_instructions(
        &self,
        rows: &[(&str, Envelope)],
        now: i64,
    ) -> Result<Result<(), usize>, Error> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            for (i, (node_id, env)) in rows.iter().enumerate() {
                if insert_row(&tx, node_id, env, now)? != 1 {
                    // Dropping the transaction rolls it back.
                    return Ok(Err(i));
                }
            }
            tx.commit()?;
            Ok(Ok(()))
        })
    }

    /// Whether the node exists and is not revoked: `None` when it is unknown.
    pub fn node_revoked(&self, id: &str) -> Result<Option<bool>, Error> {
        self.with(|c| {
            c.prepare_cached("SELECT revoked_at IS NOT NULL FROM nodes WHERE id = ?1")?
                .query_row(params![id], |r| r.get(0))
                .optional()
        })
    }

    /// Whether the instruction stored under `env`'s tag is `env` for `node_id`: same node,
    /// type, `jsonB64` (byte for byte) and `timeoutMs`.
    pub fn instruction_is(&self, node_id: &str, env: &Envelope) -> Result<bool, Error> {
        let timeout = env.timeout_ms.map(|t| i64::try_from(t).unwrap_or(i64::MAX));
        let row = self.with(|c| {
            c.prepare_cached(
                "SELECT node_id, type, json_b64, timeout_ms FROM instructions WHERE tag = ?1",
            )?
            .query_row(params![env.tag.to_string()], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, Option<i64>>(3)?,
                ))
            })
            .optional()
        })?;
        Ok(row.is_some_and(|(node, kind, json_b64, t)| {
            node == node_id && kind == env.kind.as_str() && json_b64 == env.json_b64 && t == timeout
        }))
    }

    /// The node's instructions without a final reply, oldest first.
    #[cfg(test)]
    pub fn pending(&self, node_id: &str) -> Result<Vec<Envelope>, Error> {
        let rows: Vec<(String, String, String, Option<i64>)> = self.with(|c| {
            let mut st = c.prepare_cached(
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
            let mut st = c.prepare_cached(
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
            c.prepare_cached(
                "SELECT tag, type, json_b64, timeout_ms FROM instructions \
                 WHERE tag = ?1 AND node_id = ?2 AND replied_at IS NULL",
            )?
            .query_row(params![tag.to_string(), node_id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .optional()
        })?;
        Ok(row.and_then(|(tag, kind, json_b64, timeout)| {
            instruction_env(tag, kind, json_b64, timeout)
        }))
    }

    /// Store the final replies (tag, type, `jsonB64`) received from `node_id`, in one
    /// transaction, each unless one is stored already; what became of each, in order. A reply
    /// is stored only for an instruction of `node_id`.
    pub fn store_replies(
        &self,
        node_id: &str,
        replies: &[(Tag, &str, &str)],
        now: i64,
    ) -> Result<Vec<Stored>, Error> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut out = Vec::with_capacity(replies.len());
            {
                let mut update = tx.prepare_cached(
                    "UPDATE instructions SET reply_type = ?3, reply_json_b64 = ?4, replied_at = ?5 \
                     WHERE tag = ?1 AND node_id = ?2 AND replied_at IS NULL",
                )?;
                for (tag, kind, json_b64) in replies {
                    let tag = tag.to_string();
                    if update.execute(params![tag, node_id, kind, json_b64, now])? == 1 {
                        out.push(Stored::First);
                        continue;
                    }
                    // Rare: say why nothing was stored.
                    let owner: Option<String> = tx
                        .prepare_cached("SELECT node_id FROM instructions WHERE tag = ?1")?
                        .query_row(params![tag], |r| r.get(0))
                        .optional()?;
                    out.push(match owner {
                        None => Stored::UnknownTag,
                        Some(o) if o != node_id => Stored::OtherNode,
                        Some(_) => Stored::Duplicate,
                    });
                }
            }
            tx.commit()?;
            Ok(out)
        })
    }

    /// The stored final reply of an instruction: `None` when the tag is unknown,
    /// `Some(None)` when no reply arrived yet.
    pub fn reply(&self, tag: &Tag) -> Result<Option<Option<StoredReply>>, Error> {
        self.with(|c| {
            c.prepare_cached("SELECT reply_type, reply_json_b64 FROM instructions WHERE tag = ?1")?
                .query_row(params![tag.to_string()], |r| {
                    let kind: Option<String> = r.get(0)?;
                    let json_b64: Option<String> = r.get(1)?;
                    Ok(kind
                        .zip(json_b64)
                        .map(|(kind, json_b64)| StoredReply { kind, json_b64 }))
                })
                .optional()
        })
    }
}

/// Insert one instruction row (`INSERT OR IGNORE`): the number of rows inserted.
fn insert_row(c: &Connection, node_id: &str, env: &Envelope, now: i64) -> rusqlite::Result<usize> {
    let timeout = env.timeout_ms.map(|t| i64::try_from(t).unwrap_or(i64::MAX));
    c.prepare_cached(Db::INSERT_INSTRUCTION)?.execute(params![
        env.tag.to_string(),
        node_id,
        env.kind.as_str(),
        env.json_b64,
        timeout,
        now
    ])
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
            ca_sha256: "a",
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
                ca_sha256: "a",
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
        assert_eq!(
            db.store_replies(
                "n1",
                &[
                    (env.tag, "NO_CONTENT", "e30="),
                    (env.tag, "ERROR", "e30="),
                    (Tag::random(), "ERROR", "e30=")
                ],
                7
            )
            .unwrap(),
            vec![Stored::First, Stored::Duplicate, Stored::UnknownTag]
        );
        assert_eq!(
            db.store_replies("n2", &[(env.tag, "ERROR", "e30=")], 8)
                .unwrap(),
            vec![Stored::OtherNode]
        );
        let r = db.reply(&env.tag).unwrap().unwrap().unwrap();
        assert_eq!(r.kind, "NO_CONTENT");
        assert!(db.pending("n1").unwrap().is_empty());
        assert_eq!(db.pending_instruction("n1", &env.tag).unwrap(), None);
        assert_eq!(db.reply(&Tag::random()).unwrap().map(|_| ()), None);
    }

    /// A database as schema v1 wrote it: one node with one certificate.
    fn v1_database(p: &Path) {
        let c = Connection::open(p).unwrap();
        c.execute_batch(SCHEMA_V1).unwrap();
        c.execute_batch(
            "PRAGMA user_version = 1;
             INSERT INTO tokens (hash, created_at, expires_at, used_at, used_by_node)
                 VALUES ('t', 1, 2, 1, 'n1');
             INSERT INTO nodes (id, machine_id, hostname, os, agent_version, registered_at)
                 VALUES ('n1', 'm', 'old-host', 'linux', '0.1.0', 1);
             INSERT INTO certificates (serial_hex, node_id, not_before, not_after)
                 VALUES ('01', 'n1', 0, 9000000000000);",
        )
        .unwrap();
    }

    #[test]
    fn a_v1_database_is_migrated_and_its_certificates_attributed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.db");
        v1_database(&p);
        let db = Db::open(&p).unwrap();
        let v: i64 = db
            .with(|c| {
                c.prepare_cached("PRAGMA user_version")?
                    .query_row([], |r| r.get(0))
            })
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        // Existing rows are kept; their issuer is unknown until attributed.
        assert_eq!(db.cert("01").unwrap().unwrap().node_id, "n1");
        assert!(db.cert_holders(1000).unwrap().is_empty());
        assert_eq!(db.attribute_certs("aaaa").unwrap(), 1);
        assert_eq!(db.attribute_certs("bbbb").unwrap(), 0, "attributed once");
        assert_eq!(
            db.cert_holders(1000).unwrap(),
            vec![("aaaa".to_string(), 1)]
        );
        // New rows carry their issuer.
        db.renew_cert(
            "n1",
            "01",
            &NewCert {
                serial_hex: "02",
                not_before_ms: 0,
                not_after_ms: 9_000_000_000_000,
                ca_sha256: "bbbb",
            },
            1000,
            i64::MAX,
        )
        .unwrap();
        let mut holders = db.cert_holders(1000).unwrap();
        holders.sort();
        assert_eq!(
            holders,
            vec![("aaaa".to_string(), 1), ("bbbb".to_string(), 1)]
        );
        drop(db);
        // Opening again is a no-op.
        let db = Db::open(&p).unwrap();
        assert_eq!(db.cert_holders(1000).unwrap().len(), 2);
    }

    #[test]
    fn cutover_blockers_are_recent_unrevoked_nodes_with_only_old_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("state.db")).unwrap();
        let day = 86_400_000;
        let now = 100 * day;
        let enrol = |id: &str, ca: &str, not_after: i64| {
            let token = format!("t-{id}");
            db.insert_token(&token, 0, i64::MAX).unwrap();
            db.enrol(
                &token,
                now - 50 * day,
                &node(id),
                &NewCert {
                    serial_hex: &format!("s-{id}"),
                    not_before_ms: 0,
                    not_after_ms: not_after,
                    ca_sha256: ca,
                },
            )
            .unwrap()
            .unwrap();
        };
        // Seen recently, only an old certificate: blocks.
        enrol("blocker", "old", now + day);
        db.touch("blocker", now - day).unwrap();
        // Renewed to the new CA: does not block.
        enrol("renewed", "old", now + day);
        db.touch("renewed", now - day).unwrap();
        db.renew_cert(
            "renewed",
            "s-renewed",
            &NewCert {
                serial_hex: "s-renewed-2",
                not_before_ms: 0,
                not_after_ms: now + 30 * day,
                ca_sha256: "new",
            },
            now,
            i64::MAX,
        )
        .unwrap();
        db.mark_used("s-renewed-2", now).unwrap();
        // Issued a certificate from the new CA that never carried a session (its RENEWED was
        // lost): still blocks.
        enrol("unproven", "old", now + day);
        db.touch("unproven", now - day).unwrap();
        assert_eq!(
            db.renew_cert(
                "unproven",
                "s-unproven",
                &NewCert {
                    serial_hex: "s-unproven-2",
                    not_before_ms: 0,
                    not_after_ms: now + 30 * day,
                    ca_sha256: "new",
                },
                now,
                i64::MAX,
            )
            .unwrap(),
            Renewal::Recorded
        );
        // Not seen for long: does not block.
        enrol("stale", "old", now + day);
        db.touch("stale", now - 40 * day).unwrap();
        // Its old certificate has expired: cannot connect anyway.
        enrol("expired", "old", now - 1);
        db.touch("expired", now - day).unwrap();
        // Revoked.
        enrol("revoked", "old", now + day);
        db.touch("revoked", now - day).unwrap();
        db.revoke("revoked", now).unwrap();

        let (total, rows) = db
            .cutover_blockers("old", "new", now, now - 30 * day, 10)
            .unwrap();
        assert_eq!(total, 2);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].id, "blocker");
        assert_eq!(rows[1].id, "unproven");
        assert_eq!(rows[0].cert_not_after, now + day);
        assert_eq!(rows[0].last_seen_at, Some(now - day));
        // A longer window includes the stale node; the limit bounds the list, not the total.
        let (total, rows) = db
            .cutover_blockers("old", "new", now, now - 45 * day, 1)
            .unwrap();
        assert_eq!((total, rows.len()), (3, 1));
        assert_eq!(rows[0].id, "blocker", "most recently seen first");
        let mut holders = db.cert_holders(now).unwrap();
        holders.sort();
        assert_eq!(
            holders,
            vec![("new".to_string(), 2), ("old".to_string(), 4)]
        );
    }

    #[test]
    fn renewal_needs_an_unexpired_certificate_and_is_rate_limited_per_node() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("state.db")).unwrap();
        db.insert_token("t", 0, i64::MAX).unwrap();
        let cert = |serial: &'static str, not_before_ms: i64, not_after_ms: i64| NewCert {
            serial_hex: serial,
            not_before_ms,
            not_after_ms,
            ca_sha256: "ca",
        };
        db.enrol("t", 0, &node("n"), &cert("s1", 1_000, 100_000))
            .unwrap()
            .unwrap();
        // Expired presented certificate: refused.
        assert_eq!(
            db.renew_cert("n", "s1", &cert("s2", 200_000, 300_000), 100_000, i64::MAX)
                .unwrap(),
            Renewal::Refused
        );
        // The node's newest certificate is newer than the bound: too soon.
        assert_eq!(
            db.renew_cert("n", "s1", &cert("s2", 50_000, 300_000), 50_000, 500)
                .unwrap(),
            Renewal::TooSoon
        );
        assert_eq!(
            db.renew_cert("n", "s1", &cert("s2", 50_000, 300_000), 50_000, 1_000)
                .unwrap(),
            Renewal::Recorded
        );
        assert_eq!(db.cert("s2").unwrap().unwrap().not_after, 300_000);
        // Pruning removes only certificates that expired before the bound.
        assert_eq!(db.prune_certs(200_000).unwrap(), 1);
        assert!(db.cert("s1").unwrap().is_none());
        assert!(db.cert("s2").unwrap().is_some());
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
