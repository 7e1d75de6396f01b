//! `runos-testsign`: TEST-ONLY command line for the fake Sigstore world.
//! Never package or ship this binary.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use runos_testsign::{AttestOptions, DEFAULT_WORKFLOW_PATH, World};

/// TEST ONLY: mint a fake Sigstore world and GitHub-style build-provenance bundles.
#[derive(Debug, Parser)]
#[command(name = "runos-testsign", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate a new world (CA, Rekor and CT keys) into DIR, with its trusted_root.json.
    World {
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the trusted_root.json of a saved world.
    Root {
        #[arg(long)]
        world: PathBuf,
    },
    /// Attest an artifact with a saved world; writes the Sigstore bundle.
    Attest(Box<AttestArgs>),
}

#[derive(Debug, Args)]
struct AttestArgs {
    #[arg(long)]
    world: PathBuf,
    #[arg(long)]
    artifact: PathBuf,
    /// Subject name (the release asset name), e.g. nodeagent-linux-amd64.
    #[arg(long)]
    name: String,
    /// owner/name
    #[arg(long)]
    repo: String,
    /// e.g. refs/tags/v1.2.3
    #[arg(long = "ref")]
    git_ref: String,
    #[arg(long, default_value = DEFAULT_WORKFLOW_PATH)]
    workflow: String,
    #[arg(long)]
    runner_environment: Option<String>,
    #[arg(long)]
    issuer: Option<String>,
    #[arg(long)]
    predicate_type: Option<String>,
    /// Where to write the bundle (e.g. asset.sigstore.json).
    #[arg(long)]
    out: PathBuf,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::World { out } => {
            World::generate()?.save(&out)?;
            eprintln!("world written to {}", out.display());
        }
        Command::Root { world } => {
            println!("{}", World::load(&world)?.trusted_root_json());
        }
        Command::Attest(args) => {
            let AttestArgs {
                world,
                artifact,
                name,
                repo,
                git_ref,
                workflow,
                runner_environment,
                issuer,
                predicate_type,
                out,
            } = *args;
            let world = World::load(&world)?;
            let bytes = std::fs::read(&artifact)
                .with_context(|| format!("reading {}", artifact.display()))?;
            let defaults = AttestOptions::new(repo, git_ref);
            let opts = AttestOptions {
                workflow_path: workflow,
                runner_environment: runner_environment
                    .unwrap_or_else(|| defaults.runner_environment.clone()),
                issuer: issuer.unwrap_or_else(|| defaults.issuer.clone()),
                predicate_type: predicate_type.unwrap_or_else(|| defaults.predicate_type.clone()),
                ..defaults
            };
            let bundle = world.attest(&bytes, &name, &opts)?;
            std::fs::write(&out, bundle).with_context(|| format!("writing {}", out.display()))?;
            eprintln!("bundle written to {}", out.display());
            eprintln!("identity: {}", opts.san());
            eprintln!("issuer:   {}", opts.issuer);
        }
    }
    Ok(())
}
