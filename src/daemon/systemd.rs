//! Talking to systemd (`Type=notify`): READY=1 once every credential is scheduled, STATUS= lines
//! with counts, WATCHDOG=1 pings from the main loop while healthy, RELOADING=1 around a reload,
//! STOPPING=1 on shutdown. Every call is a no-op without `$NOTIFY_SOCKET` (sd-notify's contract),
//! so the same binary runs unchanged outside systemd.

use sd_notify::NotifyState;
use std::time::Duration;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("cannot notify systemd: {e}");
    }
}

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

pub fn reloading() {
    let now = NotifyState::monotonic_usec_now().ok();
    let mut states = vec![NotifyState::Reloading];
    states.extend(now);
    send(&states);
}

pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping: letting in-flight refreshes commit")]);
}

/// How often to ping: half the watchdog timeout systemd gave us (`WatchdogSec=`), if any.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|timeout| timeout / 2).filter(|d| !d.is_zero())
}
