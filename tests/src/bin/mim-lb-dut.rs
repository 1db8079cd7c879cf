//! The `mim-lb` binary ("device under test"), built inside the test crate so that integration
//! tests can start the real daemon through `CARGO_BIN_EXE_mim-lb-dut`. It is the same library
//! entry point as mim-lb/src/main.rs under another name, so the two binaries do not overwrite
//! each other in target/.
fn main() -> std::process::ExitCode {
    mim_lb::cli::main_exit()
}
