//! Builds the XDP program for the bpf target and leaves the object in OUT_DIR, where
//! `dataplane::program` embeds it: the daemon always carries the program it was built with.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "mim-lb-ebpf")
        .ok_or_else(|| anyhow!("mim-lb-ebpf package not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("mim-lb-ebpf manifest has no parent directory"))?
        .to_string();
    aya_build::build_ebpf(
        [aya_build::Package { name: ebpf.name.as_str(), root_dir: &root_dir, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
}
