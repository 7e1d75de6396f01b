//! Removing a member: find it exactly, check quorum with every member's health, move
//! leadership off it first, remove it through another member, verify (docs/etcd.md).

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::client::{Connector, EtcdError, bounded, read_each};
use crate::info::{ClusterInfo, Health, MemberInfo, gather, id_hex, member_list};
use crate::record::{self, Removal};
use crate::rules::{QuorumInput, check_quorum, peer_urls_match};
use crate::settings::Settings;

/// Which member to remove.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The member whose peer URL host is exactly this address.
    Ip(IpAddr),
    /// The member with this id.
    Id(u64),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Ip(ip) => write!(f, "the member with peer address {ip}"),
            Target::Id(id) => write!(f, "member {}", id_hex(*id)),
        }
    }
}

/// How a removal failed; each kind is a stable `ERROR` code (docs/protocol.md §10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// No member matches (`not_found`).
    NotFound,
    /// No member matches, and this agent removed the one that did (`already_done`).
    AlreadyDone,
    /// Unsafe or ambiguous; nothing was changed (`refused`).
    Refused,
    /// A step failed (`failed`); the message says what state the cluster is in.
    Failed,
    /// Cancelled before the removal was sent; nothing was removed (`cancelled`).
    Cancelled,
    /// The instruction's time ran out before the removal was sent (`timeout`).
    Timeout,
}

/// A failed removal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
#[error("{message}")]
pub struct RemoveError {
    /// The kind.
    pub kind: Kind,
    /// What happened and what to do next.
    pub message: String,
}

fn err(kind: Kind, message: impl Into<String>) -> RemoveError {
    RemoveError {
        kind,
        message: message.into(),
    }
}

/// A removal that happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Removed {
    /// The removed member's id (16 hex digits).
    pub id: String,
    /// Its name.
    pub name: String,
    /// Its peer URLs.
    pub peer_urls: Vec<String>,
    /// It was the leader (leadership was moved first).
    pub was_leader: bool,
    /// The leader afterwards (16 hex digits).
    pub leader_id: String,
    /// Members left.
    pub members_after: usize,
}

/// What a removal may use besides the settings.
#[derive(Debug, Clone, Default)]
pub struct RemoveOptions<'a> {
    /// The directory of the removal record (`already_done`); none: no record is read or kept.
    pub record_dir: Option<&'a Path>,
    /// Checked before each step that changes the cluster; once the removal is sent it is
    /// seen through (verification is bounded on its own).
    pub cancel: CancellationToken,
    /// No step that changes the cluster starts after this instant.
    pub deadline: Option<Instant>,
}

/// The member `target` names in `members`: `Ok(None)` when none does, refused when several do.
pub fn find_target(
    members: &[MemberInfo],
    target: Target,
) -> Result<Option<&MemberInfo>, RemoveError> {
    let found: Vec<&MemberInfo> = members
        .iter()
        .filter(|m| match target {
            Target::Ip(ip) => peer_urls_match(&m.peer_urls, ip),
            Target::Id(id) => m.id_num == id,
        })
        .collect();
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(one)),
        many => Err(err(
            Kind::Refused,
            format!(
                "{target} is ambiguous: {} members have it ({}); remove one by id with `runos etcd remove --id`",
                many.len(),
                many.iter()
                    .map(|m| format!("{} {:?} {:?}", m.id, m.name, m.peer_urls))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

/// The quorum rule applied to `target` in `info` (`refused` with the numbers).
pub fn quorum_for(info: &ClusterInfo, target: &MemberInfo) -> Result<String, RemoveError> {
    let q = QuorumInput {
        voters: info.voters(),
        healthy_voters: info.healthy_voters(),
        target_is_learner: target.is_learner,
        target_healthy: target.health == Health::Healthy,
    };
    match check_quorum(q) {
        Ok(ok) if target.is_learner => Ok(format!(
            "{} is a learner: it does not vote, quorum is unaffected ({} of {} voting members healthy)",
            target.id, ok.healthy_after, ok.voters_after
        )),
        Ok(ok) => Ok(format!(
            "quorum check passed: {} of {} voting members healthy now; after the removal {} voting members remain, {} healthy, quorum {}",
            q.healthy_voters, q.voters, ok.voters_after, ok.healthy_after, ok.quorum_after
        )),
        Err(m) => Err(err(
            Kind::Refused,
            format!(
                "refusing to remove {} ({:?}): {m}; nothing was changed",
                target.id, target.name
            ),
        )),
    }
}

fn check_go(opts: &RemoveOptions<'_>, step: &str) -> Result<(), RemoveError> {
    if opts.cancel.is_cancelled() {
        return Err(err(
            Kind::Cancelled,
            format!("cancelled before {step}; nothing was removed"),
        ));
    }
    if opts.deadline.is_some_and(|d| Instant::now() >= d) {
        return Err(err(
            Kind::Timeout,
            format!("the instruction's time ran out before {step}; nothing was removed"),
        ));
    }
    Ok(())
}

/// `wait` cut to what is left before the deadline.
fn within(opts: &RemoveOptions<'_>, wait: Duration) -> Duration {
    match opts.deadline {
        Some(d) => wait.min(d.saturating_duration_since(Instant::now())),
        None => wait,
    }
}

fn failed(e: EtcdError, what: &str) -> RemoveError {
    err(Kind::Failed, format!("{what}: {e}"))
}

/// Remove `target` (docs/etcd.md, docs/protocol.md §10 `REMOVE_ETCD_MEMBER`); every step is
/// passed to `log`.
pub async fn remove_member(
    settings: &Settings,
    target: Target,
    opts: &RemoveOptions<'_>,
    log: &(dyn Fn(&str) + Sync),
) -> Result<Removed, RemoveError> {
    let conn = Connector::new(settings);
    let s = settings;
    log(&format!(
        "listing etcd members through {}",
        s.endpoints.join(", ")
    ));
    let (cluster_id, members) = member_list(&conn, &s.endpoints)
        .await
        .map_err(|e| failed(e, "cannot list the etcd members; nothing was changed"))?;
    let info = gather(&conn, cluster_id, members).await;
    log(&format!(
        "cluster {}: {} member(s), {} voting ({} healthy), leader {}",
        info.cluster_id,
        info.members.len(),
        info.voters(),
        info.healthy_voters(),
        if info.leader_id.is_empty() {
            "none"
        } else {
            &info.leader_id
        }
    ));
    let Some(t) = find_target(&info.members, target)? else {
        return Err(absent(opts, target));
    };
    let t = t.clone();
    log(&format!(
        "target: {} {:?} peer {:?}, {}{}, {}",
        t.id,
        t.name,
        t.peer_urls,
        if t.is_learner { "learner" } else { "voter" },
        if t.is_leader { ", leader" } else { "" },
        t.health.as_str()
    ));
    let leader = info.leader();
    if leader == 0 {
        return Err(err(
            Kind::Refused,
            "the cluster has no leader (no member reports one): it cannot change its membership now; nothing was changed. Check `runos etcd list` and the etcd logs".to_string(),
        ));
    }
    let q = quorum_for(&info, &t)?;
    log(&q);

    let mut was_leader = false;
    if t.is_leader {
        was_leader = true;
        check_go(opts, "moving leadership")?;
        move_leadership(&conn, &info, &t, opts, log).await?;
    }

    // Through a healthy voter that is not the target (the new leader first), with the
    // target, the leader and the quorum checked again on that fresh picture: a member may have
    // gone down meanwhile, and after a leadership move the followers take a moment to follow
    // the new leader (bounded).
    let recheck_wait = within(opts, s.leader_move_wait());
    let recheck_until = Instant::now() + recheck_wait;
    let mut told = false;
    let (fresh, via) = loop {
        let r = recheck(&conn, &info, &t, target, was_leader).await;
        match r {
            Ok(ok) => break ok,
            Err(e) if e.kind == Kind::NotFound => return Err(e),
            Err(e) if Instant::now() >= recheck_until => return Err(e),
            Err(e) => {
                if !told {
                    log(&format!(
                        "re-check before the removal: {}; retrying for up to {recheck_wait:?}",
                        e.message
                    ));
                    told = true;
                }
                check_go(opts, "removing the member")?;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    log(&format!(
        "re-checked{}: leader {}, {} of {} voting members healthy",
        if was_leader {
            " after the leadership move"
        } else {
            ""
        },
        fresh.leader_id,
        fresh.healthy_voters(),
        fresh.voters()
    ));
    check_go(opts, "removing the member")?;
    log(&format!(
        "removing member {} through {}",
        t.id,
        via.join(", ")
    ));
    // etcd refuses a reconfiguration ("unhealthy cluster") while a member it needs for quorum
    // afterwards has been connected to the leader for less than 5 s (its strict reconfig
    // check): retried, bounded by the leader-move wait.
    let retry_until = Instant::now() + within(opts, s.leader_move_wait());
    let mut said = false;
    let r = loop {
        let r = async {
            let mut c = conn.connect(&via).await?;
            bounded(
                "member remove",
                s.request_timeout(),
                c.member_remove(t.id_num),
            )
            .await
        }
        .await;
        match r {
            Err(EtcdError::Call(m))
                if m.contains("unhealthy cluster") && Instant::now() < retry_until =>
            {
                if !said {
                    log(
                        "etcd refuses the reconfiguration for now (unhealthy cluster: a member connected to the leader less than 5 s ago); retrying",
                    );
                    said = true;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                check_go(opts, "removing the member")?;
            }
            r => break r,
        }
    };
    if let Err(e) = r {
        // The request may have been applied anyway: say what the list shows.
        let state = match member_list(&conn, &via).await {
            Ok((_, m)) if m.iter().any(|m| m.id() == t.id_num) => "it is still a member",
            Ok(_) => "the member list no longer shows it",
            Err(_) => "the member list cannot be read now",
        };
        return Err(err(
            Kind::Failed,
            format!("member remove {} failed: {e}; {state}", t.id),
        ));
    }
    if let Some(dir) = opts.record_dir {
        let rec = Removal {
            id: t.id.clone(),
            name: t.name.clone(),
            peer_urls: t.peer_urls.clone(),
            removed_at: record::now_rfc3339(),
        };
        if let Err(e) = record::append(dir, rec) {
            log(&format!("warning: the removal is not recorded: {e}"));
        }
    }
    let wait = within(opts, s.verify_wait());
    log(&format!(
        "member remove accepted; verifying (up to {wait:?})"
    ));
    verify_gone(&conn, &via, &t, wait, was_leader, log).await
}

/// The fresh picture through a healthy voter other than the target, and the client URLs to
/// remove through, when the target is still there, does not lead and the quorum rule still
/// allows its removal.
async fn recheck(
    conn: &Connector,
    info: &ClusterInfo,
    t: &MemberInfo,
    target: Target,
    was_leader: bool,
) -> Result<(ClusterInfo, Vec<String>), RemoveError> {
    let moved = if was_leader {
        " (leadership was moved off it)"
    } else {
        ""
    };
    let fresh = match member_list_via_others(conn, info, t.id_num).await {
        Ok((cid, m)) => gather(conn, cid, m).await,
        Err(e) => {
            return Err(failed(
                e,
                &format!("cannot reach a member other than the target; nothing was removed{moved}"),
            ));
        }
    };
    let Some(ft) = fresh.members.iter().find(|m| m.id_num == t.id_num) else {
        return Err(err(
            Kind::NotFound,
            format!(
                "{target} ({}) left the member list before this agent removed it; nothing was removed{moved}",
                t.id
            ),
        ));
    };
    if fresh.leader() == 0 {
        return Err(err(
            Kind::Refused,
            format!(
                "the cluster has no leader now: it cannot change its membership; nothing was removed{moved}"
            ),
        ));
    }
    if ft.is_leader {
        return Err(err(
            Kind::Failed,
            format!("{} leads the cluster again; nothing was removed", t.id),
        ));
    }
    quorum_for(&fresh, ft).map_err(|e| err(e.kind, format!("{}{moved}", e.message)))?;
    let via = others(&fresh, t.id_num);
    if via.is_empty() {
        return Err(err(
            Kind::Failed,
            format!(
                "no healthy voting member other than the target answers; nothing was removed{moved}"
            ),
        ));
    }
    Ok((fresh, via))
}

/// The answer when `target` is not a member: `already_done` when the record in
/// `opts.record_dir` shows this agent removed it, else `not_found`.
pub fn absent(opts: &RemoveOptions<'_>, target: Target) -> RemoveError {
    if let Some(dir) = opts.record_dir {
        let (ip, id) = match target {
            Target::Ip(ip) => (Some(ip), None),
            Target::Id(id) => (None, Some(id)),
        };
        if let Ok(recs) = record::load(dir)
            && let Some(r) = recs.iter().rev().find(|r| r.matches(ip, id))
        {
            return err(
                Kind::AlreadyDone,
                format!(
                    "{target} is not in the cluster: this agent removed it at {} (member {} {:?}, peer {:?})",
                    r.removed_at, r.id, r.name, r.peer_urls
                ),
            );
        }
    }
    err(
        Kind::NotFound,
        format!(
            "{target} is not in the cluster; nothing was changed (`runos etcd list` shows the members)"
        ),
    )
}

/// Client URLs of one healthy voting member other than `not`, the leader when it is one
/// (learners serve no membership changes).
fn others(info: &ClusterInfo, not: u64) -> Vec<String> {
    let mut ms: Vec<&MemberInfo> = info
        .members
        .iter()
        .filter(|m| {
            m.id_num != not
                && !m.is_learner
                && m.health == Health::Healthy
                && !m.client_urls.is_empty()
        })
        .collect();
    ms.sort_by_key(|m| !m.is_leader);
    ms.into_iter()
        .take(1)
        .flat_map(|m| m.client_urls.clone())
        .collect()
}

async fn member_list_via_others(
    conn: &Connector,
    info: &ClusterInfo,
    not: u64,
) -> Result<(u64, Vec<etcd_client::Member>), EtcdError> {
    let mut last = EtcdError::Call("no healthy member other than the target".into());
    for m in info
        .members
        .iter()
        .filter(|m| m.id_num != not && !m.is_learner && m.health == Health::Healthy)
    {
        match member_list(conn, &m.client_urls).await {
            Ok(r) => return Ok(r),
            Err(e) => last = e,
        }
    }
    Err(last)
}

async fn move_leadership(
    conn: &Connector,
    info: &ClusterInfo,
    t: &MemberInfo,
    opts: &RemoveOptions<'_>,
    log: &(dyn Fn(&str) + Sync),
) -> Result<(), RemoveError> {
    let s = conn.settings();
    let Some(to) = info
        .members
        .iter()
        .filter(|m| {
            m.id_num != t.id_num
                && m.started
                && !m.is_learner
                && m.health == Health::Healthy
                && !m.client_urls.is_empty()
        })
        .min_by_key(|m| m.id_num)
    else {
        return Err(err(
            Kind::Refused,
            format!(
                "{} is the leader and no other healthy started voting member can take over; nothing was changed",
                t.id
            ),
        ));
    };
    log(&format!(
        "{} is the leader: moving leadership to {} {:?} (asking the leader at {})",
        t.id,
        to.id,
        to.name,
        t.client_urls.join(", ")
    ));
    // etcd accepts move-leader only at the leader.
    let r = async {
        let mut c = conn.connect(&t.client_urls).await?;
        bounded("move leader", s.request_timeout(), c.move_leader(to.id_num)).await
    }
    .await;
    if let Err(e) = r {
        return Err(failed(
            e,
            &format!(
                "moving leadership from {} to {} failed; nothing was removed",
                t.id, to.id
            ),
        ));
    }
    let wait = within(opts, s.leader_move_wait());
    let until = Instant::now() + wait;
    let mut seen;
    loop {
        let p = read_each(
            conn,
            &to.client_urls,
            "status",
            s.health_timeout(),
            |mut c| async move { c.status().await },
        )
        .await;
        match p {
            Ok(st) if st.leader() != 0 && st.leader() != t.id_num => {
                log(&format!(
                    "leadership moved: the leader is now {}",
                    id_hex(st.leader())
                ));
                return Ok(());
            }
            Ok(st) => seen = id_hex(st.leader()),
            Err(e) => seen = e.to_string(),
        }
        check_go(opts, "removing the member")?;
        if Instant::now() >= until {
            return Err(err(
                Kind::Failed,
                format!(
                    "leadership did not move off {} within {wait:?} (last seen leader: {seen}); nothing was removed, {} is still a member",
                    t.id, t.id
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn verify_gone(
    conn: &Connector,
    via: &[String],
    t: &MemberInfo,
    wait: Duration,
    was_leader: bool,
    log: &(dyn Fn(&str) + Sync),
) -> Result<Removed, RemoveError> {
    let until = Instant::now() + wait;
    let mut state;
    loop {
        match member_list(conn, via).await {
            Ok((_, m)) if !m.iter().any(|m| m.id() == t.id_num) => {
                let leader = read_each(
                    conn,
                    via,
                    "status",
                    conn.settings().health_timeout(),
                    |mut c| async move { c.status().await },
                )
                .await
                .map(|s| s.leader())
                .unwrap_or(0);
                if leader != 0 && leader != t.id_num {
                    log(&format!(
                        "verified: {} is gone; {} member(s) left, leader {}",
                        t.id,
                        m.len(),
                        id_hex(leader)
                    ));
                    return Ok(Removed {
                        id: t.id.clone(),
                        name: t.name.clone(),
                        peer_urls: t.peer_urls.clone(),
                        was_leader,
                        leader_id: id_hex(leader),
                        members_after: m.len(),
                    });
                }
                state = format!(
                    "it is gone from the member list ({} left) but no leader is known yet",
                    m.len()
                );
            }
            Ok((_, m)) => state = format!("it is still listed among {} members", m.len()),
            Err(e) => state = format!("the member list cannot be read: {e}"),
        }
        if Instant::now() >= until {
            return Err(err(
                Kind::Failed,
                format!(
                    "member remove {} was accepted, but after {wait:?} {state}; check `runos etcd list`",
                    t.id
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
