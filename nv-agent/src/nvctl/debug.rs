//! `nvctl debug on|off`: the datapath's debug events.
use super::{
    args::{OnOff, Output},
    client::Client,
    render,
};

const COLUMNS: render::Columns = &[("DATAPATH DEBUG EVENTS", "datapath")];

pub async fn execute(agent: &Client, state: OnOff, output: Output) -> anyhow::Result<()> {
    render::one(output, &agent.debug(state == OnOff::On).await?, COLUMNS)
}
