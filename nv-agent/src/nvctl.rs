//! nvctl, laid out after bpfman's CLI: the command line alone in [`args`], one module per
//! subcommand with its `execute`, the agent reached through a typed [`client::Client`] in the
//! API's own types, and etcd (cluster mode, as the operator) through [`operator`].
mod acl;
pub mod args;
pub mod client;
mod debug;
mod docs;
mod lookup;
mod monitor;
pub mod operator;
mod provider;
mod render;
mod route;
mod stats;
mod status;
mod trace;

use args::{Cli, Command};

/// Runs the command `cli` names.
pub async fn execute(cli: &Cli) -> anyhow::Result<()> {
    let agent = client::Client::new(&cli.socket);
    let output = cli.output;
    match &cli.command {
        Command::Provider(cmd) => provider::execute(&agent, cmd, output).await,
        Command::Lookup(cmd) => lookup::execute(&agent, &cli.etcd, cmd, output).await,
        Command::Route(cmd) => route::execute(&agent, &cli.etcd, cmd, output).await,
        Command::Acl(cmd) => acl::execute(&agent, &cli.etcd, cmd, output).await,
        Command::Stats { vsid } => stats::execute(&agent, *vsid, output).await,
        Command::Status => status::execute(&agent, output).await,
        Command::Trace(args) => trace::execute(&agent, args, output).await,
        Command::Debug { state } => debug::execute(&agent, *state, output).await,
        Command::Monitor(args) => monitor::execute(&agent, args, output).await,
        Command::Completions { shell } => {
            docs::completions(*shell);
            Ok(())
        }
        Command::Man { page } => docs::man(*page),
    }
}
