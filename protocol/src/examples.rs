//! One valid payload per catalog type, for tests here and in other crates (the agent's
//! validation test per type is driven from them). The same examples appear in
//! `docs/protocol.md`.

use serde_json::{Value, json};

use crate::instructions::types;

/// A valid WireGuard public key.
pub const KEY: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
/// A base64 ConfigMap manifest.
pub const CR: &str = "YXBpVmVyc2lvbjogdjEKa2luZDogQ29uZmlnTWFwCm1ldGFkYXRhOgogIG5hbWU6IGRlbW8K";
/// A base64 CustomResourceDefinition manifest.
pub const CRD: &str =
    "YXBpVmVyc2lvbjogYXBpZXh0ZW5zaW9ucy5rOHMuaW8vdjEKa2luZDogQ3VzdG9tUmVzb3VyY2VEZWZpbml0aW9uCg==";

/// One valid payload per catalog type, spelled with the reference's field names. The same
/// examples appear in `docs/protocol.md`.
pub fn valid() -> Vec<(&'static str, Value)> {
    vec![
        (
            types::SET_VPN_PEERS,
            json!({"peers": [{"pubKey": KEY, "endpointIp": "203.0.113.7", "vpnIp": "172.24.0.2"}]}),
        ),
        (types::GET_NODE_STATUS, json!({})),
        (types::GET_CLUSTER_JOIN_CMD, json!({"asCp": true})),
        (types::APPLY_CR, json!({"crB64": CR})),
        (types::APPLY_OPERATOR, json!({"crdB64": CRD})),
        (
            types::DELETE_CR,
            json!({"type": "clusters", "id": "c-1234"}),
        ),
        (
            types::RUN_KUBECTL_COMMAND,
            json!(["get", "nodes", "-o", "json"]),
        ),
        (
            types::RUN_REMOTE_SCRIPT,
            json!({"script": "install-cni.sh", "params": {"cidr": "10.244.0.0/16"}, "runInBackground": false}),
        ),
        (
            types::INSTALL_HELM_CHART,
            json!({"repoUrl": "https://charts.example.com", "myRepoName": "example",
                   "myChartName": "web", "chartName": "nginx", "namespace": "web",
                   "valuesUrl": "", "version": "1.2.3"}),
        ),
        (
            types::UNINSTALL_HELM_CHART,
            json!({"myRepoName": "example", "myChartName": "web", "namespace": "web"}),
        ),
        (
            types::RUN_WEB_REQUEST,
            json!({"url": "https://10.0.0.5:8443/healthz", "method": "GET", "postData": "",
                   "allowInsecure": false, "headers": {"Accept": "application/json"}}),
        ),
        (types::UNINSTALL_NODE, json!({})),
        (types::REMOVE_ETCD_MEMBER, json!({"node_ip": "10.0.0.3"})),
        (
            types::UPDATE_DNSMASQ,
            json!({"fileContents": "server=1.1.1.1\naddress=/cluster.local/10.96.0.10\n"}),
        ),
        (
            types::UPGRADE_NODE_K8S,
            json!({"targetKubernetesVersion": "1.30.2", "targetContainerdVersion": "1.7.12",
                   "targetHelmVersion": "3.15.2", "kubeRepoVersion": "v1.30", "isFirstCp": true}),
        ),
        (types::VIP_ASSIGN, json!({"generation": 42})),
        (types::VIP_RELEASE, json!({"generation": 42})),
        (
            types::RUN_COMMAND,
            json!({"argv": ["/usr/bin/uptime"], "env": {"TZ": "UTC"}, "cwd": "/", "timeoutSecs": 30}),
        ),
        (
            types::CANCEL,
            json!({"tag": "3f0e4b8e-3c55-4b8f-9d6a-3e9a1b0c2d4e"}),
        ),
        (
            types::UPDATE_AGENT,
            json!({"version": "v0.2.0", "allowDowngrade": false}),
        ),
        (
            types::INSTALL_PACKAGES,
            json!({"packages": [{"name": "kubeadm", "version": "1.30.2-1.1"}, {"name": "jq"}],
                   "hold": true, "unhold": true, "updateIndex": false}),
        ),
        (
            types::REMOVE_PACKAGES,
            json!({"packages": [{"name": "jq"}], "purge": true, "unhold": false}),
        ),
        (types::GET_PACKAGES, json!({"names": ["kubeadm", "jq"]})),
    ]
}
