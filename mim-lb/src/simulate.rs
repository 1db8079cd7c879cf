//! `mim-lb simulate` (to be written).
use crate::{director::Director, status::Simulation};

pub fn run(_director: &Director, _flow: &str) -> anyhow::Result<Simulation> {
    anyhow::bail!("simulate is not written yet")
}
