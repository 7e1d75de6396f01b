//! What the journal keeps in memory per retained entry: an index (offsets into the file, sizes,
//! state), not the reply. 100 000 acknowledged `GET_NODE_STATUS`-like entries; the numbers are
//! printed for the benchmark notes:
//! `cargo test -p runos-journal --release --test memory -- --nocapture`.

use runos_journal::{Journal, Limits, Lookup, Policy};
use runos_protocol::{Envelope, Tag};

const POLICY: Policy = Policy {
    safe_to_rerun: |k| k == "GET_NODE_STATUS",
    secret_reply: |_| false,
};

/// Resident set size of this process (bytes), from `/proc/self/statm`.
fn rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[test]
fn bytes_per_retained_entry() {
    let d = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_bytes: 1 << 30,
        ..Limits::default()
    };
    let n = 100_000;
    let (mut j, _) = Journal::open(d.path(), limits, POLICY).unwrap();
    let rss_before = rss();
    let body = serde_json::json!({
        "hostname": "node-1", "kernel": "6.8.0", "uptimeSecs": 123456,
        "load": [0.1, 0.2, 0.3],
        "memory": {"totalBytes": 8_000_000_000u64, "availableBytes": 4_000_000_000u64},
        "disks": [{"mount": "/", "totalBytes": 100_000_000_000u64, "freeBytes": 50_000_000_000u64}],
        "agentVersion": "0.1.0",
    });
    let mut first = None;
    for _ in 0..n {
        let t = Tag::random();
        let r = Envelope::with_type("NODE_STATUS", t, &body);
        j.accepted(t, "GET_NODE_STATUS", &"ab".repeat(32)).unwrap();
        j.started(t, None).unwrap();
        j.finished(t, &r).unwrap();
        j.acked(t).unwrap();
        first.get_or_insert((t, r));
    }
    let s = j.stats();
    assert_eq!(s.entries, n, "all retained");
    let per = s.index_bytes as f64 / n as f64;
    let rss_per = rss()
        .zip(rss_before)
        .map(|(a, b)| a.saturating_sub(b) as f64 / n as f64);
    eprintln!(
        "journal memory: index {per:.1} bytes per retained entry, RSS growth {rss_per:.1?} bytes per entry ({n} entries, file {} bytes, {:.0} bytes per entry)",
        s.file_bytes,
        s.file_bytes as f64 / n as f64
    );
    // The index only: the file holds ~700 bytes per entry here.
    assert!(per <= 96.0, "{per} bytes per entry");
    // The first reply is read back from the file.
    let (t, r) = first.unwrap();
    assert_eq!(j.lookup(&t), Lookup::Done(r));
}
