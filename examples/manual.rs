//! Writes tokend's manual pages and shell completions below a directory that stands for
//! `/usr/share` (`DIR/man/man1/tokend.1`, ...): `debian/build-deb` runs it before `cargo deb`.
//!
//!     cargo run --example manual -- DIR

use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(dir) = std::env::args_os().nth(1) else {
        eprintln!("usage: manual DIR   (writes DIR/man/man1/tokend.1, DIR/man/man5/tokend.toml.5 and the completions)");
        return ExitCode::from(2);
    };
    match tokend::manual::write_all(std::path::Path::new(&dir)) {
        Ok(files) => {
            for file in files {
                println!("{}", file.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("manual: {e}");
            ExitCode::FAILURE
        }
    }
}
