use anyhow::Result;
use clap::Parser;
use mim_lb::{
    check,
    cli::{Cli, Command},
    config::Config,
    daemon,
};

fn main() -> Result<()> {
    let cli = Cli::parse();
    env_logger::Builder::new()
        .parse_filters(&cli.log_level)
        .parse_env("RUST_LOG")
        .format_timestamp_millis()
        .init();
    match cli.command {
        Command::Run(args) => daemon::run(args),
        Command::Check(args) => check::run(&args),
        Command::ExampleConfig => {
            print!("{}", Config::example());
            Ok(())
        }
    }
}
