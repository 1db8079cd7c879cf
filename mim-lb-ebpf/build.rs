use which::which;

/// bpf-linker is what links the BPF object; re-run when it changes so a new linker is used.
fn main() {
    let bpf_linker = which("bpf-linker").expect(
        "bpf-linker not found on PATH: run `cargo xtask setup` (it installs bpf-linker)",
    );
    println!("cargo:rerun-if-changed={}", bpf_linker.to_str().unwrap());
    // Header fields are byte arrays (alignment 1), so by default LLVM reads an IPv4 address as
    // four byte loads, shifts and ors. With this feature (bpf-linker built against LLVM 22, as
    // `cargo xtask setup` installs it) it emits one load of the right width. The kernel accepts
    // misaligned packet and map accesses on architectures with efficient unaligned access
    // (x86-64, arm64, ...), which is where mim-lb runs; the verifier would refuse the program
    // elsewhere. Measured with `cargo xtask bench`: see BENCHMARKS.md.
    println!("cargo:rustc-link-arg=--cpu-features=+allows-misaligned-mem-access");
}
