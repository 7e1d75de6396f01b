//! `GET_CLUSTER_JOIN_CMD` against a recording stand-in `kubeadm` (a shell script: kubeadm cannot
//! be obtained on the test machines, see `common`). The stand-in prints known secrets, and the
//! tests check that they reach the reply only, never an error message or a `LOG` line.

mod common;

use std::time::Duration;

use common::{Bench, ctx, logs};
use runos_kubeadm::get_cluster_join_cmd;
use runos_protocol::ErrorCode;
use runos_protocol::instructions::GetClusterJoinCmd;

const TOKEN: &str = "abcdef.0123456789abcdef";
const HASH: &str = "8f3b2c1d0e9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c";
const CERT_KEY: &str = "0f1e2d3c4b5a69780f1e2d3c4b5a69780f1e2d3c4b5a69780f1e2d3c4b5a6978";
const ENC_KEY: &str = "c2VjcmV0LWtleS0wMTIzNDU2Nzg5YWJjZGVmMDEyMzQ=";

fn join_line() -> String {
    format!(
        "kubeadm join 10.0.0.1:6443 --token {TOKEN} --discovery-token-ca-cert-hash sha256:{HASH} \n"
    )
}

fn no_secret(texts: &[String]) {
    for t in texts {
        for s in [TOKEN, "0123456789abcdef", CERT_KEY, ENC_KEY, HASH] {
            assert!(!t.contains(s), "a secret leaked into {t:?}");
        }
    }
}

/// Writes an API server manifest whose `--encryption-provider-config` names an
/// EncryptionConfiguration in the bench (through a hostPath mount).
fn control_plane_files(b: &Bench, with_flag: bool) {
    let enc_dir = b.path("enc");
    std::fs::create_dir_all(&enc_dir).unwrap();
    std::fs::write(
        enc_dir.join("config.yaml"),
        format!(
            "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  - resources:\n      - secrets\n    providers:\n      - aescbc:\n          keys:\n            - name: key1\n              secret: {ENC_KEY}\n      - identity: {{}}\n"
        ),
    )
    .unwrap();
    let flag = if with_flag {
        "    - --encryption-provider-config=/etc/kubernetes/enc/config.yaml\n"
    } else {
        ""
    };
    b.write(
        "kube-apiserver.yaml",
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: kube-apiserver\n  namespace: kube-system\nspec:\n  containers:\n  - name: kube-apiserver\n    image: registry.k8s.io/kube-apiserver:v1.30.2\n    command:\n    - kube-apiserver\n    - --secure-port=6443\n{flag}    volumeMounts:\n    - name: enc\n      mountPath: /etc/kubernetes/enc\n      readOnly: true\n  volumes:\n  - name: enc\n    hostPath:\n      path: {}\n      type: DirectoryOrCreate\n",
            enc_dir.display()
        ),
    );
    b.write(
        "certs.out",
        &format!(
            "[upload-certs] Storing the certificates in Secret \"kubeadm-certs\" in the \"kube-system\" Namespace\n[upload-certs] Using certificate key:\n{CERT_KEY}\n"
        ),
    );
}

/// A worker's join command: one `kubeadm token create` with a bounded TTL and the admin
/// kubeconfig, its output parsed and written out again; nothing secret in the `LOG` lines.
#[tokio::test]
async fn a_worker_join_command_is_the_parsed_token_line() {
    let b = Bench::new().await;
    b.write("join.out", &join_line());
    let s = b.settings();
    let (ctx, mut rx) = ctx(&s, Duration::from_secs(60));
    let reply = get_cluster_join_cmd(ctx, GetClusterJoinCmd { as_cp: false })
        .await
        .unwrap();
    assert_eq!(reply.join_cmd, join_line().trim());
    assert_eq!(reply.encryption_key, None);
    assert_eq!(
        b.argv(),
        [format!(
            "kubeadm|token|create|--print-join-command|--ttl|7200s|--description|made by runos for GET_CLUSTER_JOIN_CMD|--kubeconfig|{}",
            s.admin_kubeconfig.display()
        )]
    );
    let l = logs(&mut rx);
    assert!(!l.is_empty());
    no_secret(&l);
}

/// A control plane's join command: the encryption key from the EncryptionConfiguration the
/// API server's manifest names, the certificate key from `upload-certs`, then the token.
#[tokio::test]
async fn a_control_plane_join_command_has_the_certificate_key_and_the_encryption_key() {
    let b = Bench::new().await;
    b.write("join.out", &join_line());
    control_plane_files(&b, true);
    let s = b.settings();
    let (ctx, mut rx) = ctx(&s, Duration::from_secs(60));
    let reply = get_cluster_join_cmd(ctx, GetClusterJoinCmd { as_cp: true })
        .await
        .unwrap();
    assert_eq!(
        reply.join_cmd,
        format!(
            "{} --control-plane --certificate-key {CERT_KEY}",
            join_line().trim()
        )
    );
    assert_eq!(reply.encryption_key.as_deref(), Some(ENC_KEY));
    let argv = b.argv();
    assert_eq!(argv.len(), 2);
    assert!(argv[0].starts_with("kubeadm|init|phase|upload-certs|--upload-certs|--kubeconfig|"));
    assert!(argv[1].starts_with("kubeadm|token|create|"));
    no_secret(&logs(&mut rx));
    assert!(!format!("{reply:?}").contains(TOKEN));
}

/// An API server without `--encryption-provider-config` encrypts nothing at rest: the reply
/// has no encryption key (and says so in a `LOG` line).
#[tokio::test]
async fn no_encryption_at_rest_means_no_encryption_key() {
    let b = Bench::new().await;
    b.write("join.out", &join_line());
    control_plane_files(&b, false);
    let s = b.settings();
    let (ctx, mut rx) = ctx(&s, Duration::from_secs(60));
    let reply = get_cluster_join_cmd(ctx, GetClusterJoinCmd { as_cp: true })
        .await
        .unwrap();
    assert!(reply.join_cmd.ends_with(CERT_KEY));
    assert_eq!(reply.encryption_key, None);
    assert!(
        logs(&mut rx)
            .iter()
            .any(|l| l.contains("no --encryption-provider-config"))
    );
}

/// A failing `upload-certs` (which prints secrets on its way out) is `ERROR` `failed`: no
/// token is created, no partial command is answered, and no secret is in the error or the
/// `LOG` lines.
#[tokio::test]
async fn a_failing_upload_certs_is_failed_without_a_partial_command_or_a_leak() {
    let b = Bench::new().await;
    b.write("join.out", &join_line());
    control_plane_files(&b, true);
    b.write(
        "fail-upload-certs",
        &format!("error: cannot upload; key {CERT_KEY} token {TOKEN} enc {ENC_KEY}\n"),
    );
    let s = b.settings();
    let (ctx, mut rx) = ctx(&s, Duration::from_secs(60));
    let e = get_cluster_join_cmd(ctx, GetClusterJoinCmd { as_cp: true })
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Failed);
    assert!(e.message.contains("upload"), "{}", e.message);
    assert!(e.message.contains("exited with 1"), "{}", e.message);
    no_secret(std::slice::from_ref(&e.message));
    no_secret(&logs(&mut rx));
    assert!(
        b.argv().iter().all(|a| !a.contains("token|create")),
        "a token was created after a failed step: {:?}",
        b.argv()
    );
}

/// A failing token creation, and a token line that is not the expected form (it holds a
/// secret), are `ERROR` `failed` with the secret in neither the error nor the `LOG` lines.
#[tokio::test]
async fn a_bad_or_failed_token_line_is_refused_without_a_leak() {
    let b = Bench::new().await;
    b.write("join.out", &format!("{}extra line {TOKEN}\n", join_line()));
    let s = b.settings();
    let (c, mut rx) = ctx(&s, Duration::from_secs(60));
    let e = get_cluster_join_cmd(c, GetClusterJoinCmd { as_cp: false })
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Failed);
    assert!(e.message.contains("more than one line"), "{}", e.message);
    no_secret(&[e.message]);
    no_secret(&logs(&mut rx));

    b.write("fail-token", &format!("failed to create token {TOKEN}\n"));
    let (c, mut rx) = ctx(&s, Duration::from_secs(60));
    let e = get_cluster_join_cmd(c, GetClusterJoinCmd { as_cp: false })
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Failed);
    assert!(e.message.contains("bootstrap token"), "{}", e.message);
    no_secret(&[e.message]);
    no_secret(&logs(&mut rx));
}

/// The encryption configuration cannot be read: `failed` before any kubeadm step runs.
#[tokio::test]
async fn an_unreadable_encryption_configuration_fails_before_kubeadm_runs() {
    let b = Bench::new().await;
    b.write("join.out", &join_line());
    control_plane_files(&b, true);
    std::fs::write(b.path("enc/config.yaml"), format!("kind: [{ENC_KEY}\n")).unwrap();
    let s = b.settings();
    let (c, mut rx) = ctx(&s, Duration::from_secs(60));
    let e = get_cluster_join_cmd(c, GetClusterJoinCmd { as_cp: true })
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Failed);
    assert!(e.message.contains("encryption key"), "{}", e.message);
    no_secret(&[e.message]);
    no_secret(&logs(&mut rx));
    assert!(b.argv().is_empty());
}

/// The encryption configuration is a FIFO (whose open would block until a writer comes):
/// refused at once as not a regular file, before any kubeadm step runs.
#[tokio::test]
async fn a_fifo_as_the_encryption_configuration_is_refused_without_blocking() {
    let b = Bench::new().await;
    b.write("join.out", &join_line());
    control_plane_files(&b, true);
    let cfg = b.path("enc/config.yaml");
    std::fs::remove_file(&cfg).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(&cfg)
        .status()
        .unwrap();
    assert!(made.success());
    let s = b.settings();
    let (c, _rx) = ctx(&s, Duration::from_secs(60));
    let e = tokio::time::timeout(
        Duration::from_secs(20),
        get_cluster_join_cmd(c, GetClusterJoinCmd { as_cp: true }),
    )
    .await
    .expect("reading a FIFO blocked")
    .unwrap_err();
    assert_eq!(e.code, ErrorCode::Failed);
    assert!(e.message.contains("not a regular file"), "{}", e.message);
    assert!(b.argv().is_empty());
}

/// kubeadm fails after printing the join command (a token of letters only, glued to a flag on
/// stderr): the error names the step and its status, never the token.
#[tokio::test]
async fn a_token_of_letters_only_in_a_failed_step_is_redacted() {
    let b = Bench::new().await;
    let token = "abcdef.ghijklmnopqrstuv";
    b.write(
        "fail-token",
        &format!("error: token --token={token} was rejected\n"),
    );
    let s = b.settings();
    let (c, mut rx) = ctx(&s, Duration::from_secs(60));
    let e = get_cluster_join_cmd(c, GetClusterJoinCmd { as_cp: false })
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Failed);
    assert!(e.message.contains("exited with 1"), "{}", e.message);
    assert!(!e.message.contains("ghijklmnopqrstuv"), "{}", e.message);
    assert!(!logs(&mut rx).iter().any(|l| l.contains("ghijklmnopqrstuv")));
}
