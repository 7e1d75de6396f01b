//! The demo end to end with the real agent. Needs the `runos` binary next to this crate's
//! binaries: `cargo build -p runos-agent && cargo test -p runos-controlplane -- --ignored`.

use std::process::Command;

#[test]
#[ignore = "needs the runos agent binary (cargo build -p runos-agent)"]
fn demo_runs_end_to_end() {
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_runos-controlplane"));
    let agent = bin.with_file_name("runos");
    assert!(agent.exists(), "build the agent first: {}", agent.display());
    let out = Command::new(bin)
        .args(["demo", "--agent-bin"])
        .arg(&agent)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("summary: 5/5 replies as expected"),
        "{stdout}"
    );
}
