//! sd_notify(3) messages to the service manager (`$NOTIFY_SOCKET`), through the
//! `sd-notify` crate. Outside systemd (no socket) every send is a no-op.

use std::time::Duration;

pub use sd_notify::NotifyState;

/// Sends notifications; knows whether systemd asked for a watchdog.
#[derive(Debug, Clone)]
pub struct Notifier {
    enabled: bool,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` (the watchdog
    /// is ours only when `WATCHDOG_PID` is unset or names this process).
    pub fn from_env() -> Notifier {
        Notifier {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some_and(|s| !s.is_empty()),
            watchdog: sd_notify::watchdog_enabled().filter(|d| !d.is_zero()),
        }
    }

    /// A notifier that sends nothing (for `command` and tests).
    pub fn disabled() -> Notifier {
        Notifier {
            enabled: false,
            watchdog: None,
        }
    }

    /// The watchdog period systemd enforces (`WATCHDOG_USEC`), if any.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends `states` as one datagram; failures are logged, never fatal
    /// (a supervisor that cannot notify still supervises).
    /// `STATUS=` texts are made single-line first: they may quote an engine's
    /// answer, and a newline would start a new assignment (e.g. `READY=1`).
    pub fn send(&self, states: &[NotifyState<'_>]) {
        if !self.enabled {
            return;
        }
        let cleaned: Vec<Option<String>> = states
            .iter()
            .map(|s| match s {
                NotifyState::Status(t) => Some(single_line(t)),
                _ => None,
            })
            .collect();
        let states: Vec<NotifyState<'_>> = states
            .iter()
            .zip(&cleaned)
            .map(|(s, c)| match c {
                Some(text) => NotifyState::Status(text),
                None => s.clone(),
            })
            .collect();
        if let Err(e) = sd_notify::notify(&states) {
            tracing::warn!(error = %e, "cannot send sd_notify message");
        }
    }

    pub fn status(&self, text: &str) {
        self.send(&[NotifyState::Status(text)]);
    }

    pub fn ping(&self) {
        self.send(&[NotifyState::Watchdog]);
    }
}

/// Microseconds for EXTEND_TIMEOUT_USEC / WATCHDOG_USEC (saturating).
pub fn usec(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// Replaces control characters (newlines included) with spaces.
pub fn single_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn status_cannot_inject_assignments() {
        assert_eq!(
            super::single_line("unhealthy: 500 {\"x\":\"a\nREADY=1\"}\r"),
            "unhealthy: 500 {\"x\":\"a READY=1\"} "
        );
    }
}
