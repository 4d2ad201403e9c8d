//! `nvctl completions` and `nvctl man`: nvctl describing itself (and nv-agent).
use clap::CommandFactory as _;

use super::args::{Cli, ManPage};

pub fn completions(shell: clap_complete::Shell) {
    clap_complete::generate(shell, &mut Cli::command(), "nvctl", &mut std::io::stdout());
}

pub fn man(page: ManPage) -> anyhow::Result<()> {
    // nv-agent is a system daemon: section 8.
    let man = match page {
        ManPage::Nvctl => clap_mangen::Man::new(Cli::command()),
        ManPage::NvAgent => clap_mangen::Man::new(crate::config::AgentArgs::command()).section("8"),
    };
    man.render(&mut std::io::stdout().lock())
        .map_err(Into::into)
}
