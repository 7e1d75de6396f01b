//! What `runos-bench` measures besides the stack itself: the floors (a raw TLS 1.3 echo and a
//! spawn of `true` the way the agent spawns), readings of `/proc` (memory, CPU, wake-ups), the
//! machine's facts, and the statistics and formatting of the tables.
//!
//! Every wait here is bounded ([`IO_TIMEOUT`]); a failure is an `Err` with a message that says
//! what failed, never a hang.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use runos_protocol::{Envelope, MessageType, Tag};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::scripted::Pki;

/// Longest wait for one step of a floor measurement (a handshake, a frame, a child process).
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// The agent's `PATH` for the programs it runs (`runos_executors::host::runner::DEFAULT_PATH`,
/// which this crate does not depend on).
pub const AGENT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Bytes the pipelined echo writes at once: whole frames up to this budget, one `write_all`.
pub const PIPELINE_WRITE_BYTES: usize = 64 * 1024;

/// The frame the control plane sends for a `GET_NODE_STATUS` instruction, as on the wire
/// (4-byte length prefix and body): the frame the TLS echo bounces.
pub fn status_frame() -> Result<Vec<u8>, String> {
    let kind = MessageType::new("GET_NODE_STATUS").map_err(|e| e.to_string())?;
    let env = Envelope::new(kind, Tag::random(), &serde_json::json!({}));
    runos_protocol::encode_frame(&env, runos_protocol::DEFAULT_MAX_FRAME_BYTES)
        .map_err(|e| e.to_string())
}

/// Size of the record the durability floor appends: about a journal `started` record.
pub const SYNC_RECORD_BYTES: usize = 160;

/// The durability floor: appending a journal-sized record to a fresh file in `dir` and
/// `fdatasync`ing it, `n` times (after 10 unmeasured ones), the way the journal makes a record
/// durable. `dir` should be on the file system the agent's state directory is on.
pub fn fdatasync_floor(dir: &std::path::Path, n: usize) -> Result<Vec<Duration>, String> {
    use std::io::Write as _;
    let path = dir.join("fdatasync-floor");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| format!("open {}: {e}", path.display()))?;
    let record = [0x5a_u8; SYNC_RECORD_BYTES];
    let mut took = Vec::with_capacity(n);
    for i in 0..10 + n {
        let t = Instant::now();
        file.write_all(&record)
            .and_then(|()| file.sync_data())
            .map_err(|e| format!("append and fdatasync {}: {e}", path.display()))?;
        if i >= 10 {
            took.push(t.elapsed());
        }
    }
    drop(file);
    std::fs::remove_file(&path).map_err(|e| format!("remove {}: {e}", path.display()))?;
    took.sort_unstable();
    Ok(took)
}

/// The TLS echo floor.
#[derive(Debug, Clone)]
pub struct EchoFloor {
    /// Size of each frame (length prefix included).
    pub frame_bytes: usize,
    /// Round trips of one frame at a time, sorted.
    pub rtt: Vec<Duration>,
    /// Frames echoed in the pipelined run.
    pub pipelined_frames: usize,
    /// Frames per second in the pipelined run.
    pub frames_per_s: f64,
}

async fn within<T, E: std::fmt::Display>(
    what: &str,
    f: impl Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(IO_TIMEOUT, f).await {
        Ok(r) => r.map_err(|e| format!("TLS echo: {what}: {e}")),
        Err(_) => Err(format!(
            "TLS echo: {what}: no progress within {IO_TIMEOUT:?}"
        )),
    }
}

fn current_thread() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))
}

/// A raw TLS 1.3 echo on loopback, each end on its own thread with a current-thread runtime:
/// mutual TLS with the project's configurations ([`runos_transport::tls`], rustls with `ring`),
/// `TCP_NODELAY` on both ends; the server writes back whatever it reads, at once. First
/// `round_trips` round trips of `frame` one at a time (after 100 of warm-up), then `pipelined`
/// copies of `frame` written back to back ([`PIPELINE_WRITE_BYTES`] per write) while the reply
/// bytes are read concurrently: frames per second from the first write to the last byte read.
/// Blocking: call it outside any runtime.
pub fn tls_echo(frame: &[u8], round_trips: usize, pipelined: usize) -> Result<EchoFloor, String> {
    let pki = Pki::new("echo");
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|e| format!("TLS echo: bind: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("TLS echo: {e}"))?;
    let acceptor = pki.acceptor();
    let server = std::thread::spawn(move || -> Result<(), String> {
        current_thread()?.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener)
                .map_err(|e| format!("TLS echo: listen: {e}"))?;
            let (tcp, _) = within("accept", listener.accept()).await?;
            tcp.set_nodelay(true)
                .map_err(|e| format!("TLS echo: nodelay: {e}"))?;
            let mut tls = within("server handshake", acceptor.accept(tcp)).await?;
            let mut buf = vec![0u8; PIPELINE_WRITE_BYTES];
            loop {
                let n = within("server read", tls.read(&mut buf)).await?;
                if n == 0 {
                    break;
                }
                within("server write", tls.write_all(&buf[..n])).await?;
                within("server flush", tls.flush()).await?;
            }
            let _ = tokio::time::timeout(IO_TIMEOUT, tls.shutdown()).await;
            Ok(())
        })
    });
    let client = echo_client(&pki, addr, frame, round_trips, pipelined);
    let served = server
        .join()
        .unwrap_or_else(|_| Err("TLS echo: the server thread panicked".into()));
    let floor = client?;
    served?;
    Ok(floor)
}

fn echo_client(
    pki: &Pki,
    addr: std::net::SocketAddr,
    frame: &[u8],
    round_trips: usize,
    pipelined: usize,
) -> Result<EchoFloor, String> {
    use runos_transport::{pem, tls};
    let cas = pem::certificates(pki.ca_pem.as_bytes()).map_err(|e| e.to_string())?;
    let chain = pem::certificates(pki.node_cert_pem.as_bytes()).map_err(|e| e.to_string())?;
    let key = pem::private_key(pki.node_key_pem.as_bytes()).map_err(|e| e.to_string())?;
    let cfg = tls::client_config(&cas, runos_protocol::ALPN_L2SEC, Some((chain, key)))
        .map_err(|e| e.to_string())?;
    let name = tls::server_name("127.0.0.1").map_err(|e| e.to_string())?;
    current_thread()?.block_on(async move {
        let tcp = within("connect", tokio::net::TcpStream::connect(addr)).await?;
        tcp.set_nodelay(true)
            .map_err(|e| format!("TLS echo: nodelay: {e}"))?;
        let mut stream = within(
            "client handshake",
            tokio_rustls::TlsConnector::from(cfg).connect(name, tcp),
        )
        .await?;

        let mut back = vec![0u8; frame.len()];
        let mut rtt = Vec::with_capacity(round_trips);
        for i in 0..100 + round_trips {
            let t = Instant::now();
            within("write", stream.write_all(frame)).await?;
            within("flush", stream.flush()).await?;
            within("read", stream.read_exact(&mut back)).await?;
            if i >= 100 {
                rtt.push(t.elapsed());
            }
            if back != frame {
                return Err("TLS echo: the frame came back changed".into());
            }
        }
        rtt.sort_unstable();

        let per_write = (PIPELINE_WRITE_BYTES / frame.len()).max(1);
        let chunk = frame.repeat(per_write);
        let total = frame.len() * pipelined;
        let (mut r, mut w) = tokio::io::split(stream);
        let t = Instant::now();
        let writer = async {
            let mut left = pipelined;
            while left > 0 {
                let k = left.min(per_write);
                within("pipelined write", w.write_all(&chunk[..k * frame.len()])).await?;
                left -= k;
            }
            within("pipelined flush", w.flush()).await
        };
        let reader = async {
            let mut buf = vec![0u8; PIPELINE_WRITE_BYTES];
            let mut got = 0;
            while got < total {
                let want = (total - got).min(buf.len());
                let n = within("pipelined read", r.read(&mut buf[..want])).await?;
                if n == 0 {
                    return Err("TLS echo: the server closed early".to_string());
                }
                got += n;
            }
            Ok(t.elapsed())
        };
        let (wrote, took) = tokio::join!(writer, reader);
        wrote?;
        let took = took?;
        let mut stream = r.unsplit(w);
        let _ = tokio::time::timeout(IO_TIMEOUT, stream.shutdown()).await;
        Ok(EchoFloor {
            frame_bytes: frame.len(),
            rtt,
            pipelined_frames: pipelined,
            frames_per_s: pipelined as f64 / took.as_secs_f64(),
        })
    })
}

/// Spawn `program` `n` times (after 10 of warm-up) the way the agent's process runner does: a
/// cleared environment with the agent's `PATH`, `LANG` and `HOME`, working directory `/`, its own
/// process group, stdin from `/dev/null`, stdout and stderr piped and read to EOF, then waited
/// for. Returns the sorted durations. With an absolute path the standard library uses
/// `posix_spawn`; a bare name with a `PATH` of the command's own is looked up by a forked child.
/// Blocking.
pub fn spawn_floor(program: &str, n: usize) -> Result<Vec<Duration>, String> {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let mut took = Vec::with_capacity(n);
    for i in 0..10 + n {
        let t = Instant::now();
        let mut cmd = Command::new(program);
        cmd.env_clear()
            .env("PATH", AGENT_PATH)
            .env("LANG", "C.UTF-8")
            .env("HOME", &home)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().map_err(|e| format!("spawn {program}: {e}"))?;
        // Both pipes read to EOF, then the wait; `true` exits at once, so no deadline is needed
        // beyond what the kernel gives.
        let out = child
            .wait_with_output()
            .map_err(|e| format!("wait for {program}: {e}"))?;
        if !out.status.success() {
            return Err(format!("{program} exited with {}", out.status));
        }
        if i >= 10 {
            took.push(t.elapsed());
        }
    }
    took.sort_unstable();
    Ok(took)
}

/// The value at quantile `p` (0..=1) of `sorted` (nearest rank; zero when empty).
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// A duration for the tables: µs below 1 ms, ms with two decimals below 1 s, else s.
pub fn fmt_dur(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else if us < 1e6 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

/// An integer with thin groups of three digits (`100 000`).
pub fn fmt_count(v: f64) -> String {
    let s = format!("{:.0}", v.max(0.0));
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

/// One field of `/proc/<pid>/status` (`VmRSS:`, `VmHWM:`, `Threads:`) as a number.
pub fn proc_status_field(pid: u32, name: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status_field(&status, name)
}

fn status_field(status: &str, name: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The process state letter of `/proc/<pid>/stat` (`R`, `S`, `T` for stopped, …).
pub fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_fields(&stat)?.first()?.chars().next()
}

/// CPU time (user + system) the whole process has used so far, threads that ended included,
/// from `/proc/<pid>/stat` (clock ticks of 10 ms: `USER_HZ` is 100 on Linux).
pub fn proc_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f = stat_fields(&stat)?;
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// The fields of a `stat` line after the command name (field 3, the state, first).
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().collect())
}

/// Timeslices run on a CPU per thread of `pid` (field 3 of `/proc/<pid>/task/<tid>/schedstat`):
/// each is one wake-up of a sleeping thread, or a preemption.
pub fn run_counts(pid: u32) -> Result<HashMap<u32, u64>, String> {
    let dir = format!("/proc/{pid}/task");
    let entries = std::fs::read_dir(&dir).map_err(|e| format!("{dir}: {e}"))?;
    let mut out = HashMap::new();
    for e in entries.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        // A thread that ended between the listing and the read is skipped.
        if let Ok(text) = std::fs::read_to_string(e.path().join("schedstat"))
            && let Some(n) = schedstat_timeslices(&text)
        {
            out.insert(tid, n);
        }
    }
    Ok(out)
}

fn schedstat_timeslices(text: &str) -> Option<u64> {
    text.split_whitespace().nth(2)?.parse().ok()
}

/// Wake-ups between two readings of [`run_counts`]: the increase of each thread seen in both,
/// plus everything a thread born in between ran. A thread that ended in between loses what it
/// ran since the first reading (sample often to keep that small).
pub fn wakeups_between(before: &HashMap<u32, u64>, after: &HashMap<u32, u64>) -> u64 {
    after
        .iter()
        .map(|(tid, n)| n.saturating_sub(before.get(tid).copied().unwrap_or(0)))
        .sum()
}

/// Facts about the machine and the build, for the report.
#[derive(Debug, Clone)]
pub struct Machine {
    /// `model name` from `/proc/cpuinfo`.
    pub cpu: String,
    /// Logical CPUs this process may run on.
    pub cores: usize,
    /// Total memory in MiB.
    pub mem_mib: u64,
    /// The kernel release.
    pub kernel: String,
    /// Today, UTC, `YYYY-MM-DD`.
    pub date: String,
    /// `release` or `debug` (this binary; the agent is built with it).
    pub profile: &'static str,
}

impl Machine {
    /// Read them now.
    pub fn read() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown CPU".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Machine {
            cpu,
            cores: std::thread::available_parallelism().map_or(0, usize::from),
            mem_mib: status_field(&meminfo, "MemTotal:").unwrap_or(0) / 1024,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unknown".into()),
            date: utc_date(secs),
            profile: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
        }
    }
}

/// `YYYY-MM-DD` (UTC) of a Unix time.
pub fn utc_date(unix_secs: u64) -> String {
    // Days to a civil date (H. Hinnant's algorithm), for days since 1970-01-01.
    let z = (unix_secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let s: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&s, 0.5), Duration::from_millis(51));
        assert_eq!(percentile(&s, 0.99), Duration::from_millis(99));
        assert_eq!(percentile(&s, 1.0), Duration::from_millis(100));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
    }

    #[test]
    fn formats() {
        assert_eq!(fmt_dur(Duration::from_micros(65)), "65 µs");
        assert_eq!(fmt_dur(Duration::from_micros(940)), "940 µs");
        assert_eq!(fmt_dur(Duration::from_micros(2130)), "2.13 ms");
        assert_eq!(fmt_dur(Duration::from_millis(14_301)), "14.30 s");
        assert_eq!(fmt_count(100_000.4), "100 000");
        assert_eq!(fmt_count(1573.0), "1 573");
        assert_eq!(fmt_count(999.0), "999");
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(951_782_400), "2000-02-29");
        assert_eq!(utc_date(1_798_761_600), "2027-01-01");
    }

    #[test]
    fn proc_readers_parse_this_process() {
        let me = std::process::id();
        assert!(proc_status_field(me, "VmRSS:").is_some_and(|v| v > 0));
        assert!(proc_state(me).is_some());
        assert!(proc_cpu(me).is_some());
        let counts = run_counts(me).unwrap();
        assert!(counts.contains_key(&me));
        assert_eq!(schedstat_timeslices("123 456 789\n"), Some(789));
        assert_eq!(
            stat_fields("1 (a) b) S 0 1").unwrap().first().copied(),
            Some("S")
        );
    }

    #[test]
    fn wakeups_count_new_threads_whole() {
        let before = HashMap::from([(1, 10), (2, 5)]);
        let after = HashMap::from([(1, 14), (3, 2)]);
        assert_eq!(wakeups_between(&before, &after), 6);
    }

    #[test]
    fn the_echo_and_the_spawn_floors_run() {
        let frame = status_frame().unwrap();
        let echo = tls_echo(&frame, 5, 50).unwrap();
        assert_eq!(echo.rtt.len(), 5);
        assert_eq!(echo.frame_bytes, frame.len());
        assert!(echo.frames_per_s > 0.0);
        assert_eq!(spawn_floor("/bin/true", 2).unwrap().len(), 2);
        assert_eq!(spawn_floor("true", 2).unwrap().len(), 2);
        assert!(spawn_floor("false", 1).is_err());
    }
}
