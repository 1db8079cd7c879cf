fn main() -> anyhow::Result<()> {
    mim_lb::cli::main()
}
