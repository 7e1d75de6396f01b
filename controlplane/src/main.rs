//! `runos-controlplane`: the reference control plane of runos.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use runos_controlplane::cli::{self, Client, EXIT_CODES_HELP, exit};
use runos_controlplane::util::parse_duration;
use runos_controlplane::{Error, ServeOptions, demo, server};

#[derive(Debug, Parser)]
#[command(
    name = "runos-controlplane",
    version,
    about = "The reference control plane of runos: CA, enrolment (L1Sec), instruction stream \
             (L2Sec), operator socket and CLI.",
    after_help = EXIT_CODES_HELP
)]
struct Cli {
    /// Log filter, RUST_LOG syntax (e.g. `info`, `runos_controlplane=debug`). Default `info`
    /// (`warn` for `demo` and the operator commands).
    #[arg(long, global = true)]
    log_level: Option<String>,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormatArg::Text)]
    log_format: LogFormatArg,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

#[derive(Debug, Args)]
struct Locator {
    /// The control plane's data directory (finds the operator socket via endpoints.json).
    #[arg(long, env = "RUNOS_CP_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The operator socket (overrides --data-dir).
    #[arg(long)]
    admin_socket: Option<PathBuf>,
}

impl Locator {
    fn client(&self) -> Client {
        Client::new(cli::locate_socket(
            self.data_dir.as_deref(),
            self.admin_socket.as_deref(),
        ))
    }
}

fn duration(s: &str) -> Result<Duration, String> {
    parse_duration(s)
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the control plane until SIGTERM/SIGINT.
    Serve(ServeArgs),
    /// Enrolment tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// List the nodes.
    Nodes {
        #[command(flatten)]
        loc: Locator,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Send an instruction to a node; prints the tag, or with --wait the final reply.
    Send {
        #[command(flatten)]
        loc: Locator,
        /// Node id, unique id prefix or hostname.
        node: String,
        /// Instruction type, e.g. RUN_COMMAND.
        #[arg(value_name = "TYPE")]
        kind: String,
        /// JSON payload (default `{}`); `-` reads it from standard input, which keeps secrets
        /// in it (env values, stdin, tokens) out of `ps`.
        #[arg(value_name = "JSON", conflicts_with = "raw_b64")]
        json_payload: Option<String>,
        /// Wait for the final reply and print it.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits.
        #[arg(long, value_parser = duration, default_value = "60s")]
        timeout: Duration,
        /// The instruction's own deadline (envelope timeoutMs).
        #[arg(long, value_parser = duration)]
        instruction_timeout: Option<Duration>,
        /// Compact (one-line) JSON output.
        #[arg(long)]
        json: bool,
        /// Put TEXT verbatim in jsonB64 (protocol tests).
        #[arg(long, value_name = "TEXT")]
        raw_b64: Option<String>,
        /// The instruction's tag (a UUID) instead of a fresh one: sending again with the same
        /// tag and the same instruction stores nothing new and answers as the first send did
        /// (a safe retry); the same tag with a different instruction is refused (exit 9).
        #[arg(long, value_name = "UUID")]
        tag: Option<String>,
    },
    /// Send many instructions at once, from JSON lines (one instruction per line:
    /// {"node", "type", "payload"?, "rawB64"?, "timeoutMs"?}); they are stored in one
    /// transaction, all or none (an invalid line or request refuses the whole batch). Prints
    /// the tags in input order, one per line.
    SendBatch {
        #[command(flatten)]
        loc: Locator,
        /// The file of JSON lines; `-` reads standard input.
        #[arg(value_name = "FILE")]
        input: PathBuf,
        /// Print {"tags": [..]} on one line instead.
        #[arg(long)]
        json: bool,
    },
    /// Show the final reply of an instruction sent earlier (printed like `send --wait`);
    /// without one yet, say it is pending (exit 4), or with --wait wait for it.
    Reply {
        #[command(flatten)]
        loc: Locator,
        /// The instruction's tag, as `send` printed it.
        tag: String,
        /// Wait for the final reply if there is none yet.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits.
        #[arg(long, value_parser = duration, default_value = "60s")]
        timeout: Duration,
        /// Compact (one-line) JSON output.
        #[arg(long)]
        json: bool,
    },
    /// The certificate authority: status, rotation with overlap, cutover.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Revoke a node: its session is closed at once and later sessions are refused.
    Revoke {
        #[command(flatten)]
        loc: Locator,
        /// Node id, unique id prefix or hostname.
        node: String,
    },
    /// Run a control plane and a `runos` agent in a temporary directory and show a few
    /// instructions with their replies (no root needed).
    Demo {
        /// The agent binary (default: `runos` next to this executable).
        #[arg(long)]
        agent_bin: Option<PathBuf>,
        /// Keep the temporary directory.
        #[arg(long)]
        keep: bool,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a one-time enrolment token and print it.
    Create {
        #[command(flatten)]
        loc: Locator,
        /// Lifetime of the token.
        #[arg(long, value_parser = duration, default_value = "1h")]
        ttl: Duration,
        /// JSON output: {"token", "expiresAt", "caSha256"}.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Show the active CA, the incoming one during a rotation, how many nodes hold a current
    /// certificate from each, and the nodes that block a cutover.
    Status {
        #[command(flatten)]
        loc: Locator,
        /// Nodes seen (or enrolled) this recently count as blocking a cutover.
        #[arg(long, value_parser = duration, default_value = "30d")]
        seen_within: Duration,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Start a rotation: create an incoming CA; both are trusted, new node certificates are
    /// issued by the incoming one, agents receive both when they enrol or renew.
    Rotate {
        #[command(flatten)]
        loc: Locator,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Finish a rotation: the incoming CA becomes the only one (server certificate, trust);
    /// the old CA is archived and its key destroyed. Refused (exit 7) while nodes seen within
    /// --seen-within hold only certificates of the old CA, unless --force.
    Cutover {
        #[command(flatten)]
        loc: Locator,
        /// Cut over even though the listed nodes would be locked out.
        #[arg(long)]
        force: bool,
        /// Nodes seen (or enrolled) this recently count as blocking.
        #[arg(long, value_parser = duration, default_value = "30d")]
        seen_within: Duration,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Data directory (created 0700): state.db, ca.pem, ca.key (and ca-next.* during a CA
    /// rotation), server.pem, endpoints.json.
    #[arg(long, env = "RUNOS_CP_DATA_DIR", default_value = cli::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// L1Sec (enrolment) listen address.
    #[arg(long, default_value = "0.0.0.0:9191")]
    l1_addr: String,
    /// L2Sec (instruction stream) listen address.
    #[arg(long, default_value = "0.0.0.0:9192")]
    l2_addr: String,
    /// Operator socket (default DATA_DIR/admin.sock).
    #[arg(long)]
    admin_socket: Option<PathBuf>,
    /// Extra server certificate name (DNS name or IP); repeatable.
    #[arg(long = "hostname", value_name = "NAME")]
    hostnames: Vec<String>,
    /// The agent release advertised to agents in WELCOME (`vX.Y.Z`): agents with
    /// `[update] auto = true` install it; `runos update` without --version targets it.
    #[arg(long, value_name = "vX.Y.Z")]
    advertise_version: Option<String>,
    /// Heartbeat interval advertised to agents (min 1s); silent sessions close after 3x.
    #[arg(long, value_parser = duration, default_value = "15s")]
    heartbeat_interval: Duration,
    /// Largest L2Sec frame accepted (min 65536).
    #[arg(long, default_value_t = runos_protocol::DEFAULT_MAX_FRAME_BYTES)]
    max_frame_bytes: u32,
    /// Validity of node certificates.
    #[arg(long, value_parser = duration, default_value = "30d")]
    cert_validity: Duration,
    /// Instructions per session sent but not yet finally answered (1-4096); more are sent as
    /// final replies come in.
    #[arg(
        long,
        value_name = "N",
        default_value_t = server::DEFAULT_MAX_IN_FLIGHT,
        value_parser = clap::value_parser!(u32).range(1..=i64::from(server::MAX_MAX_IN_FLIGHT))
    )]
    max_in_flight: u32,
    /// Live L2Sec sessions (1-1000000); past it a new session is refused at once with ERROR
    /// busy (the agent backs off). Lowered at start, with a warning, when the hard open-file
    /// limit cannot hold it.
    #[arg(
        long,
        value_name = "N",
        default_value_t = server::DEFAULT_MAX_SESSIONS,
        value_parser = clap::value_parser!(u32).range(1..=i64::from(server::MAX_MAX_SESSIONS))
    )]
    max_sessions: u32,
    /// L2Sec connections in their handshake (TLS and HELLO) at once (1-65536); more wait in
    /// the accept queue.
    #[arg(
        long,
        value_name = "N",
        default_value_t = server::DEFAULT_MAX_HANDSHAKES,
        value_parser = clap::value_parser!(u32).range(1..=i64::from(server::MAX_MAX_HANDSHAKES))
    )]
    max_handshakes: u32,
    /// Connections in their handshake from one source address, on each of L1Sec and L2Sec
    /// (1-65536); more are closed at once.
    #[arg(
        long,
        value_name = "N",
        default_value_t = server::DEFAULT_MAX_HANDSHAKES_PER_SOURCE,
        value_parser = clap::value_parser!(u32).range(1..=i64::from(server::MAX_MAX_HANDSHAKES))
    )]
    max_handshakes_per_source: u32,
}

/// Largest payload `send -` reads from standard input (the largest frame is 16 MiB).
const MAX_STDIN_PAYLOAD: u64 = 16 * 1024 * 1024;

/// The payload of `send NODE TYPE -`, read from standard input.
fn read_stdin_payload() -> Result<String, Error> {
    use std::io::Read as _;
    let mut text = String::new();
    std::io::stdin()
        .take(MAX_STDIN_PAYLOAD + 1)
        .read_to_string(&mut text)
        .map_err(|e| Error::BadRequest(format!("reading the payload from stdin: {e}")))?;
    if text.len() as u64 > MAX_STDIN_PAYLOAD {
        return Err(Error::BadRequest(format!(
            "the payload on stdin is larger than {MAX_STDIN_PAYLOAD} bytes"
        )));
    }
    Ok(text)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            });
        }
    };
    let default_level = match cli.command {
        Command::Serve(_) => "info",
        _ => "warn",
    };
    let level = cli.log_level.as_deref().unwrap_or(default_level);
    let format = match cli.log_format {
        LogFormatArg::Text => cli::LogFormat::Text,
        LogFormatArg::Json => cli::LogFormat::Json,
    };
    if let Err(e) = cli::init_logging(level, format) {
        eprintln!("runos-controlplane: {e}");
        return ExitCode::from(exit::USAGE);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runos-controlplane: cannot start the runtime: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    match rt.block_on(run(cli.command)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("runos-controlplane: {e}");
            if let Error::Remote { tag: Some(tag), .. } = &e {
                eprintln!("instruction tag: {tag}");
            }
            ExitCode::from(cli::exit_code(&e))
        }
    }
}

async fn run(command: Command) -> Result<u8, Error> {
    match command {
        Command::Serve(a) => {
            let opts = ServeOptions {
                data_dir: a.data_dir,
                l1_addr: a.l1_addr,
                l2_addr: a.l2_addr,
                admin_socket: a.admin_socket,
                hostnames: a.hostnames,
                heartbeat_interval: a.heartbeat_interval,
                max_frame_bytes: a.max_frame_bytes,
                cert_validity: a.cert_validity,
                max_in_flight: a.max_in_flight,
                advertise_version: a.advertise_version,
                max_sessions: a.max_sessions,
                max_handshakes: a.max_handshakes,
                max_handshakes_per_source: a.max_handshakes_per_source,
            };
            server::run_until_signal(opts).await?;
            Ok(exit::OK)
        }
        Command::Token {
            command: TokenCommand::Create { loc, ttl, json },
        } => cli::token_create(&loc.client(), ttl, json).await,
        Command::Nodes { loc, json } => cli::nodes(&loc.client(), json).await,
        Command::Send {
            loc,
            node,
            kind,
            json_payload,
            wait,
            timeout,
            instruction_timeout,
            json,
            raw_b64,
            tag,
        } => {
            let json_payload = match json_payload.as_deref() {
                Some("-") => Some(read_stdin_payload()?),
                _ => json_payload,
            };
            cli::send(
                &loc.client(),
                cli::SendArgs {
                    node,
                    kind,
                    json: json_payload,
                    raw_b64,
                    instruction_timeout_ms: instruction_timeout
                        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                    wait,
                    timeout,
                    json_out: json,
                    tag,
                },
            )
            .await
        }
        Command::SendBatch { loc, input, json } => {
            cli::send_batch(&loc.client(), &input, json).await
        }
        Command::Reply {
            loc,
            tag,
            wait,
            timeout,
            json,
        } => {
            cli::reply(
                &loc.client(),
                cli::ReplyArgs {
                    tag,
                    wait,
                    timeout,
                    json_out: json,
                },
            )
            .await
        }
        Command::Revoke { loc, node } => cli::revoke(&loc.client(), node).await,
        Command::Ca { command } => match command {
            CaCommand::Status {
                loc,
                seen_within,
                json,
            } => cli::ca_status(&loc.client(), seen_within, json).await,
            CaCommand::Rotate { loc, json } => cli::ca_rotate(&loc.client(), json).await,
            CaCommand::Cutover {
                loc,
                force,
                seen_within,
                json,
            } => cli::ca_cutover(&loc.client(), force, seen_within, json).await,
        },
        Command::Demo { agent_bin, keep } => demo::run(demo::DemoOptions { agent_bin, keep }).await,
    }
}
