//! The overlay end to end, for real: three `runos` agents, each in its own network namespace
//! and its own mount namespace (a private tmpfs on `/run/wireguard`: the UAPI socket directory
//! is otherwise shared by every network namespace), each driving Debian's `wireguard-go`
//! through `wireguard-control`, and one real control plane in the root namespace, reached over a
//! bridge. Underlay 10.77.0.0/24 (control plane .1, nodes .11-.13), overlay 10.99.0.0/24.
//!
//! Needs root, `ip`, `unshare`, `nsenter`, `wireguard-go`, `wg` and `ping` (the test command
//! installs them); skips with a printed reason when not root.
//!
//! The kernel backend cannot be tested here (these machines have no WireGuard module): its
//! selection is unit-tested in `executors/src/overlay/device.rs`.

use std::process::Command;

use runos_e2e::{Agent, ControlPlane, DEADLINE, Reply, describe, wait_until};
use serde_json::{Value, json};

const CP_IP: &str = "10.77.0.1";
const VIP: &str = "10.99.0.254";
/// The uninstall's programs: `systemctl` is `/bin/true` (the test must never stop or disable a
/// unit of the host), kubeadm is not installed (its reset is skipped).
const UNINSTALL_TOOLS: &str =
    "\n[tools]\nsystemctl = \"/bin/true\"\nkubeadm = \"/nonexistent/kubeadm\"\n";

fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(out.status.success(), "{args:?}: {}", describe(&out));
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", "command -v \"$0\" >/dev/null", program])
        .status()
        .is_ok_and(|s| s.success())
}

/// The namespaces and links of one run; removed on drop, after the agents (declared later,
/// dropped first), with each node's `wg0` first so that its wireguard-go exits.
struct Net {
    bridge: String,
    namespaces: Vec<String>,
}

impl Net {
    fn new(nodes: usize) -> Net {
        let id = std::process::id() % 100_000;
        let bridge = format!("rwb{id}");
        let mut net = Net {
            bridge: bridge.clone(),
            namespaces: Vec::new(),
        };
        run(&["ip", "link", "add", &bridge, "type", "bridge"]);
        run(&["ip", "addr", "add", &format!("{CP_IP}/24"), "dev", &bridge]);
        run(&["ip", "link", "set", &bridge, "up"]);
        for i in 0..nodes {
            let ns = format!("rwg{id}{i}");
            let host_end = format!("rvh{id}{i}");
            let node_end = format!("rvn{id}{i}");
            run(&["ip", "netns", "add", &ns]);
            net.namespaces.push(ns.clone());
            run(&[
                "ip", "link", "add", &host_end, "type", "veth", "peer", "name", &node_end,
            ]);
            run(&["ip", "link", "set", &host_end, "master", &bridge, "up"]);
            run(&["ip", "link", "set", &node_end, "netns", &ns]);
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
            run(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.77.0.{}/24", 11 + i),
                "dev",
                &node_end,
            ]);
            run(&["ip", "-n", &ns, "link", "set", &node_end, "up"]);
        }
        net
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            // wireguard-go exits when its link goes; a deleted namespace alone would not stop
            // it (its tun keeps the namespace alive).
            let _ = Command::new("ip")
                .args(["-n", ns, "link", "del", "wg0"])
                .status();
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
    }
}

/// A node: its agent, namespace and overlay address.
struct Node {
    agent: Agent,
    ns: String,
    vpn_ip: String,
    underlay: String,
    node_id: String,
    pub_key: String,
}

/// `ip netns exec NS unshare -m` with a private tmpfs on /run/wireguard, then exec the agent.
fn wrapper(ns: &str) -> Vec<String> {
    [
        "ip",
        "netns",
        "exec",
        ns,
        "unshare",
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        "mkdir -p /run/wireguard && mount -t tmpfs -o mode=0700 tmpfs /run/wireguard && exec \"$0\" \"$@\"",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn start(n: &mut Node) {
    let w = wrapper(&n.ns);
    let w: Vec<&str> = w.iter().map(String::as_str).collect();
    n.agent.start_wrapped(&w, &[]);
}

fn ping(from: &Node, to: &Node) -> bool {
    Command::new("ip")
        .args([
            "netns", "exec", &from.ns, "ping", "-c", "1", "-W", "1", "-q", &to.vpn_ip,
        ])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn wait_ping(from: &Node, to: &Node, what: &str) {
    wait_until(DEADLINE, what, || ping(from, to));
}

fn peer(n: &Node) -> Value {
    json!({"pubKey": n.pub_key, "endpointIp": n.underlay, "vpnIp": n.vpn_ip})
}

fn send(cp: &ControlPlane, n: &Node, payload: &Value) -> Reply {
    cp.send(&n.node_id, "SET_VPN_PEERS", &payload.to_string())
}

fn ok(r: &Reply) -> &Value {
    assert_eq!(r.kind, "NODE_VPN_PEER", "{r:?}");
    &r.payload
}

/// `wg show wg0 latest-handshakes` inside node `n`'s namespaces (the agent's pid is in both).
fn handshake_with(n: &Node, key: &str) -> u64 {
    let pid = n.agent.pid().to_string();
    let out = Command::new("nsenter")
        .args([
            "-t",
            &pid,
            "-m",
            "-n",
            "wg",
            "show",
            "wg0",
            "latest-handshakes",
        ])
        .output()
        .expect("nsenter wg");
    assert!(out.status.success(), "wg show: {}", describe(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            let (k, t) = l.split_once('\t')?;
            (k == key).then(|| t.trim().parse().ok()).flatten()
        })
        .unwrap_or(0)
}

/// Whether node `n`'s wg0 has the VIP (`ip -j`: JSON, not a table).
fn holds_vip(n: &Node) -> bool {
    let out = Command::new("ip")
        .args(["-j", "-n", &n.ns, "addr", "show", "dev", "wg0"])
        .output()
        .expect("ip addr");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v.as_array().into_iter().flatten().any(|l| {
        l["addr_info"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|a| a["local"] == VIP)
    })
}

fn vip(cp: &ControlPlane, n: &Node, kind: &str, payload: Value) -> Value {
    let r = cp.send(&n.node_id, kind, &payload.to_string());
    assert_eq!(r.kind, format!("{kind}_RESPONSE"), "{r:?}");
    r.payload
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn three_nodes_mesh_declaratively_and_survive_their_control_plane() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root for network namespaces and wireguard-go");
        return;
    }
    for p in ["ip", "unshare", "nsenter", "wireguard-go", "wg", "ping"] {
        assert!(
            have(p),
            "{p} is not installed (the test command installs wireguard-go, wireguard-tools, iputils-ping, util-linux)"
        );
    }
    let net = Net::new(3);
    let tmp = tempfile::tempdir().unwrap();
    let mut cp = ControlPlane::start_at(
        &tmp.path().join("cp"),
        "0.0.0.0:0",
        "0.0.0.0:0",
        &["--hostname", CP_IP],
    );
    let mut nodes: Vec<Node> = Vec::new();
    for (i, ns) in net.namespaces.iter().enumerate() {
        let vpn_ip = format!("10.99.0.{}", i + 1);
        // Node C's VIP health check points at a port nothing listens on.
        let check = if i == 2 {
            "vip_check = \"127.0.0.1:9\"\n"
        } else {
            ""
        };
        let extra = format!(
            "\n[wireguard]\naddress = \"{vpn_ip}/24\"\nreconcile_secs = 1\nkeepalive_secs = 1\nvip = \"{VIP}/32\"\n{check}{UNINSTALL_TOOLS}"
        );
        let mut agent = Agent::new(&tmp.path().join(format!("node{i}")), &cp, &extra);
        let node_id = agent.register(&cp);
        // Registered from the root namespace; the agent reaches the control plane on the bridge.
        let text = std::fs::read_to_string(&agent.config).unwrap();
        std::fs::write(
            &agent.config,
            text.replace("host = \"127.0.0.1\"", &format!("host = \"{CP_IP}\"")),
        )
        .unwrap();
        let mut n = Node {
            agent,
            ns: ns.clone(),
            vpn_ip,
            underlay: format!("10.77.0.{}", 11 + i),
            node_id,
            pub_key: String::new(),
        };
        start(&mut n);
        cp.wait_online(&n.node_id);
        // An empty set brings the interface up and tells the node's key (made on the node).
        let r = send(&cp, &n, &json!({"peers": []}));
        let p = ok(&r);
        n.pub_key = p["nodePeer"]["pubKey"].as_str().unwrap().to_string();
        assert_eq!(p["nodePeer"]["vpnIp"], n.vpn_ip, "{p}");
        assert_eq!(p["nodePeer"]["endpointIp"], n.underlay, "{p}");
        assert_eq!(p["nodePeer"]["endpointPort"], 51820, "{p}");
        // HELLO told the control plane the same key before it sent any peer.
        let listed = cp.node(&n.node_id).expect("node listed");
        assert_eq!(listed["wireguardPublicKey"], n.pub_key.as_str(), "{listed}");
        nodes.push(n);
    }

    // Generation 1, complete, to all three: every pair pings.
    let all: Vec<Value> = nodes.iter().map(peer).collect();
    for n in &nodes {
        let others: Vec<Value> = all
            .iter()
            .filter(|p| p["pubKey"] != n.pub_key.as_str())
            .cloned()
            .collect();
        let r = send(
            &cp,
            n,
            &json!({"peers": others, "generation": 1, "complete": true}),
        );
        assert_eq!(strs(&ok(&r)["added"]).len(), 2, "{r:?}");
    }
    for a in &nodes {
        for b in &nodes {
            if a.pub_key != b.pub_key {
                wait_ping(a, b, &format!("{} pings {}", a.vpn_ip, b.vpn_ip));
            }
        }
    }
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);

    // Generation 2 without C: A and B drop C; A↔B still pings, A↔C does not.
    for (n, other) in [(a, b), (b, a)] {
        let r = send(
            &cp,
            n,
            &json!({"peers": [peer(other)], "generation": 2, "complete": true}),
        );
        let p = ok(&r);
        assert_eq!(strs(&p["removed"]), vec![c.pub_key.clone()], "{p}");
        assert_eq!(p["unchanged"], 1, "{p}");
    }
    assert!(ping(a, b));
    assert!(!ping(a, c), "A still reaches C after C was removed");
    // A stale generation 1 is refused and changes nothing.
    let r = send(
        &cp,
        a,
        &json!({"peers": [peer(b), peer(c)], "generation": 1, "complete": true}),
    );
    assert_eq!(r.error_code(), Some("stale"), "{r:?}");
    assert!(!ping(a, c), "a stale set changed the device");

    // Unchanged peers keep their handshake across a re-apply (no bounce).
    let before = handshake_with(a, &b.pub_key);
    assert!(before > 0, "no handshake between A and B");
    let r = send(
        &cp,
        a,
        &json!({"peers": [peer(b)], "generation": 3, "complete": true}),
    );
    let p = ok(&r);
    assert_eq!(
        (
            strs(&p["added"]).len(),
            strs(&p["changed"]).len(),
            p["unchanged"].clone()
        ),
        (0, 0, json!(1)),
        "{p}"
    );
    assert_eq!(
        handshake_with(a, &b.pub_key),
        before,
        "the peer was bounced"
    );
    // `runos vpn status` shows the same, through the admin socket.
    let out = a.agent.cli(&["vpn", "status", "--json"], "");
    assert!(out.status.success(), "vpn status: {}", describe(&out));
    let st: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["generation"], 3, "{st}");
    assert_eq!(st["backend"], "userspace", "{st}");
    assert_eq!(st["publicKey"], a.pub_key.as_str(), "{st}");
    let peers = st["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 1, "{st}");
    assert_eq!(peers[0]["pubKey"], b.pub_key.as_str(), "{st}");
    assert_eq!(
        peers[0]["allowedIps"],
        json!([format!("{}/32", b.vpn_ip)]),
        "{st}"
    );
    assert!(
        peers[0]["lastHandshakeSecsAgo"]
            .as_u64()
            .is_some_and(|s| s < 120),
        "{st}"
    );
    assert!(peers[0]["rxBytes"].as_u64().is_some_and(|n| n > 0), "{st}");
    let st = a.agent.status();
    assert_eq!(st["overlay"]["generation"], 3, "{st}");
    assert_eq!(st["overlay"]["peers"], 1, "{st}");
    let out = a.agent.cli(&["vpn", "status"], "");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&b.pub_key),
        "{}",
        describe(&out)
    );

    // A set that would capture the control plane's route is refused; the session stays up.
    let mut bad = peer(c);
    bad["vpnIp"] = json!(CP_IP);
    let r = send(
        &cp,
        a,
        &json!({"peers": [peer(b), bad], "generation": 4, "complete": true}),
    );
    assert_eq!(r.error_code(), Some("failed"), "{r:?}");
    assert!(
        r.payload["message"]
            .as_str()
            .unwrap_or("")
            .contains("control plane"),
        "{r:?}"
    );
    let r = cp.send(&a.node_id, "GET_NODE_STATUS", "{}");
    assert_eq!(r.kind, "NODE_STATUS", "{r:?}");
    assert!(ping(a, b));

    // The VIP: A takes it (generation 5), hands it to B (6); A restarted and sent 5 again
    // refuses it; a failing health check refuses it on C.
    let r = vip(&cp, a, "VIP_ASSIGN", json!({"generation": 5}));
    assert_eq!(r["ok"], true, "{r}");
    assert!(holds_vip(a));
    let r = vip(&cp, a, "VIP_RELEASE", json!({"generation": 6}));
    assert_eq!(r["ok"], true, "{r}");
    assert!(!holds_vip(a));
    let r = vip(
        &cp,
        b,
        "VIP_ASSIGN",
        json!({"generation": 6, "leaseSecs": 3}),
    );
    assert_eq!(r["ok"], true, "{r}");
    assert!(holds_vip(b));
    let r = vip(&cp, c, "VIP_ASSIGN", json!({"generation": 7}));
    assert_eq!(r["ok"], false, "{r}");
    assert!(
        r["message"]
            .as_str()
            .unwrap_or("")
            .contains("does not answer"),
        "{r}"
    );
    assert!(!holds_vip(c));
    {
        let a = &mut nodes[0];
        a.agent.stop();
        start(a);
        cp.wait_online(&a.node_id);
    }
    let (a, b) = (&nodes[0], &nodes[1]);
    let r = vip(&cp, a, "VIP_ASSIGN", json!({"generation": 5}));
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["message"].as_str().unwrap_or("").contains("stale"), "{r}");
    assert!(!holds_vip(a));

    // Without the control plane: B's lease runs out and it drops the VIP by itself.
    cp.kill();
    wait_until(DEADLINE, "B drops the VIP after its lease", || {
        !holds_vip(b)
    });

    // Delete B's wg0 by hand; B's agent recreates it from disk.
    run(&["ip", "-n", &b.ns, "link", "del", "wg0"]);
    wait_ping(
        a,
        b,
        "A pings B again after B's wg0 was deleted (no control plane)",
    );
    wait_until(DEADLINE, "B logs the repair", || {
        b.agent
            .log()
            .contains("overlay reconcile: started wireguard-go")
    });

    // Restart B's agent (and lose its interface, as a reboot would) while the control plane is
    // still down: the mesh comes back from disk.
    let b = &mut nodes[1];
    b.agent.stop();
    run(&["ip", "-n", &b.ns, "link", "del", "wg0"]);
    start(b);
    let (a, b) = (&nodes[0], &nodes[1]);
    wait_ping(
        a,
        b,
        "A pings B after B's agent restarted without a control plane",
    );
    wait_ping(b, a, "B pings A after its restart");

    // UNINSTALL_NODE on C, through the control plane: NO_CONTENT, and after the ACK C's agent
    // removes its identity and stops; its overlay is gone.
    cp.restart();
    let c = &mut nodes[2];
    cp.wait_online(&c.node_id);
    let r = cp.send(&c.node_id, "UNINSTALL_NODE", "{}");
    assert_eq!(r.kind, "NO_CONTENT", "{r:?}");
    wait_until(DEADLINE, "C's agent stops after UNINSTALL_NODE", || {
        !c.agent.is_running()
    });
    assert!(!link_exists(&c.ns), "C's wg0 is gone");
    assert!(
        !c.agent.dir.join("etc/node.key").exists(),
        "C's key is removed"
    );
    assert!(!c.agent.dir.join("etc/node.crt").exists());
    assert!(
        !c.agent.dir.join("state/wireguard/private.key").exists(),
        "C's WireGuard key is removed"
    );
    let log = c.agent.log();
    assert!(log.contains("uninstall: overlay: done"), "{log}");
    assert!(log.contains("uninstall finished"), "{log}");

    // `runos uninstall` on A: refused while A's agent runs; once stopped, the same steps here.
    let a = &mut nodes[0];
    let out = uninstall_cli(a);
    assert_eq!(out.status.code(), Some(7), "{}", describe(&out));
    a.agent.stop();
    let out = uninstall_cli(a);
    assert!(out.status.success(), "{}", describe(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], true, "{report}");
    let overlay = &report["steps"][2];
    assert_eq!(overlay["step"], "overlay", "{report}");
    assert_eq!(overlay["status"], "done", "{report}");
    assert_eq!(
        report["steps"][1]["status"], "skipped",
        "kubeadm is not installed: {report}"
    );
    assert!(!link_exists(&a.ns), "A's wg0 is gone");
    assert!(!a.agent.dir.join("etc/node.key").exists());
    // Again: nothing left to do, still success.
    let out = uninstall_cli(a);
    assert!(out.status.success(), "{}", describe(&out));
}

/// Whether `wg0` exists in namespace `ns`.
fn link_exists(ns: &str) -> bool {
    Command::new("ip")
        .args(["-n", ns, "link", "show", "wg0"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `runos uninstall --yes --json` for node `n`, in its network namespace.
fn uninstall_cli(n: &Node) -> std::process::Output {
    Command::new("ip")
        .args(["netns", "exec", &n.ns])
        .arg(runos_e2e::bin("runos"))
        .arg("--config")
        .arg(&n.agent.config)
        .args(["uninstall", "--yes", "--json"])
        .output()
        .unwrap()
}
