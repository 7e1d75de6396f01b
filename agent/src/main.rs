//! `runos`: the node agent binary. All logic lives in the library; this only parses the command
//! line and turns the outcome into a stable exit code.
#![forbid(unsafe_code)]

use clap::Parser as _;

fn main() -> std::process::ExitCode {
    let cli = runos_agent::cli::Cli::parse();
    runos_agent::cli::run(cli).into()
}
