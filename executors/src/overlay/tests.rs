//! The overlay's rules against an in-memory device (the real one is driven by the agent's
//! end-to-end tests with wireguard-go in network namespaces: `e2e/tests/overlay.rs`).

use super::*;
use runos_protocol::Tag;
use serde_json::json;

/// An in-memory device: peers by key, the number of applies, the interface present or not.
#[derive(Default)]
struct Fake {
    peers: Mutex<Vec<Have>>,
    applies: Mutex<usize>,
    exists: Mutex<bool>,
    underlay: Vec<IpAddr>,
    vip: Mutex<Vec<(IpAddr, u8)>>,
}

impl System for Fake {
    fn ensure(&self, _spec: Arc<Spec>) -> BoxFuture<io::Result<Vec<String>>> {
        let mut e = self.exists.lock().unwrap();
        let r = if *e {
            vec![]
        } else {
            *e = true;
            vec!["created wg0".to_string()]
        };
        Box::pin(async move { Ok(r) })
    }

    fn device(&self, _spec: Arc<Spec>) -> BoxFuture<io::Result<(Kind, DeviceView)>> {
        let peers = self.peers.lock().unwrap().clone();
        Box::pin(async move {
            Ok((
                Kind::Userspace,
                DeviceView {
                    public_key: None,
                    listen_port: Some(51820),
                    peers: peers.into_iter().map(|h| (h, (0, 0))).collect(),
                },
            ))
        })
    }

    fn apply(&self, _spec: Arc<Spec>, _kind: Kind, u: Update) -> BoxFuture<io::Result<()>> {
        *self.applies.lock().unwrap() += 1;
        let mut peers = self.peers.lock().unwrap();
        peers.retain(|h| !u.remove.contains(&h.key) && !u.upsert.iter().any(|w| w.key == h.key));
        for w in u.upsert {
            peers.push(Have {
                key: w.key,
                endpoint: Some(w.endpoint),
                allowed: vec![(w.allowed, w.prefix())],
                keepalive: Some(w.keepalive),
                last_handshake: None,
            });
        }
        Box::pin(async { Ok(()) })
    }

    fn add_address(&self, _i: String, ip: IpAddr, p: u8) -> BoxFuture<io::Result<()>> {
        let mut a = self.vip.lock().unwrap();
        if !a.contains(&(ip, p)) {
            a.push((ip, p));
        }
        Box::pin(async { Ok(()) })
    }

    fn del_address(&self, _i: String, ip: IpAddr, p: u8) -> BoxFuture<io::Result<()>> {
        self.vip.lock().unwrap().retain(|x| *x != (ip, p));
        Box::pin(async { Ok(()) })
    }

    fn remove(&self, _iface: String) -> BoxFuture<io::Result<bool>> {
        let mut e = self.exists.lock().unwrap();
        let was = std::mem::replace(&mut *e, false);
        self.peers.lock().unwrap().clear();
        self.vip.lock().unwrap().clear();
        Box::pin(async move { Ok(was) })
    }

    fn addresses(&self, _iface: String) -> BoxFuture<io::Result<Addresses>> {
        let underlay = self.underlay.clone();
        let overlay = self.vip.lock().unwrap().clone();
        Box::pin(async move { Ok(Addresses { overlay, underlay }) })
    }
}

fn key(n: u8) -> String {
    b64(&public_key(&[n; 32]))
}

fn peer(n: u8) -> serde_json::Value {
    json!({"pubKey": key(n), "endpointIp": format!("192.0.2.{n}"), "vpnIp": format!("10.9.0.{n}")})
}

fn set(v: serde_json::Value) -> SetVpnPeers {
    let s: SetVpnPeers = serde_json::from_value(v).unwrap();
    runos_protocol::instructions::Instruction::validate(&s).unwrap();
    s
}

fn ctx() -> Ctx {
    Ctx::detached(Tag::random(), Duration::from_secs(30))
}

fn overlay(dir: &Path, fake: Arc<Fake>, cp: &[&str]) -> Overlay {
    let control = Arc::new(ControlPaths::default());
    for ip in cp {
        control.connected(ip.parse().unwrap());
    }
    let mut s = Settings::new(dir.to_path_buf());
    s.address = Some(("10.9.0.100".parse().unwrap(), 24));
    s.endpoint_ip = Some("192.0.2.100".parse().unwrap());
    Overlay::new(s, fake, control)
}

fn keys(fake: &Fake) -> Vec<[u8; 32]> {
    let mut k: Vec<_> = fake.peers.lock().unwrap().iter().map(|h| h.key).collect();
    k.sort();
    k
}

#[tokio::test]
async fn complete_sets_are_declarative_and_fenced() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(Fake::default());
    let o = overlay(dir.path(), fake.clone(), &["198.51.100.1"]);
    let r = o
        .set_vpn_peers(
            &ctx(),
            set(json!({"peers": [peer(1), peer(2), peer(3)], "generation": 1, "complete": true})),
        )
        .await
        .unwrap();
    assert_eq!(r.added.len(), 3);
    assert_eq!(r.generation, Some(1));
    assert_eq!(r.node_peer.vpn_ip, "10.9.0.100");
    assert_eq!(r.node_peer.endpoint_ip, "192.0.2.100");
    assert_eq!(r.node_peer.endpoint_port, Some(51820));
    assert_eq!(r.node_peer.pub_key, o.public_key_b64().unwrap());

    // Generation 2 without peer 3: removed; the others untouched.
    let r = o
        .set_vpn_peers(
            &ctx(),
            set(json!({"peers": [peer(1), peer(2)], "generation": 2, "complete": true})),
        )
        .await
        .unwrap();
    assert_eq!(r.removed, vec![key(3)]);
    assert_eq!((r.added.len(), r.changed.len(), r.unchanged), (0, 0, 2));
    assert_eq!(fake.peers.lock().unwrap().len(), 2);

    // A stale generation is refused and changes nothing (device or file).
    let saved = std::fs::read(dir.path().join(APPLIED_FILE)).unwrap();
    let applies = *fake.applies.lock().unwrap();
    let e = o
        .set_vpn_peers(
            &ctx(),
            set(json!({"peers": [peer(1), peer(2), peer(3)], "generation": 1, "complete": true})),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Stale);
    assert!(
        e.message.contains("generation 1") && e.message.contains("2"),
        "{}",
        e.message
    );
    assert_eq!(*fake.applies.lock().unwrap(), applies);
    assert_eq!(std::fs::read(dir.path().join(APPLIED_FILE)).unwrap(), saved);
    assert_eq!(fake.peers.lock().unwrap().len(), 2);

    // The same generation again: nothing to change.
    let r = o
        .set_vpn_peers(
            &ctx(),
            set(json!({"peers": [peer(1)], "generation": 2, "complete": true})),
        )
        .await
        .unwrap();
    assert_eq!((r.added.len(), r.removed.len(), r.unchanged), (0, 0, 2));
    assert_eq!(*fake.applies.lock().unwrap(), applies);
}

#[tokio::test]
async fn sets_without_the_runos_fields_only_add_or_update() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(Fake::default());
    let o = overlay(dir.path(), fake.clone(), &[]);
    o.set_vpn_peers(&ctx(), set(json!({"peers": [peer(1), peer(2)]})))
        .await
        .unwrap();
    let mut moved = peer(2);
    moved["endpointIp"] = json!("192.0.2.222");
    moved["endpointPort"] = json!(51999);
    let r = o
        .set_vpn_peers(&ctx(), set(json!({"peers": [moved, peer(3)]})))
        .await
        .unwrap();
    assert_eq!((r.added, r.changed), (vec![key(3)], vec![key(2)]));
    assert!(r.removed.is_empty());
    assert_eq!(r.generation, None);
    assert_eq!(keys(&fake).len(), 3);
    let p2 = fake
        .peers
        .lock()
        .unwrap()
        .iter()
        .find(|h| b64(&h.key) == key(2))
        .cloned()
        .unwrap();
    assert_eq!(p2.endpoint, Some("192.0.2.222:51999".parse().unwrap()));
    // A peer removed by hand is not removed from the set: the reconcile puts it back.
    fake.peers.lock().unwrap().retain(|h| b64(&h.key) != key(1));
    let r = o.reconcile().await.unwrap();
    assert_eq!(r, vec!["restored 1 missing peer(s)".to_string()]);
    assert_eq!(keys(&fake).len(), 3);
}

#[tokio::test]
async fn the_set_survives_a_restart_and_the_device_is_restored_from_it() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(Fake::default());
    let o = overlay(dir.path(), fake.clone(), &[]);
    o.set_vpn_peers(
        &ctx(),
        set(json!({"peers": [peer(1), peer(2)], "generation": 5, "complete": true})),
    )
    .await
    .unwrap();
    let public = o.public_key_b64().unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(dir.path().join(KEY_FILE))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // A new agent, a device that lost everything (interface recreated), a stray peer.
    let fresh = Arc::new(Fake::default());
    fresh.peers.lock().unwrap().push(Have {
        key: [7; 32],
        endpoint: None,
        allowed: vec![],
        keepalive: None,
        last_handshake: None,
    });
    let o2 = overlay(dir.path(), fresh.clone(), &[]);
    assert_eq!(o2.public_key_b64().unwrap(), public, "the key is kept");
    let r = o2.reconcile().await.unwrap();
    assert!(r.contains(&"created wg0".to_string()), "{r:?}");
    assert!(
        r.contains(&"restored 2 missing peer(s)".to_string()),
        "{r:?}"
    );
    assert!(
        r.contains(&"removed 1 peer(s) not in the set".to_string()),
        "{r:?}"
    );
    assert_eq!(keys(&fresh), keys(&fake));
    // The fence survived too.
    let e = o2
        .set_vpn_peers(
            &ctx(),
            set(json!({"peers": [], "generation": 4, "complete": true})),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Stale);
    // Nothing drifted: nothing to say.
    assert_eq!(o2.reconcile().await.unwrap(), Vec::<String>::new());
}

#[tokio::test]
async fn a_set_that_captures_the_control_plane_is_refused_and_not_saved() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(Fake {
        underlay: vec!["192.0.2.100".parse().unwrap()],
        ..Fake::default()
    });
    let o = overlay(dir.path(), fake.clone(), &["10.9.0.7"]);
    let mut cp = peer(7);
    cp["vpnIp"] = json!("10.9.0.7");
    let e = o
        .set_vpn_peers(
            &ctx(),
            set(json!({"peers": [peer(1), cp], "generation": 1, "complete": true})),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Failed);
    // The overlay's own prefix (10.9.0.100/24) already contains the control plane.
    assert!(e.message.contains("control plane"), "{}", e.message);
    assert!(!dir.path().join(APPLIED_FILE).exists());
    assert!(fake.peers.lock().unwrap().is_empty());

    let fake = Arc::new(Fake {
        underlay: vec!["192.0.2.100".parse().unwrap()],
        ..Fake::default()
    });
    let o = overlay(dir.path(), fake.clone(), &["198.51.100.1"]);
    let mut own = peer(8);
    own["vpnIp"] = json!("192.0.2.100");
    let e = o
        .set_vpn_peers(&ctx(), set(json!({"peers": [own]})))
        .await
        .unwrap_err();
    assert!(e.message.contains("underlay"), "{}", e.message);
    // Our own key as a peer.
    let me = json!({"pubKey": o.public_key_b64().unwrap(), "endpointIp": "192.0.2.9", "vpnIp": "10.9.0.9"});
    let e = o
        .set_vpn_peers(&ctx(), set(json!({"peers": [me]})))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::BadPayload);
    assert!(e.message.contains("own key"), "{}", e.message);
}

#[tokio::test]
async fn a_damaged_saved_set_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(APPLIED_FILE),
        b"{\"peers\": [{\"pubKey\": \"x\"}]}",
    )
    .unwrap();
    let o = overlay(dir.path(), Arc::new(Fake::default()), &[]);
    let e = o.reconcile().await.unwrap_err();
    assert!(e.to_string().contains("peers.json"), "{e}");
    std::fs::write(dir.path().join(KEY_FILE), b"not a key").unwrap();
    assert!(
        o.private_key()
            .unwrap_err()
            .to_string()
            .contains("remove it")
    );
}

fn assign(g: i64, lease: Option<u32>) -> runos_protocol::instructions::VipAssign {
    serde_json::from_value(json!({"generation": g, "leaseSecs": lease, "address": "10.9.0.254"}))
        .unwrap()
}

fn release(g: i64) -> runos_protocol::instructions::VipRelease {
    serde_json::from_value(json!({"generation": g})).unwrap()
}

#[tokio::test]
async fn the_vip_fence_survives_a_restart_and_refuses_replays() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(Fake::default());
    let vip: (IpAddr, u8) = ("10.9.0.254".parse().unwrap(), 32);
    let o = overlay(dir.path(), fake.clone(), &[]);
    let r = o.vip_assign(assign(5, None)).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(*fake.vip.lock().unwrap(), vec![vip]);
    // A redelivery of the same assignment: fine, nothing changes.
    assert!(o.vip_assign(assign(5, None)).await.ok);
    // Hand-off: release under the new generation.
    let r = o.vip_release(release(6)).await;
    assert!(r.ok, "{r:?}");
    assert!(fake.vip.lock().unwrap().is_empty());
    // A new agent on the same state (a restart), replaying generation 5: refused.
    let o2 = overlay(dir.path(), fake.clone(), &[]);
    let r = o2.vip_assign(assign(5, None)).await;
    assert!(!r.ok && r.message.contains("stale"), "{r:?}");
    assert!(fake.vip.lock().unwrap().is_empty());
    // A release of an older generation than the one held is refused; a newer assign works.
    assert!(o2.vip_assign(assign(8, None)).await.ok);
    let r = o2.vip_release(release(7)).await;
    assert!(
        !r.ok && r.message.contains("held under generation 8"),
        "{r:?}"
    );
    assert_eq!(fake.vip.lock().unwrap().len(), 1);
    let st = o2.vip_state().unwrap();
    assert_eq!((st.highest, st.released), (Some(8), Some(6)));
    // The interface was recreated without it: the reconcile puts the held VIP back.
    o2.set_vpn_peers(&ctx(), set(json!({"peers": [peer(1)]})))
        .await
        .unwrap();
    fake.vip.lock().unwrap().clear();
    let r = o2.reconcile().await.unwrap();
    assert!(r.iter().any(|l| l.contains("restored the VIP")), "{r:?}");
    assert_eq!(fake.vip.lock().unwrap().len(), 1);
    assert_eq!(o2.reconcile().await.unwrap(), Vec::<String>::new());
}

#[tokio::test]
async fn the_vip_needs_an_address_and_a_healthy_service() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(Fake::default());
    let o = overlay(dir.path(), fake.clone(), &[]);
    let r = o
        .vip_assign(serde_json::from_value(json!({"generation": 1})).unwrap())
        .await;
    assert!(!r.ok && r.message.contains("no VIP address"), "{r:?}");
    // A health check against a port nobody listens on.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    let mut s = Settings::new(dir.path().to_path_buf());
    s.vip_check = Some(format!("127.0.0.1:{port}").parse().unwrap());
    let o = Overlay::new(s, fake.clone(), Arc::new(ControlPaths::default()));
    let r = o.vip_assign(assign(2, None)).await;
    assert!(!r.ok && r.message.contains("does not answer"), "{r:?}");
    assert!(fake.vip.lock().unwrap().is_empty());
    // The refused assignment did not take the fence: the VIP is not held.
    assert!(o.vip_state().unwrap().held.is_none());
}

#[tokio::test(start_paused = true)]
async fn a_leased_vip_is_dropped_when_the_control_plane_is_silent_too_long() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(Fake::default());
    let control = Arc::new(ControlPaths::default());
    let o = Arc::new(Overlay::new(
        Settings::new(dir.path().to_path_buf()),
        fake.clone(),
        control.clone(),
    ));
    assert!(o.vip_assign(assign(1, Some(3))).await.ok);
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let w = tokio::spawn(o.clone().vip_watchdog(stop));
    // Contact keeps it.
    for _ in 0..5 {
        control.contact();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(
        fake.vip.lock().unwrap().len(),
        1,
        "dropped while the control plane answers"
    );
    // Silence longer than the lease: dropped, and the fence says it is not held.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(fake.vip.lock().unwrap().is_empty());
    assert!(o.vip_state().unwrap().held.is_none());
    stop_tx.send(true).unwrap();
    w.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_node_without_a_peer_set_is_not_polled() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(Fake::default());
    let o = Arc::new(overlay(dir.path(), fake.clone(), &[]));
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let w = tokio::spawn(o.clone().reconcile_loop(stop));
    // Many reconcile intervals: the interface is never touched, no key is made.
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert!(!*fake.exists.lock().unwrap());
    assert!(!dir.path().join(KEY_FILE).exists());
    // The first set wakes it; from then on it keeps the device as the set says.
    o.set_vpn_peers(&ctx(), set(json!({"peers": [peer(1)]})))
        .await
        .unwrap();
    fake.peers.lock().unwrap().clear();
    tokio::time::sleep(Duration::from_secs(61)).await;
    assert_eq!(
        keys(&fake).len(),
        1,
        "the loop did not restore the removed peer"
    );
    stop_tx.send(true).unwrap();
    w.await.unwrap();
}

#[tokio::test]
async fn remove_takes_the_overlay_off_and_the_reconcile_no_longer_restores_it() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("wireguard");
    let fake = Arc::new(Fake::default());
    let o = overlay(&state, fake.clone(), &["198.51.100.1"]);
    o.set_vpn_peers(
        &ctx(),
        set(json!({"peers": [peer(1)], "generation": 1, "complete": true})),
    )
    .await
    .unwrap();
    assert!(o.vip_assign(assign(1, None)).await.ok);
    assert!(*fake.exists.lock().unwrap());
    let done = o.remove().await.unwrap();
    assert!(
        done.iter().any(|d| d.contains("deleted the interface")),
        "{done:?}"
    );
    assert!(!*fake.exists.lock().unwrap());
    assert!(fake.peers.lock().unwrap().is_empty());
    assert!(
        !state.exists(),
        "the saved set, the fence and the key are gone"
    );
    // Nothing to restore; a second removal has nothing to do.
    assert!(o.reconcile().await.unwrap().is_empty());
    assert!(!*fake.exists.lock().unwrap());
    assert!(o.remove().await.unwrap().is_empty());
    assert!(!o.summary().await.managed);
}
