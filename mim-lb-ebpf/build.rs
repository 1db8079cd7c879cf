use which::which;

/// bpf-linker is what links the BPF object; re-run when it changes so a new linker is used.
fn main() {
    let bpf_linker = which("bpf-linker").expect(
        "bpf-linker not found on PATH: run `cargo xtask setup` (it installs bpf-linker)",
    );
    println!("cargo:rerun-if-changed={}", bpf_linker.to_str().unwrap());
}
