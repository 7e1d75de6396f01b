//! `runos verify` and `runos update`, end to end: the real `runos` binary against a local HTTPS
//! release server (`runos_e2e::release`, its own CA given as `update.release_ca_file`) and a
//! TEST-ONLY Sigstore world (`runos-testsign`, its root given as `update.trusted_root`).
//!
//! The "new release" is the freshly built `runos` itself (stripped, to keep downloads small),
//! published under another tag. Debug builds report the version of the `vX.Y.Z` directory they
//! run from when `RUNOS_DEBUG_VERSION_FROM_DIR=1` (`runos_agent::agent_version`), so the same
//! binary installed as `v9.9.9/runos` reports 9.9.9, as a real release would.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use runos_e2e::release::{Fault, ReleaseServer, asset, sha256_hex};
use runos_e2e::{bin, describe};
use runos_testsign::{AttestOptions, World};
use serde_json::Value;

const REPO: &str = "runos-dev/runos";
const VERSION_ENV: &str = "RUNOS_DEBUG_VERSION_FROM_DIR";

/// The freshly built `runos`, stripped of debug info (once per test process).
fn release_binary() -> &'static [u8] {
    static BIN: OnceLock<Vec<u8>> = OnceLock::new();
    BIN.get_or_init(|| {
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("runos-stripped-{}", std::process::id()));
        let stripped = Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&out)
            .arg(bin("runos"))
            .status()
            .is_ok_and(|s| s.success());
        let bytes = fs::read(if stripped { out.clone() } else { bin("runos") }).unwrap();
        let _ = fs::remove_file(&out);
        bytes
    })
}

fn json_of(out: &Output) -> Value {
    let line = String::from_utf8_lossy(&out.stdout);
    let line = line.lines().last().unwrap_or("");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {}", describe(out)))
}

fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| World::generate().unwrap())
}

fn opts(tag: &str) -> AttestOptions {
    AttestOptions::new(REPO, format!("refs/tags/{tag}"))
}

// --- runos verify -------------------------------------------------------------------------------

struct VerifyRig {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    root: PathBuf,
    config: PathBuf,
}

impl VerifyRig {
    fn new() -> VerifyRig {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().to_path_buf();
        let root = dir.join("trusted_root.json");
        fs::write(&root, world().trusted_root_json()).unwrap();
        VerifyRig {
            _dir: d,
            config: dir.join("absent.toml"),
            dir,
            root,
        }
    }

    fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.dir.join(name);
        fs::write(&p, bytes).unwrap();
        p
    }

    fn verify(&self, args: &[&str]) -> Output {
        Command::new(bin("runos"))
            .arg("--config")
            .arg(&self.config)
            .arg("verify")
            .args(args)
            .output()
            .unwrap()
    }
}

#[test]
fn verify_accepts_a_release_and_reports_what_was_verified() {
    let r = VerifyRig::new();
    let bytes = b"a runos release binary".to_vec();
    let file = r.file("nodeagent-linux-amd64", &bytes);
    let bundle = world()
        .attest(&bytes, "nodeagent-linux-amd64", &opts("v1.2.3"))
        .unwrap();
    let b = r.file("b.sigstore.json", &bundle);
    let (f, b, root) = (
        file.to_str().unwrap(),
        b.to_str().unwrap(),
        r.root.to_str().unwrap(),
    );

    let out = r.verify(&[
        f,
        "--bundle",
        b,
        "--version",
        "v1.2.3",
        "--trusted-root",
        root,
        "--json",
    ]);
    assert_eq!(code(&out), 0, "{}", describe(&out));
    let v = json_of(&out);
    assert_eq!(v["verified"], true);
    assert_eq!(v["sha256"], sha256_hex(&bytes));
    assert_eq!(v["asset"], "nodeagent-linux-amd64");
    assert_eq!(
        v["identity"],
        "https://github.com/runos-dev/runos/.github/workflows/release.yml@refs/tags/v1.2.3"
    );
    assert_eq!(v["issuer"], "https://token.actions.githubusercontent.com");
    assert_eq!(v["repository"], "https://github.com/runos-dev/runos");
    assert_eq!(v["ref"], "refs/tags/v1.2.3");
    assert_eq!(v["runner"], "github-hosted");
    assert!(v["commit"].as_str().is_some_and(|c| c.len() == 40), "{v}");
    assert!(v["logIndex"].is_u64(), "{v}");
    assert!(v["signedAt"].is_string(), "{v}");
    assert_eq!(v["checksums"], false);

    // Text output, with a matching checksums.txt.
    let sums = r.file(
        "checksums.txt",
        format!("{}  nodeagent-linux-amd64\n", sha256_hex(&bytes)).as_bytes(),
    );
    let out = r.verify(&[
        f,
        "--bundle",
        b,
        "--version",
        "v1.2.3",
        "--trusted-root",
        root,
        "--checksums",
        sums.to_str().unwrap(),
    ]);
    assert_eq!(code(&out), 0, "{}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "identity:",
        "issuer:",
        "repository:",
        "ref:",
        "commit:",
        "runner:",
        "log index:",
        "signed at:",
        "checksums:",
    ] {
        assert!(text.contains(want), "{want}: {text}");
    }

    // The same with --ref and an explicit --asset for a file under another name.
    let other = r.file("downloaded.bin", &bytes);
    let out = r.verify(&[
        other.to_str().unwrap(),
        "--bundle",
        b,
        "--ref",
        "refs/tags/v1.2.3",
        "--asset",
        "nodeagent-linux-amd64",
        "--trusted-root",
        root,
    ]);
    assert_eq!(code(&out), 0, "{}", describe(&out));
}

#[test]
fn verify_refuses_what_does_not_match() {
    let r = VerifyRig::new();
    let bytes = b"a runos release binary".to_vec();
    let file = r.file("nodeagent-linux-amd64", &bytes);
    let bundle = world()
        .attest(&bytes, "nodeagent-linux-amd64", &opts("v1.2.3"))
        .unwrap();
    let b = r.file("b.sigstore.json", &bundle);
    let (f, b, root) = (
        file.to_str().unwrap(),
        b.to_str().unwrap(),
        r.root.to_str().unwrap(),
    );
    let tampered = r.file("tampered", b"a runos release binarY");
    let bad_sums = r.file(
        "checksums.txt",
        format!("{}  nodeagent-linux-amd64\n", sha256_hex(b"another binary")).as_bytes(),
    );
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                f,
                "--bundle",
                b,
                "--version",
                "v1.2.4",
                "--trusted-root",
                root,
            ],
            "refs/tags/v1.2.4",
        ),
        (
            vec![
                f,
                "--bundle",
                b,
                "--version",
                "v1.2.3",
                "--repo",
                "someone/else",
                "--trusted-root",
                root,
            ],
            "someone/else",
        ),
        (
            vec![
                f,
                "--bundle",
                b,
                "--version",
                "v1.2.3",
                "--workflow",
                ".github/workflows/other.yml",
                "--trusted-root",
                root,
            ],
            "other.yml",
        ),
        (
            vec![
                f,
                "--bundle",
                b,
                "--version",
                "v1.2.3",
                "--asset",
                "nodeagent-linux-arm64",
                "--trusted-root",
                root,
            ],
            "nodeagent-linux-arm64",
        ),
        (
            vec![
                tampered.to_str().unwrap(),
                "--bundle",
                b,
                "--version",
                "v1.2.3",
                "--asset",
                "nodeagent-linux-amd64",
                "--trusted-root",
                root,
            ],
            "verification failed",
        ),
        (
            vec![
                f,
                "--bundle",
                b,
                "--version",
                "v1.2.3",
                "--trusted-root",
                root,
                "--checksums",
                bad_sums.to_str().unwrap(),
            ],
            "sha256 mismatch",
        ),
        // The public-good root does not trust the test world.
        (
            vec![f, "--bundle", b, "--version", "v1.2.3"],
            "verification failed",
        ),
        // Not a bundle at all.
        (
            vec![
                f,
                "--bundle",
                f,
                "--version",
                "v1.2.3",
                "--trusted-root",
                root,
            ],
            "verification failed",
        ),
    ];
    for (args, want) in cases {
        let mut with_json = args.clone();
        with_json.push("--json");
        let out = r.verify(&with_json);
        assert_eq!(code(&out), 10, "{args:?}: {}", describe(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("runos: error: ") && err.contains(want),
            "{args:?}: {want}: {err}"
        );
        let v = json_of(&out);
        assert_eq!(v["verified"], false, "{v}");
        assert_eq!(v["exitCode"], 10, "{v}");
    }

    // Usage errors: exit 2.
    for args in [
        vec![f, "--bundle", b, "--trusted-root", root],
        vec![f, "--bundle", b, "--version", "1.2", "--trusted-root", root],
        vec![
            f,
            "--bundle",
            b,
            "--version",
            "v1.2.3",
            "--ref",
            "refs/tags/v1.2.3",
        ],
        vec![
            "/nonexistent/file",
            "--bundle",
            b,
            "--version",
            "v1.2.3",
            "--trusted-root",
            root,
        ],
        vec![
            f,
            "--bundle",
            "/nonexistent/bundle",
            "--version",
            "v1.2.3",
            "--trusted-root",
            root,
        ],
        vec![
            f,
            "--bundle",
            b,
            "--version",
            "v1.2.3",
            "--repo",
            "not a repo",
        ],
        vec![f, "--version", "v1.2.3"],
    ] {
        let out = r.verify(&args);
        assert_eq!(code(&out), 2, "{args:?}: {}", describe(&out));
    }
}

/// The real GitHub Actions bundle of the attest crate's tests: valid under its own identity and
/// the public-good root, refused as a runos release and under another root.
#[test]
fn verify_real_github_bundle() {
    let r = VerifyRig::new();
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../attest/tests/data/conformance");
    let file = data.join("a.txt");
    let bundle = data.join("happy-path-intoto-in-dsse-v3/bundle.sigstore.json");
    let (f, b) = (file.to_str().unwrap(), bundle.to_str().unwrap());
    let own = [
        f,
        "--bundle",
        b,
        "--repo",
        "sigstore-conformance/extremely-dangerous-public-oidc-beacon",
        "--workflow",
        ".github/workflows/extremely-dangerous-oidc-beacon.yml",
        "--ref",
        "refs/heads/main",
        "--json",
    ];
    let out = r.verify(&own);
    assert_eq!(code(&out), 0, "{}", describe(&out));
    let v = json_of(&out);
    assert_eq!(v["trustedRoot"], "public-good");
    assert_eq!(v["runner"], "github-hosted");

    // As a runos release: wrong identity.
    let out = r.verify(&[f, "--bundle", b, "--version", "v0.1.0"]);
    assert_eq!(code(&out), 10, "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("runos-dev/runos"),
        "{}",
        describe(&out)
    );

    // Under the test world's root instead of public-good.
    let mut args = own.to_vec();
    args.extend(["--trusted-root", r.root.to_str().unwrap()]);
    let out = r.verify(&args);
    assert_eq!(code(&out), 10, "{}", describe(&out));
}

// --- runos update -------------------------------------------------------------------------------

/// A node with runos v0.1.0 installed by the installer's layout, a release server and a config
/// that points the updater at both.
struct Node {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    srv: ReleaseServer,
    config: PathBuf,
    install_dir: PathBuf,
    link: PathBuf,
    state_dir: PathBuf,
    old: PathBuf,
}

impl Node {
    fn new() -> Node {
        Self::with_install_dir(None)
    }

    /// `install_dir`: where new versions go (default `<dir>/lib/runos`, which also holds
    /// v0.1.0).
    fn with_install_dir(install_dir: Option<PathBuf>) -> Node {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().to_path_buf();
        let srv = ReleaseServer::start(&dir.join("release"));
        let old = dir.join("lib/runos/v0.1.0/runos");
        fs::create_dir_all(old.parent().unwrap()).unwrap();
        fs::write(&old, release_binary()).unwrap();
        fs::set_permissions(&old, fs::Permissions::from_mode(0o755)).unwrap();
        let link = dir.join("bin/runos");
        fs::create_dir_all(link.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&old, &link).unwrap();
        let install_dir = install_dir.unwrap_or_else(|| dir.join("lib/runos"));
        let root = dir.join("trusted_root.json");
        fs::write(&root, world().trusted_root_json()).unwrap();
        let config = dir.join("config.toml");
        let p = |s: &str| dir.join(s).display().to_string();
        fs::write(
            &config,
            format!(
                "[paths]\nstate_dir = \"{}\"\nrun_dir = \"{}\"\nkey = \"{}\"\ncertificate = \"{}\"\n\n\
                 [update]\nrelease_base = \"{}\"\nattestations_api = \"{}\"\nrelease_ca_file = \"{}\"\n\
                 trusted_root = \"{}\"\ninstall_dir = \"{}\"\nbin_link = \"{}\"\n",
                p("state"),
                p("run"),
                p("node.key"),
                p("node.crt"),
                srv.base(),
                srv.base(),
                srv.ca_file.display(),
                root.display(),
                install_dir.display(),
                link.display(),
            ),
        )
        .unwrap();
        Node {
            _dir: d,
            state_dir: dir.join("state"),
            dir,
            srv,
            config,
            install_dir,
            link,
            old,
        }
    }

    /// Publish `binary` as release `tag`, attested for `attested_tag`.
    fn publish(&self, tag: &str, binary: &[u8], attested_tag: &str) {
        self.srv.publish(tag, binary);
        let bundle = world()
            .attest(binary, &asset(), &opts(attested_tag))
            .unwrap();
        self.srv
            .publish_file(tag, &format!("{}.sigstore.json", asset()), &bundle);
    }

    /// Run `<exe> --config C ARGS` with the debug version hook on.
    fn run(&self, exe: &Path, args: &[&str]) -> Output {
        Command::new(exe)
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .env(VERSION_ENV, "1")
            .output()
            .unwrap()
    }

    /// `runos update ARGS --json` through the link, as an operator runs it.
    fn update(&self, args: &[&str]) -> Output {
        let mut a = vec!["update"];
        a.extend(args);
        a.push("--json");
        self.run(&self.link, &a)
    }

    fn target(&self) -> PathBuf {
        fs::read_link(&self.link).unwrap()
    }

    fn state(&self) -> Value {
        serde_json::from_slice(&fs::read(self.state_dir.join("update.json")).unwrap()).unwrap()
    }

    /// A refused update: the exit code, the message, and nothing changed on disk.
    fn assert_refused(&self, out: &Output, exit: i32, want: &str) {
        assert_eq!(code(out), exit, "{}", describe(out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("runos: error: ") && err.contains(want),
            "{want}: {}",
            describe(out)
        );
        assert_eq!(json_of(out)["exitCode"], exit);
        assert_eq!(
            self.target(),
            self.old,
            "the link still points at the old version"
        );
        assert_eq!(
            fs::read(&self.old).unwrap(),
            release_binary(),
            "old binary untouched"
        );
        self.assert_no_leftovers();
        let st = self.state();
        assert_eq!(st["last"]["outcome"], "failed", "{st}");
    }

    fn assert_no_leftovers(&self) {
        let mut names = Vec::new();
        if let Ok(rd) = fs::read_dir(&self.install_dir) {
            for e in rd {
                names.push(e.unwrap().file_name().to_string_lossy().into_owned());
            }
        }
        assert!(
            names.iter().all(|n| n == "v0.1.0"),
            "install dir holds only the old version: {names:?}"
        );
        let bin_dir: Vec<_> = fs::read_dir(self.link.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(bin_dir.len(), 1, "{bin_dir:?}");
    }
}

#[test]
fn update_installs_side_by_side_and_swaps_the_link() {
    let n = Node::new();
    let binary = release_binary();
    n.publish("v9.9.9", binary, "v9.9.9");
    let out = n.update(&["--version", "v9.9.9"]);
    assert_eq!(code(&out), 0, "{}", describe(&out));
    let v = json_of(&out);
    assert_eq!(v["from"], "v0.1.0");
    assert_eq!(v["to"], "v9.9.9");
    assert_eq!(v["restart"], false, "no agent runs: {v}");
    assert_eq!(v["verified"]["ref"], "refs/tags/v9.9.9");
    let new = n.install_dir.join("v9.9.9/runos");
    assert_eq!(n.target(), new);
    assert_eq!(fs::read(&new).unwrap(), binary);
    assert_eq!(
        fs::metadata(&new).unwrap().permissions().mode() & 0o7777,
        0o755
    );
    assert_eq!(fs::read(&n.old).unwrap(), binary, "previous version kept");
    let names: Vec<_> = fs::read_dir(&n.install_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "no partial files: {names:?}");
    let st = n.state();
    assert_eq!(st["highestInstalled"], "v9.9.9");
    assert_eq!(
        fs::metadata(n.state_dir.join("update.json"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert_eq!(
        json_of(&n.run(&n.link, &["version", "--json"]))["agentVersion"],
        "9.9.9"
    );
    assert!(n.srv.hits(&format!("/download/v9.9.9/{}", asset())) == 1);

    // Again, through the new link: nothing to do.
    let out = n.update(&["--version", "v9.9.9"]);
    assert_eq!(code(&out), 0, "{}", describe(&out));
    assert_eq!(json_of(&out)["outcome"], "already_current");
    assert_eq!(n.srv.hits(&format!("/download/v9.9.9/{}", asset())), 1);

    // The old binary may not go below the highest version installed before.
    n.publish("v5.0.0", binary, "v5.0.0");
    let out = n.run(&n.old, &["update", "--version", "v5.0.0"]);
    assert_eq!(code(&out), 12, "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("highest version installed"));
    assert_eq!(n.target(), new);
}

#[test]
fn update_refuses_a_tampered_binary() {
    let n = Node::new();
    let binary = release_binary();
    let mut tampered = binary.to_vec();
    let mid = tampered.len() / 2;
    tampered[mid] ^= 1;
    // checksums.txt and the bundle describe the genuine binary; the server sends another.
    n.publish("v9.9.9", binary, "v9.9.9");
    n.srv
        .publish_raw("v9.9.9", &tampered, &ReleaseServer::checksums(binary));
    n.assert_refused(&n.update(&["--version", "v9.9.9"]), 10, "sha256 mismatch");

    // checksums.txt rewritten to match the tampered binary: the attestation still refuses it.
    n.srv
        .publish_raw("v9.9.9", &tampered, &ReleaseServer::checksums(&tampered));
    n.assert_refused(
        &n.update(&["--version", "v9.9.9"]),
        10,
        "attestation rejected",
    );
}

#[test]
fn update_refuses_swapped_checksums() {
    let n = Node::new();
    let binary = release_binary();
    n.publish("v9.9.9", binary, "v9.9.9");
    n.srv.publish_raw(
        "v9.9.9",
        binary,
        &ReleaseServer::checksums(b"another binary entirely"),
    );
    n.assert_refused(&n.update(&["--version", "v9.9.9"]), 10, "sha256 mismatch");
}

#[test]
fn update_refuses_a_bundle_for_another_version() {
    let n = Node::new();
    n.publish("v9.9.9", release_binary(), "v9.9.8");
    n.assert_refused(&n.update(&["--version", "v9.9.9"]), 10, "refs/tags/v9.9.9");
}

#[test]
fn update_refuses_downgrades_unless_allowed() {
    let n = Node::new();
    n.publish("v0.0.9", release_binary(), "v0.0.9");
    n.assert_refused(&n.update(&["--version", "v0.0.9"]), 12, "--allow-downgrade");
    assert_eq!(n.srv.hits(&format!("/download/v0.0.9/{}", asset())), 0);
    let out = n.update(&["--version", "v0.0.9", "--allow-downgrade"]);
    assert_eq!(code(&out), 0, "{}", describe(&out));
    assert_eq!(n.target(), n.install_dir.join("v0.0.9/runos"));
}

#[test]
fn update_refuses_truncated_and_missing_downloads() {
    let n = Node::new();
    let binary = release_binary();
    n.publish("v9.9.9", binary, "v9.9.9");
    n.srv.fault(
        &format!("/download/v9.9.9/{}", asset()),
        Fault::Truncate {
            send: binary.len() / 2,
        },
    );
    n.assert_refused(&n.update(&["--version", "v9.9.9"]), 11, "truncated");
    n.assert_refused(&n.update(&["--version", "v9.9.7"]), 11, "404");
}

/// A release without `<asset>.sigstore.json`: the bundle comes from the attestations API
/// (`update.attestations_api`, here the test server), looked up by the binary's digest.
#[test]
fn update_falls_back_to_the_attestations_api() {
    let n = Node::new();
    let binary = release_binary();
    n.srv.publish("v9.9.9", binary);
    let api_path = format!("/repos/{REPO}/attestations/sha256:{}", sha256_hex(binary));
    // Only an attestation for another tag: refused.
    let other: Value =
        serde_json::from_slice(&world().attest(binary, &asset(), &opts("v9.9.8")).unwrap())
            .unwrap();
    let answer = serde_json::json!({"attestations": [{"bundle": other, "repository_id": 1}]});
    n.srv.route(&api_path, serde_json::to_vec(&answer).unwrap());
    n.assert_refused(&n.update(&["--version", "v9.9.9"]), 10, "refs/tags/v9.9.9");
    assert_eq!(n.srv.hits(&api_path), 1);

    // The right one among others: installed.
    let good: Value =
        serde_json::from_slice(&world().attest(binary, &asset(), &opts("v9.9.9")).unwrap())
            .unwrap();
    let answer = serde_json::json!({"attestations": [{"bundle": other}, {"bundle": good}]});
    n.srv.route(&api_path, serde_json::to_vec(&answer).unwrap());
    let out = n.update(&["--version", "v9.9.9"]);
    assert_eq!(code(&out), 0, "{}", describe(&out));
    assert_eq!(n.target(), n.install_dir.join("v9.9.9/runos"));
}

#[test]
fn update_usage_errors() {
    let n = Node::new();
    for v in ["9.9.9", "v9.9", "v9.9.9-rc.1", "latest"] {
        let out = n.update(&["--version", v]);
        assert_eq!(code(&out), 2, "{v}: {}", describe(&out));
    }
    // No --version and no running agent to ask for the advertised one.
    let out = n.update(&[]);
    assert_eq!(code(&out), 12, "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--version"));
    assert_eq!(n.target(), n.old);
}

/// The install directory is a tmpfs too small for the binary: the download fails with ENOSPC,
/// nothing is left behind, the link is untouched. Needs root (mount).
#[test]
fn update_survives_a_full_disk() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("SKIP update_survives_a_full_disk: needs root to mount a tmpfs");
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let small = scratch.path().join("small");
    fs::create_dir_all(&small).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs"])
        .arg(&small)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("SKIP update_survives_a_full_disk: cannot mount a tmpfs here");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(small.clone());
    let n = Node::with_install_dir(Some(small.clone()));
    n.publish("v9.9.9", release_binary(), "v9.9.9");
    let out = n.update(&["--version", "v9.9.9"]);
    assert_eq!(code(&out), 13, "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("No space left"),
        "{}",
        describe(&out)
    );
    assert_eq!(n.target(), n.old);
    assert_eq!(
        fs::read_dir(&small).unwrap().count(),
        0,
        "nothing left in the full file system"
    );
    let _ = &n.dir;
}

// --- restart, health gate, rollback -------------------------------------------------------------

/// A registered node whose agent runs under a supervisor stand-in (a shell loop that runs
/// `bin_link` again whenever the agent exits, as systemd's `Restart=always` does). The
/// service restart command SIGTERMs the agent; the hand-off is detached with `setsid`, as
/// `systemd-run` detaches it from the agent's cgroup.
struct Supervised {
    node: Node,
    cp: runos_e2e::ControlPlane,
    node_id: String,
    _agent: runos_e2e::Agent,
    supervisor: std::process::Child,
    stop: PathBuf,
}

impl Supervised {
    fn start(health_timeout_secs: u64) -> Supervised {
        Self::start_with(health_timeout_secs, &[], "")
    }

    /// `cp_args`: extra `serve` flags; `update_extra`: extra `[update]` lines.
    fn start_with(health_timeout_secs: u64, cp_args: &[&str], update_extra: &str) -> Supervised {
        let mut node = Node::new();
        let cp = runos_e2e::ControlPlane::start(&node.dir.join("cp"), cp_args);
        let mut agent = runos_e2e::Agent::new(&node.dir.join("agent"), &cp, "");
        let node_id = agent.register(&cp);
        let d = |s: &str| node.dir.join(s).display().to_string();
        let handoff = format!(
            "setsid -f \"$0\" \"$@\" >> {} 2>&1 < /dev/null",
            d("handoff.log")
        );
        let mut config = fs::read_to_string(&agent.config).unwrap();
        config.push_str(&format!(
            "\n[update]\nrelease_base = \"{}\"\nattestations_api = \"{}\"\nrelease_ca_file = \"{}\"\ntrusted_root = \"{}\"\n\
             install_dir = \"{}\"\nbin_link = \"{}\"\nhealth_timeout_secs = {health_timeout_secs}\n\
             restart_command = [\"sh\", \"-c\", {:?}, \"{{runos}}\", \"--config\", \"{{config}}\", \
             \"update-finish\", \"--from\", \"{{from}}\", \"--to\", \"{{to}}\", \"--previous\", \"{{previous}}\"]\n\
             service_restart_command = [\"sh\", \"-c\", \"kill -TERM $(cat {})\"]\n{update_extra}\n",
            node.srv.base(),
            node.srv.base(),
            node.srv.ca_file.display(),
            d("trusted_root.json"),
            node.install_dir.display(),
            node.link.display(),
            handoff,
            d("agent.pid"),
        ));
        fs::write(&agent.config, config).unwrap();
        node.config = agent.config.clone();
        node.state_dir = agent.dir.join("state");
        let stop = node.dir.join("stop");
        let script = "while [ ! -e \"$4\" ]; do \"$1\" --config \"$2\" agent >> \"$5\" 2>&1 & \
                      echo $! > \"$3\"; wait $!; sleep 0.2; done";
        let supervisor = Command::new("sh")
            .args(["-c", script, "supervisor"])
            .arg(&node.link)
            .arg(&agent.config)
            .arg(node.dir.join("agent.pid"))
            .arg(&stop)
            .arg(agent.log_path())
            .env(VERSION_ENV, "1")
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let s = Supervised {
            node,
            cp,
            node_id,
            _agent: agent,
            supervisor,
            stop,
        };
        s.wait_running("0.1.0");
        s
    }

    fn status(&self) -> Value {
        let out = self.node.run(&self.node.link, &["status", "--json"]);
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    fn wait_running(&self, version: &str) {
        runos_e2e::wait_until(
            runos_e2e::DEADLINE,
            &format!("agent {version} connected"),
            || {
                let s = self.status();
                s["agentVersion"] == version && s["connection"]["state"] == "connected"
            },
        );
    }

    fn update(&self, args: &[&str]) -> Output {
        self.node.update(args)
    }

    fn state(&self) -> Value {
        self.node.state()
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        let _ = fs::write(&self.stop, b"");
        if let Ok(pid) = fs::read_to_string(self.node.dir.join("agent.pid")) {
            if let Ok(pid) = pid.trim().parse::<u32>() {
                runos_e2e::signal(pid, rustix::process::Signal::TERM);
            }
        }
        let _ = runos_e2e::wait_exit(&mut self.supervisor, runos_e2e::DEADLINE, "supervisor");
    }
}

#[test]
fn update_restarts_into_the_new_version() {
    let s = Supervised::start(30);
    s.node.publish("v9.9.9", release_binary(), "v9.9.9");
    let out = s.update(&["--version", "v9.9.9"]);
    assert_eq!(code(&out), 0, "{}", describe(&out));
    let v = json_of(&out);
    assert_eq!(v["restart"], true, "{v}");
    assert_eq!(v["outcome"], "ok", "{v}");
    s.wait_running("9.9.9");
    let st = s.state();
    assert_eq!(st["last"]["outcome"], "ok", "{st}");
    assert_eq!(st["last"]["to"], "v9.9.9", "{st}");
    let status = s.status();
    assert_eq!(status["lastUpdate"]["outcome"], "ok", "{status}");
    assert_eq!(s.node.target(), s.node.install_dir.join("v9.9.9/runos"));
}

/// The new version never connects (a script that answers `version` and then only sleeps): the
/// hand-off rolls back to the old binary, which runs and connects again, and refuses the
/// version for automatic updates.
#[test]
fn update_rolls_back_a_version_that_never_connects() {
    let s = Supervised::start(10);
    let bad = b"#!/bin/sh\nfor a in \"$@\"; do\n  if [ \"$a\" = version ]; then echo '{\"agentVersion\":\"9.9.9\",\"protocolVersion\":1}'; exit 0; fi\ndone\nexec sleep 3600\n";
    s.node.publish("v9.9.9", bad, "v9.9.9");
    let out = s.update(&["--version", "v9.9.9"]);
    assert_eq!(code(&out), 14, "{}", describe(&out));
    let v = json_of(&out);
    assert_eq!(v["outcome"], "rolled_back", "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap_or("")
            .contains("rolled back to v0.1.0"),
        "{v}"
    );
    assert_eq!(s.node.target(), s.node.old);
    s.wait_running("0.1.0");
    let st = s.state();
    assert_eq!(st["last"]["outcome"], "rolled_back", "{st}");
    assert_eq!(st["refused"], serde_json::json!(["v9.9.9"]), "{st}");
    let status = s.status();
    assert_eq!(status["lastUpdate"]["outcome"], "rolled_back", "{status}");
    let text = s.node.run(&s.node.link, &["status"]);
    assert!(
        String::from_utf8_lossy(&text.stdout)
            .contains("last update:    v0.1.0 -> v9.9.9: rolled_back"),
        "{}",
        describe(&text)
    );
}

// --- control plane integration ------------------------------------------------------------------

#[test]
fn update_agent_instruction_and_advertised_version() {
    let s = Supervised::start_with(30, &["--advertise-version", "v9.9.9"], "");
    s.node.publish("v9.9.9", release_binary(), "v9.9.9");
    // WELCOME's advertised version reaches `runos status`.
    runos_e2e::wait_until(runos_e2e::DEADLINE, "advertised version in status", || {
        s.status()["advertisedAgentVersion"] == "v9.9.9"
    });
    // A downgrade without allowDowngrade is refused with the reason.
    s.node.publish("v0.0.9", release_binary(), "v0.0.9");
    let r =
        s.cp.send(&s.node_id, "UPDATE_AGENT", r#"{"version": "v0.0.9"}"#);
    assert_eq!(r.error_code(), Some("failed"), "{r:?}");
    assert!(
        r.payload["message"]
            .as_str()
            .unwrap_or("")
            .contains("--allow-downgrade"),
        "{r:?}"
    );

    let r =
        s.cp.send(&s.node_id, "UPDATE_AGENT", r#"{"version": "9.9.9"}"#);
    assert_eq!(r.kind, "UPDATE_AGENT_RESPONSE", "{r:?}");
    assert_eq!(r.payload["previousVersion"], "0.1.0");
    assert_eq!(r.payload["newVersion"], "9.9.9");
    assert_eq!(r.payload["restart"], true);
    s.wait_running("9.9.9");
    runos_e2e::wait_until(runos_e2e::DEADLINE, "lastUpdate ok in nodes --json", || {
        s.cp.node(&s.node_id).is_some_and(|n| {
            n["lastUpdate"]["outcome"] == "ok" && n["lastUpdate"]["to"] == "v9.9.9"
        })
    });
    assert_eq!(s.cp.node(&s.node_id).unwrap()["agentVersion"], "9.9.9");

    // Already running: nothing to do.
    let r =
        s.cp.send(&s.node_id, "UPDATE_AGENT", r#"{"version": "v9.9.9"}"#);
    assert_eq!(r.kind, "UPDATE_AGENT_RESPONSE", "{r:?}");
    assert_eq!(r.payload["restart"], false, "{r:?}");

    // `runos update` without --version targets the advertised version (already running).
    let out = s.update(&[]);
    assert_eq!(code(&out), 0, "{}", describe(&out));
    assert_eq!(json_of(&out)["outcome"], "already_current");
}

#[test]
fn auto_update_follows_the_advertised_version() {
    let s = Supervised::start_with(30, &["--advertise-version", "v9.9.9"], "auto = true");
    s.node.publish("v9.9.9", release_binary(), "v9.9.9");
    s.wait_running("9.9.9");
    runos_e2e::wait_until(runos_e2e::DEADLINE, "update recorded", || {
        s.state()["last"]["outcome"] == "ok"
    });
    assert_eq!(s.node.target(), s.node.install_dir.join("v9.9.9/runos"));
}

/// An automatic update to a version that fails its health gate is rolled back, and the
/// restarted old agent does not try that version again. (The agent may see the advertised
/// version before the test has published the whole release: that attempt fails and is retried,
/// so the download count is judged from the rollback on.)
#[test]
fn auto_update_does_not_retry_a_refused_version() {
    let s = Supervised::start_with(10, &["--advertise-version", "v9.9.9"], "auto = true");
    let bad = b"#!/bin/sh\nfor a in \"$@\"; do\n  if [ \"$a\" = version ]; then echo '{\"agentVersion\":\"9.9.9\",\"protocolVersion\":1}'; exit 0; fi\ndone\nexec sleep 3600\n";
    s.node.publish("v9.9.9", bad, "v9.9.9");
    runos_e2e::wait_until(
        runos_e2e::DEADLINE * 2,
        "automatic update rolled back",
        || {
            s.node.state_dir.join("update.json").exists()
                && s.state()["last"]["outcome"] == "rolled_back"
        },
    );
    let download = format!("/download/v9.9.9/{}", asset());
    let hits_at_rollback = s.node.srv.hits(&download);
    assert!(hits_at_rollback >= 1);
    s.wait_running("0.1.0");
    let log = s.node.dir.join("agent/agent.log");
    runos_e2e::wait_until(runos_e2e::DEADLINE, "the refused version skipped", || {
        fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("refused after a failed health gate; not installing it automatically")
    });
    assert_eq!(s.node.srv.hits(&download), hits_at_rollback);
    assert_eq!(s.state()["last"]["outcome"], "rolled_back");
    assert_eq!(s.state()["refused"], serde_json::json!(["v9.9.9"]));
    assert_eq!(s.node.target(), s.node.old);
}

/// An update.json written by a newer version (an unknown field) keeps its downgrade floor, and a
/// refusal never rewrites the state: a second attempt to install an older version is refused
/// too. (Regression test from the updater review: the floor used to be silently reset.)
#[test]
fn a_damaged_or_newer_update_state_keeps_the_downgrade_floor() {
    let n = Node::new();
    let binary = release_binary();
    n.publish("v9.9.9", binary, "v9.9.9");
    let out = n.update(&["--version", "v9.9.9"]);
    assert_eq!(code(&out), 0, "{}", describe(&out));
    assert_eq!(n.state()["highestInstalled"], "v9.9.9");
    let path = n.state_dir.join("update.json");
    let text = fs::read_to_string(&path)
        .unwrap()
        .replacen('{', "{\n  \"pending\": null,", 1);
    fs::write(&path, &text).unwrap();
    n.publish("v5.0.0", binary, "v5.0.0");
    let first = n.run(&n.old, &["update", "--version", "v5.0.0", "--json"]);
    eprintln!("first attempt: {}", describe(&first));
    assert_eq!(code(&first), 12, "{}", describe(&first));
    eprintln!(
        "update.json after the refusal: {}",
        fs::read_to_string(&path).unwrap()
    );
    let second = n.run(&n.old, &["update", "--version", "v5.0.0", "--json"]);
    assert_eq!(
        code(&second),
        12,
        "v5.0.0 is below the highest version ever installed (v9.9.9): must be refused without --allow-downgrade; link now {}: {}",
        n.target().display(),
        describe(&second)
    );
}

/// The dispatcher's deadline (or a CANCEL) stops an UPDATE_AGENT whose download stalls: the
/// control plane is told `timeout`, and the blocking updater stops at its next step, installing
/// and linking nothing. (Regression test from the updater review.)
#[test]
fn an_update_agent_past_its_deadline_installs_nothing() {
    let s = Supervised::start(30);
    s.node.publish("v9.9.9", release_binary(), "v9.9.9");
    s.node.srv.fault(
        &format!("/download/v9.9.9/{}", asset()),
        Fault::Delay { ms: 6000 },
    );
    let r = s.cp.send_with(
        &s.node_id,
        "UPDATE_AGENT",
        r#"{"version": "v9.9.9"}"#,
        &["--instruction-timeout", "2s"],
    );
    assert_eq!(r.error_code(), Some("timeout"), "{r:?}");
    // The blocking updater notices the cancellation once the stalled download moves again.
    runos_e2e::wait_until(
        std::time::Duration::from_secs(60),
        "the updater to stop",
        || {
            fs::read_to_string(s.node.state_dir.join("update.json"))
                .unwrap_or_default()
                .contains("cancelled")
        },
    );
    assert_eq!(
        s.node.target(),
        s.node.old,
        "the control plane was told the update timed out and was killed, but the link was swapped to {} (agent now {:?})",
        s.node.target().display(),
        s.status()["agentVersion"]
    );
}

/// When the hand-off cannot be launched (no systemd-run, a unit name clash, a timeout), the
/// update is reported failed and the link is set back, so no restart (a crash, a reboot) can
/// run a version that was never health-gated. (Regression test from the updater review.)
#[test]
fn a_hand_off_that_cannot_launch_sets_the_link_back() {
    let s = Supervised::start(10);
    let bad = b"#!/bin/sh\nfor a in \"$@\"; do\n  if [ \"$a\" = version ]; then echo '{\"agentVersion\":\"9.9.9\",\"protocolVersion\":1}'; exit 0; fi\ndone\nexec sleep 3600\n";
    s.node.publish("v9.9.9", bad, "v9.9.9");
    let cfg: Vec<String> = fs::read_to_string(&s.node.config)
        .unwrap()
        .lines()
        .map(|l| {
            if l.starts_with("restart_command") {
                "restart_command = [\"/nonexistent/systemd-run\"]".to_string()
            } else {
                l.to_string()
            }
        })
        .collect();
    fs::write(&s.node.config, cfg.join("\n") + "\n").unwrap();
    let r =
        s.cp.send(&s.node_id, "UPDATE_AGENT", r#"{"version": "v9.9.9"}"#);
    assert_eq!(r.error_code(), Some("failed"), "{r:?}");
    assert_eq!(
        s.node.target(),
        s.node.old,
        "the update failed, yet bin_link points at the un-gated new version: {r:?}"
    );
}

/// `runos update` judges "the running version" by the agent's admin socket, not by its own
/// binary: after `--no-restart`, running it again restarts the agent into the installed
/// version instead of saying there is nothing to do. (Regression test from the updater review.)
#[test]
fn runos_update_judges_by_the_running_agent_not_its_own_binary() {
    let s = Supervised::start(30);
    s.node.publish("v9.9.9", release_binary(), "v9.9.9");
    let out = s.update(&["--version", "v9.9.9", "--no-restart"]);
    assert_eq!(code(&out), 0, "{}", describe(&out));
    assert_eq!(s.status()["agentVersion"], "0.1.0", "--no-restart");
    let out = s.update(&["--version", "v9.9.9"]);
    assert_ne!(
        json_of(&out)["outcome"],
        "already_current",
        "the agent ran 0.1.0, yet: {}",
        describe(&out)
    );
    s.wait_running("9.9.9");
}
