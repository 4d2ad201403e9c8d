//! `nvctl provider`: this host's provider addresses, through its agent.
use super::{
    args::{Output, ProviderCmd},
    client::Client,
    render,
};
use crate::{
    model::Provider,
    tables::{Table as _, providers::Providers},
};

pub async fn execute(agent: &Client, cmd: &ProviderCmd, output: Output) -> anyhow::Result<()> {
    let columns = Providers::COLUMNS;
    match cmd {
        ProviderCmd::Add { pa, dev } => {
            let p = Provider {
                pa: *pa,
                dev: dev.clone(),
            };
            render::one(output, &agent.add_provider(&p).await?, columns)
        }
        ProviderCmd::Del { pa } => render::one(output, &agent.delete_provider(*pa).await?, columns),
        ProviderCmd::List => render::rows(output, &agent.providers().await?, columns),
    }
}
