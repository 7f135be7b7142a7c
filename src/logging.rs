//! Log set-up. Humans get timestamps and colours on a terminal; journald gets neither (it stamps
//! lines itself) but a `<N>` syslog priority prefix per line, so `journalctl -p warning` works;
//! machines get JSON with `--log-format json`.

use std::fmt;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields, Writer};
use tracing_subscriber::registry::LookupSpan;

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber: `RUST_LOG` if set, else `level`.
pub fn init(level: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // tokio-postgres logs every statement's parameters — tokens among them — at debug level:
    // whatever the filter asks for, that crate speaks at info at most.
    // The certificate verifier logs each rejected certificate as an ERROR of its own; the error
    // it returns reaches the operator already, in tokend's one line (exit 9, README "Fleet").
    let filter = ["tokio_postgres=info", "rustls_platform_verifier=off"]
        .into_iter()
        .filter_map(|directive| directive.parse().ok())
        .fold(filter, EnvFilter::add_directive);
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text if stderr_is_journal() => builder
            .with_ansi(false)
            .event_format(JournalFormat(format::format().without_time().with_level(false).with_ansi(false)))
            .init(),
        LogFormat::Text => {
            use std::io::IsTerminal;
            builder.with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none()).init();
        }
    }
}

/// systemd sets `JOURNAL_STREAM=<dev>:<inode>` of the stream it connected to stderr; the variable
/// may be inherited by a child that writes elsewhere, so the identity is checked.
fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else { return false };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else { return false };
    match nix::sys::stat::fstat(std::io::stderr()) {
        Ok(st) => dev.parse::<u64>().ok() == Some(st.st_dev) && ino.parse::<u64>().ok() == Some(st.st_ino),
        Err(_) => false,
    }
}

/// The default line format behind an sd-daemon(3) priority prefix.
struct JournalFormat<F>(F);

/// sd-daemon(3) priorities: err 3, warning 4, info 6, debug 7.
fn syslog_priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

impl<S, N, F> FormatEvent<S, N> for JournalFormat<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        write!(writer, "<{}>", syslog_priority(event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}
