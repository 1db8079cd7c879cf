//! `mim-lb prepare-backend` (to be written): configures a master host for direct routing.

/// Arguments of `mim-lb prepare-backend`.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: &Args) -> anyhow::Result<()> {
    anyhow::bail!("prepare-backend is not written yet")
}
