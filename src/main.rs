//! The `tokend` binary: parse the command line, set up logging, hand over to [`tokend::cli`].

use clap::Parser;
use std::process::ExitCode;
use tokend::cli::{self, Cli};

fn main() -> ExitCode {
    tokend::memory::tune_allocator();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { cli::exit::USAGE } else { cli::exit::OK });
        }
    };
    tokend::logging::init(&cli.log_level, cli.log_format.into());
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tokend: cannot start the async runtime: {e}");
            return ExitCode::from(cli::exit::FAILURE);
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tokend: {}", e.message);
            ExitCode::from(e.code)
        }
    }
}
