//! `skiff`: the one binary. It parses the command line (k3s's flag names and
//! defaults) and composes the crates into a server or an agent.

mod cli;
mod images;
mod node_agent;
mod server;

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::cli::{Cli, Command};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    // The shim forks, so it must run before any thread exists.
    if let Command::Shim(args) = &cli.command {
        return agent::shim::main(&args.state_dir).context("container monitor");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("skiff")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        match cli.command {
            Command::Server(args) => server::run(args).await,
            Command::Shim(_) => Ok(()),
            Command::Images(args) => images::run(args),
            Command::Agent(args) => anyhow::bail!(
                "`skiff agent` cannot join {} yet: the node agent is not built in this version",
                args.server
            ),
        }
    })
}
