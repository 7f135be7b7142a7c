//! The `tokend` binary: parse the command line, set up logging, hand over to [`tokend::cli`].

use clap::Parser;
use std::process::ExitCode;
use tokend::cli::{self, Cli};

fn main() -> ExitCode {
    // Tokens and secrets live in this process's memory: no core dump may carry them to disk, and
    // no other process of the same user may read that memory through /proc or ptrace.
    let undumpable = nix::sys::prctl::set_dumpable(false);
    tokend::memory::tune_allocator();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { cli::exit::USAGE } else { cli::exit::OK });
        }
    };
    tokend::logging::init(&cli.log_level, cli.log_format.into());
    if let Err(e) = undumpable {
        tracing::warn!("cannot turn core dumps off (PR_SET_DUMPABLE): {e}");
    }
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
