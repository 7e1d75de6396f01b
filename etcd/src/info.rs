//! The cluster as etcd reports it: members (member list) and each member's own answer to
//! `Status` (its health).

use serde::Serialize;

use crate::client::{Connector, EtcdError, read_each};
use crate::settings::Settings;

/// A member id as etcd prints it: 16 lower-case hex digits.
pub fn id_hex(id: u64) -> String {
    format!("{id:016x}")
}

/// Parse a member id given as hex (as etcd and etcdctl print it, `0x` optional).
pub fn parse_id(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    if t.is_empty() || t.len() > 16 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "{s:?} is not a member id: up to 16 hex digits, as `runos etcd list` prints it"
        ));
    }
    u64::from_str_radix(t, 16).map_err(|e| format!("{s:?} is not a member id: {e}"))
}

/// A member's health as judged by its own `Status` answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Health {
    /// It answered within the timeout, as itself, without errors, and knows the cluster's
    /// leader.
    Healthy,
    /// It answered, but knows no leader or another one than the cluster's, reports errors
    /// (such as an alarm), or its client URLs answer as another member.
    Unhealthy,
    /// No answer within the timeout.
    Unreachable,
    /// It has no client URLs (added but never started).
    NotStarted,
}

impl Health {
    /// The lower-case word shown by `runos etcd list`.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
            Health::Unreachable => "unreachable",
            Health::NotStarted => "not started",
        }
    }
}

/// One member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberInfo {
    /// Its id (16 hex digits).
    pub id: String,
    /// Its id as a number (not serialized: JSON numbers lose 64-bit precision).
    #[serde(skip)]
    pub id_num: u64,
    /// Its name (empty until it has started).
    pub name: String,
    /// Its peer URLs.
    pub peer_urls: Vec<String>,
    /// Its client URLs (empty until it has started).
    pub client_urls: Vec<String>,
    /// It has started (has a name or client URLs).
    pub started: bool,
    /// It is a learner (does not vote).
    pub is_learner: bool,
    /// It is the leader.
    pub is_leader: bool,
    /// Its health.
    pub health: Health,
    /// Why it is not healthy, when it is not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_error: Option<String>,
    /// The leader it reports (0 when it did not answer or knows none).
    #[serde(skip)]
    pub sees_leader: u64,
    /// The raft term of its answer.
    #[serde(skip)]
    pub raft_term: u64,
}

/// The whole cluster (`runos etcd list --json`; field names as the Go agent's
/// `EtcdClusterInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterInfo {
    /// The members, in member-list order.
    pub members: Vec<MemberInfo>,
    /// The leader's id (16 hex digits), empty when there is none.
    pub leader_id: String,
    /// The leader's name, empty when there is none.
    pub leader_name: String,
    /// The cluster id (16 hex digits).
    pub cluster_id: String,
    /// The leader's raft index (else the highest a member reported).
    pub raft_index: u64,
    /// The leader's database size in bytes (else the largest a member reported).
    pub db_size_bytes: i64,
    /// A leader is known and enough voting members are healthy for quorum.
    pub is_healthy: bool,
}

impl ClusterInfo {
    /// The leader's numeric id (0 when there is none).
    pub fn leader(&self) -> u64 {
        self.members
            .iter()
            .find(|m| m.is_leader)
            .map_or(0, |m| m.id_num)
    }

    /// Voting members.
    pub fn voters(&self) -> usize {
        self.members.iter().filter(|m| !m.is_learner).count()
    }

    /// Healthy voting members.
    pub fn healthy_voters(&self) -> usize {
        self.members
            .iter()
            .filter(|m| !m.is_learner && m.health == Health::Healthy)
            .count()
    }
}

/// The most members a member list may have (etcd advises at most 7 voters).
pub const MAX_MEMBERS: usize = 128;

struct Probe {
    member_id: u64,
    leader: u64,
    raft_term: u64,
    raft_index: u64,
    db_size: i64,
    errors: Vec<String>,
}

async fn probe(conn: &Connector, urls: &[String]) -> Result<Probe, EtcdError> {
    let limit = conn.settings().health_timeout();
    let s = read_each(conn, urls, "status", limit, |mut c| async move {
        c.status().await
    })
    .await?;
    Ok(Probe {
        member_id: s.header().map_or(0, |h| h.member_id()),
        leader: s.leader(),
        raft_term: s.header().map_or(0, |h| h.raft_term()),
        raft_index: s.raft_index(),
        db_size: s.db_size(),
        errors: s.errors().to_vec(),
    })
}

/// The member list through `urls` (one at a time, each bounded): `(cluster id, members)`.
pub(crate) async fn member_list(
    conn: &Connector,
    urls: &[String],
) -> Result<(u64, Vec<etcd_client::Member>), EtcdError> {
    let limit = conn.settings().request_timeout();
    let r = read_each(conn, urls, "member list", limit, |mut c| async move {
        c.member_list().await
    })
    .await?;
    if r.members().len() > MAX_MEMBERS {
        return Err(EtcdError::Call(format!(
            "the member list has {} members, more than {MAX_MEMBERS}",
            r.members().len()
        )));
    }
    Ok((
        r.header().map_or(0, |h| h.cluster_id()),
        r.members().to_vec(),
    ))
}

/// Probe every member's own client URLs at once and put the picture together.
pub(crate) async fn gather(
    conn: &Connector,
    cluster_id: u64,
    members: Vec<etcd_client::Member>,
) -> ClusterInfo {
    let probes = futures_util::future::join_all(members.iter().map(|m| async move {
        if m.client_urls().is_empty() {
            None
        } else {
            Some(probe(conn, m.client_urls()).await)
        }
    }))
    .await;
    let raw: Vec<Raw> = members
        .iter()
        .map(|m| Raw {
            id: m.id(),
            name: m.name().to_string(),
            peer_urls: m.peer_urls().to_vec(),
            client_urls: m.client_urls().to_vec(),
            is_learner: m.is_learner(),
        })
        .collect();
    assemble(cluster_id, &raw, probes)
}

/// A member as the member list gives it.
struct Raw {
    id: u64,
    name: String,
    peer_urls: Vec<String>,
    client_urls: Vec<String>,
    is_learner: bool,
}

/// The picture from the member list and each member's probe (`None`: no client URLs).
fn assemble(
    cluster_id: u64,
    members: &[Raw],
    probes: Vec<Option<Result<Probe, EtcdError>>>,
) -> ClusterInfo {
    let mut out: Vec<MemberInfo> = Vec::with_capacity(members.len());
    let mut best: Option<(u64, u64)> = None; // (term, leader)
    let mut stats: Vec<(u64, u64, i64)> = Vec::new(); // (member, raft index, db size)
    for (m, p) in members.iter().zip(probes) {
        let (health, err, sees, term) = match p {
            None => (Health::NotStarted, None, 0, 0),
            Some(Err(e)) => (Health::Unreachable, Some(e.to_string()), 0, 0),
            Some(Ok(p)) if p.member_id != m.id => (
                Health::Unhealthy,
                Some(format!(
                    "its client URLs answer as member {}",
                    id_hex(p.member_id)
                )),
                0,
                0,
            ),
            Some(Ok(p)) => {
                stats.push((m.id, p.raft_index, p.db_size));
                if p.leader != 0 && best.is_none_or(|(t, _)| p.raft_term > t) {
                    best = Some((p.raft_term, p.leader));
                }
                if p.leader == 0 {
                    (
                        Health::Unhealthy,
                        Some("it knows no leader".to_string()),
                        0,
                        p.raft_term,
                    )
                } else if !p.errors.is_empty() {
                    (
                        Health::Unhealthy,
                        Some(p.errors.join("; ")),
                        p.leader,
                        p.raft_term,
                    )
                } else {
                    (Health::Healthy, None, p.leader, p.raft_term)
                }
            }
        };
        out.push(MemberInfo {
            id: id_hex(m.id),
            id_num: m.id,
            name: m.name.clone(),
            peer_urls: m.peer_urls.clone(),
            client_urls: m.client_urls.clone(),
            started: !m.name.is_empty() || !m.client_urls.is_empty(),
            is_learner: m.is_learner,
            is_leader: false,
            health,
            health_error: err,
            sees_leader: sees,
            raft_term: term,
        });
    }
    let leader = best.map_or(0, |(_, l)| l);
    for m in &mut out {
        m.is_leader = leader != 0 && m.id_num == leader;
        // A member that follows a stale leader (an older term) is cut off from the cluster.
        if m.health == Health::Healthy && m.sees_leader != leader {
            m.health = Health::Unhealthy;
            m.health_error = Some(format!(
                "it reports leader {} (raft term {}), not the cluster's {}",
                id_hex(m.sees_leader),
                m.raft_term,
                id_hex(leader)
            ));
        }
    }
    let leader_m = out.iter().find(|m| m.is_leader).cloned();
    let leader_stats = stats.iter().find(|s| s.0 == leader);
    let raft_index = leader_stats
        .map(|s| s.1)
        .unwrap_or_else(|| stats.iter().map(|s| s.1).max().unwrap_or(0));
    let db_size_bytes = leader_stats
        .map(|s| s.2)
        .unwrap_or_else(|| stats.iter().map(|s| s.2).max().unwrap_or(0));
    let mut info = ClusterInfo {
        leader_id: leader_m.as_ref().map(|m| m.id.clone()).unwrap_or_default(),
        leader_name: leader_m
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default(),
        cluster_id: id_hex(cluster_id),
        raft_index,
        db_size_bytes,
        is_healthy: false,
        members: out,
    };
    info.is_healthy = leader_m.is_some() && info.healthy_voters() > info.voters() / 2;
    info
}

/// The cluster seen through `settings.endpoints`: its members, and each member's health from
/// its own client URLs (all probed at once, each within `health_timeout_ms`).
pub async fn cluster_info(settings: &Settings) -> Result<ClusterInfo, EtcdError> {
    let conn = Connector::new(settings);
    let (cluster_id, members) = member_list(&conn, &settings.endpoints).await?;
    Ok(gather(&conn, cluster_id, members).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(id: u64, learner: bool, started: bool) -> Raw {
        Raw {
            id,
            name: if started {
                format!("n{id}")
            } else {
                String::new()
            },
            peer_urls: vec![format!("https://10.0.0.{id}:2380")],
            client_urls: if started {
                vec![format!("https://10.0.0.{id}:2379")]
            } else {
                Vec::new()
            },
            is_learner: learner,
        }
    }

    fn answer(member_id: u64, leader: u64, term: u64) -> Option<Result<Probe, EtcdError>> {
        Some(Ok(Probe {
            member_id,
            leader,
            raft_term: term,
            raft_index: 10,
            db_size: 20,
            errors: Vec::new(),
        }))
    }

    #[test]
    fn health_is_judged_from_each_members_own_answer() {
        let ms = [
            raw(1, false, true),
            raw(2, false, true),
            raw(3, false, true),
            raw(4, false, true),
            raw(5, false, true),
            raw(6, false, false),
            raw(7, true, true),
        ];
        let alarm = Some(Ok(Probe {
            errors: vec!["NOSPACE".into()],
            ..answer(4, 1, 5).unwrap().unwrap()
        }));
        let info = assemble(
            9,
            &ms,
            vec![
                answer(1, 1, 5),                                   // the leader
                answer(2, 3, 4),                                   // a stale leader, older term
                answer(3, 3, 4),                                   // the stale leader itself
                alarm,                                             // an alarm
                Some(Err(EtcdError::Timeout("no answer".into()))), // down
                None,                                              // never started
                answer(1, 1, 5),                                   // another member's answer
            ],
        );
        let h: Vec<Health> = info.members.iter().map(|m| m.health).collect();
        use Health::*;
        assert_eq!(
            h,
            [
                Healthy,
                Unhealthy,
                Unhealthy,
                Unhealthy,
                Unreachable,
                NotStarted,
                Unhealthy
            ],
            "{info:#?}"
        );
        assert_eq!(info.leader(), 1);
        assert!(info.members[0].is_leader && !info.members[2].is_leader);
        assert!(
            info.members[6]
                .health_error
                .as_deref()
                .is_some_and(|e| e.contains("answer as member 0000000000000001")),
            "{:?}",
            info.members[6]
        );
        assert_eq!((info.voters(), info.healthy_voters()), (6, 1));
        assert!(!info.is_healthy);

        // No member knows a leader: none is healthy, and there is no leader.
        let info = assemble(
            9,
            &ms[..3],
            vec![answer(1, 0, 5), answer(2, 0, 5), answer(3, 0, 5)],
        );
        assert_eq!(info.leader(), 0);
        assert_eq!(info.healthy_voters(), 0);
        assert!(info.leader_id.is_empty() && !info.is_healthy);
        // A majority healthy: the cluster is healthy.
        let info = assemble(
            9,
            &ms[..3],
            vec![
                answer(1, 2, 5),
                answer(2, 2, 5),
                Some(Err(EtcdError::Timeout("x".into()))),
            ],
        );
        assert_eq!(info.leader_id, id_hex(2));
        assert!(info.is_healthy);
    }

    #[test]
    fn ids_round_trip_as_hex() {
        assert_eq!(id_hex(0x8e9e05c52164694d), "8e9e05c52164694d");
        assert_eq!(id_hex(1), "0000000000000001");
        assert_eq!(parse_id("8e9e05c52164694d").unwrap(), 0x8e9e05c52164694d);
        assert_eq!(parse_id("0x1").unwrap(), 1);
        assert_eq!(parse_id("0000000000000001").unwrap(), 1);
        for bad in ["", "0x", "xyz", "1 2", "-1", "12345678901234567", "１"] {
            assert!(parse_id(bad).is_err(), "{bad}");
        }
    }
}
