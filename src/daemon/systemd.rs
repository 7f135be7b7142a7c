//! Talking to systemd (`Type=notify`): READY=1 once every credential is scheduled, STATUS= lines
//! with counts, WATCHDOG=1 pings from the main loop while healthy, RELOADING=1 around a reload,
//! STOPPING=1 on shutdown. Every call is a no-op without `$NOTIFY_SOCKET` (as sd-notify's are), so
//! the same binary runs unchanged outside systemd.

use sd_notify::NotifyState;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// How long a state change (READY, RELOADING, STOPPING) may wait for room in the manager's
/// socket queue. Status lines and watchdog pings never wait.
const STATE_CHANGE_WAIT: Duration = Duration::from_secs(5);

/// sd-notify's own `notify` blocks while the manager's queue is full: a manager (or a harness)
/// that stops reading froze the whole daemon, refreshes included, on its next STATUS line. The
/// message is the same; only the wait is bounded.
fn send(states: &[NotifyState], wait: Option<Duration>) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let message: String = states.iter().map(|s| format!("{s}\n")).collect();
    let sent = UnixDatagram::unbound().and_then(|socket| {
        socket.connect(&path)?;
        match wait {
            Some(limit) => socket.set_write_timeout(Some(limit))?,
            None => socket.set_nonblocking(true)?,
        }
        socket.send(message.as_bytes())
    });
    match sent {
        Ok(_) => {}
        Err(e) if wait.is_none() && e.kind() == std::io::ErrorKind::WouldBlock => {
            tracing::debug!("systemd's notification queue is full; this status line or watchdog ping is dropped");
        }
        Err(e) => tracing::warn!("cannot notify systemd: {e}"),
    }
}

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)], Some(STATE_CHANGE_WAIT));
}

pub fn status(status: &str) {
    send(&[NotifyState::Status(status)], None);
}

pub fn reloading() {
    let now = NotifyState::monotonic_usec_now().ok();
    let mut states = vec![NotifyState::Reloading];
    states.extend(now);
    send(&states, Some(STATE_CHANGE_WAIT));
}

pub fn watchdog() {
    send(&[NotifyState::Watchdog], None);
}

pub fn stopping() {
    send(
        &[NotifyState::Stopping, NotifyState::Status("stopping: letting in-flight refreshes commit")],
        Some(STATE_CHANGE_WAIT),
    );
}

/// How often to ping: half the watchdog timeout systemd gave us (`WatchdogSec=`), if any.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|timeout| timeout / 2).filter(|d| !d.is_zero())
}
