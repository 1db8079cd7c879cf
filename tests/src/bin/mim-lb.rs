//! The `mim-lb` binary, built inside the test crate so integration tests can start the real
//! daemon through `CARGO_BIN_EXE_mim-lb` (the same library entry point as mim-lb/src/main.rs).
fn main() -> anyhow::Result<()> {
    mim_lb::cli::main()
}
