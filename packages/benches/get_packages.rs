//! `GET_PACKAGES` of the whole dpkg database through the executor (the process runner,
//! `dpkg-query --showformat`, parsing, the reply's JSON) against the floor: `dpkg-query -W`
//! run directly. p50 of several runs; prints a markdown table.
//!
//! Run: `cargo bench -p runos-packages`.
#![forbid(unsafe_code)]

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use runos_executors::Ctx;
use runos_executors::handle::Host;
use runos_executors::host::runner::{Runner, RunnerConfig};
use runos_packages::{Apt, GetPackages, Settings, dpkg};
use runos_protocol::Tag;

const RUNS: usize = 15;

fn stats(mut v: Vec<Duration>) -> (Duration, Duration, Duration) {
    v.sort();
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn floor(args: &[&str]) -> Vec<Duration> {
    (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            let out = Command::new("dpkg-query")
                .args(args)
                .stderr(Stdio::null())
                .output()
                .expect("dpkg-query");
            assert!(out.status.success());
            t.elapsed()
        })
        .collect()
}

fn main() {
    if Command::new("dpkg-query")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        eprintln!("skipped: dpkg-query is not installed");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let host = Arc::new(Host {
        runner: Arc::new(Runner::new(RunnerConfig::default())),
        ..Host::default()
    });
    let apt = Apt::new(Settings::default());
    let mut packages = 0;
    let mut bytes = 0;
    let executor: Vec<Duration> = (0..RUNS)
        .map(|_| {
            rt.block_on(async {
                let ctx = Ctx::new(
                    Tag::random(),
                    tokio::time::Instant::now() + Duration::from_secs(60),
                    host.clone(),
                    None,
                );
                let t = Instant::now();
                let reply = apt.get(&ctx, GetPackages::default()).await.unwrap();
                // The reply as it goes on the wire (JSON), as the agent would send it.
                bytes = serde_json::to_vec(&reply).unwrap().len();
                let d = t.elapsed();
                packages = reply.packages.len();
                d
            })
        })
        .collect();
    let format = format!("--showformat={}", dpkg::QUERY_FORMAT);
    let plain = floor(&["-W"]);
    let same = floor(&["-W", &format]);
    println!(
        "GET_PACKAGES of the whole dpkg database ({packages} packages, reply {bytes} bytes of JSON), {RUNS} runs:\n"
    );
    println!("| what | p50 ms | min ms | max ms |");
    println!("|---|---|---|---|");
    for (what, v) in [
        ("`dpkg-query -W` run directly (floor)", plain),
        (
            "`dpkg-query -W --showformat=<executor's>` run directly",
            same,
        ),
        (
            "`Apt::get` (GET_PACKAGES executor: runner, parse, reply JSON)",
            executor,
        ),
    ] {
        let (min, p50, max) = stats(v);
        println!("| {what} | {} | {} | {} |", ms(p50), ms(min), ms(max));
    }
}
