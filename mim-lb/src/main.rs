fn main() -> std::process::ExitCode {
    mim_lb::cli::main_exit()
}
