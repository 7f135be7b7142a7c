//! Sleeping until a wall-clock time. tokio's timers count monotonic time, which stands still while
//! the machine is suspended and ignores clock steps, but a token's expiry is a wall-clock fact.
//! A `CLOCK_REALTIME` timerfd armed with `TFD_TIMER_ABSTIME` fires at the wall time itself: after a
//! suspend it fires on resume if the time has passed, and `TFD_TIMER_CANCEL_ON_SET` wakes the
//! sleeper when the clock is stepped (NTP, an operator), so the schedule is re-checked. There are
//! no periodic wake-ups: an idle daemon sleeps until its next deadline.

use nix::errno::Errno;
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// `TimerFd` owns its descriptor but only implements `AsFd`; tokio wants `AsRawFd`.
struct OwnedTimer(TimerFd);

impl AsRawFd for OwnedTimer {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

pub struct WallTimer {
    fd: AsyncFd<OwnedTimer>,
}

impl WallTimer {
    #[allow(unsafe_code)]
    pub fn new() -> io::Result<Self> {
        let timer = TimerFd::new(ClockId::CLOCK_REALTIME, TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC)
            .map_err(io::Error::from)?;
        // SAFETY: the descriptor is owned by the TimerFd inside, which lives exactly as long as
        // the AsyncFd and always reports the same descriptor.
        let fd = unsafe { AsyncFd::register_with_interest(OwnedTimer(timer), Interest::READABLE) }
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Self { fd })
    }

    /// Returns once the wall clock reaches `deadline_ms` (unix milliseconds), or earlier if the
    /// clock was stepped; callers compare with the clock and sleep again if need be.
    pub async fn sleep_until(&mut self, deadline_ms: i64) -> io::Result<()> {
        // An all-zero expiration would disarm the timer; anything in the past fires at once.
        let deadline_ms = deadline_ms.max(1);
        let spec = TimeSpec::new(deadline_ms.div_euclid(1000), deadline_ms.rem_euclid(1000) * 1_000_000);
        self.fd
            .get_ref()
            .0
            .set(
                Expiration::OneShot(spec),
                TimerSetTimeFlags::TFD_TIMER_ABSTIME | TimerSetTimeFlags::TFD_TIMER_CANCEL_ON_SET,
            )
            .map_err(io::Error::from)?;
        loop {
            let mut guard = self.fd.readable().await?;
            let mut expirations = [0u8; 8];
            match nix::unistd::read(&self.fd.get_ref().0, &mut expirations) {
                Ok(_) | Err(Errno::ECANCELED) => return Ok(()),
                Err(Errno::EAGAIN) => guard.clear_ready(),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::now_ms;

    #[tokio::test]
    async fn fires_at_wall_time_not_before() {
        let mut t = WallTimer::new().unwrap();
        let deadline = now_ms() + 150;
        t.sleep_until(deadline).await.unwrap();
        let now = now_ms();
        assert!(now >= deadline, "fired {} ms early", deadline - now);
        assert!(now - deadline < 1000);
        // A deadline in the past fires at once.
        let start = std::time::Instant::now();
        t.sleep_until(now_ms() - 10_000).await.unwrap();
        assert!(start.elapsed() < std::time::Duration::from_millis(500));
    }
}
