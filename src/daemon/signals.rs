//! Unix signals → daemon control messages. The one place signals are handled.
//!
//! SIGTERM, SIGINT: stop; SIGHUP: reload the configuration; SIGUSR1: refresh everything now.

use super::Control;
use futures_util::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use signal_hook_tokio::Signals;
use tokio::sync::mpsc::UnboundedSender;

/// Installs the handlers and forwards signals until the receiver is gone.
pub fn forward(tx: UnboundedSender<Control>) -> std::io::Result<signal_hook_tokio::Handle> {
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP, SIGUSR1])?;
    let handle = signals.handle();
    tokio::spawn(async move {
        while let Some(signal) = signals.next().await {
            let control = match signal {
                SIGHUP => Control::Reload,
                SIGUSR1 => Control::RefreshAll,
                _ => Control::Shutdown,
            };
            tracing::info!(signal = signal_name(signal), "signal received");
            if tx.send(control).is_err() {
                break;
            }
        }
    });
    Ok(handle)
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        SIGHUP => "SIGHUP",
        SIGUSR1 => "SIGUSR1",
        SIGINT => "SIGINT",
        _ => "SIGTERM",
    }
}
