//! The one journal entry per API request: a readable one-line `MESSAGE=`
//! (`POST /v1/chat/completions model=phi3 status=200 2.3 ms 12+34 tokens
//! outcome=ok`) and the same facts as fields (`MODEL=`, `STATUS=`,
//! `OUTCOME=`, ...; see the gateway README, "Logging"). Never a prompt, a
//! completion or a key.
//!
//! The message is formatted straight into the subscriber's buffer (a
//! `Display` value passed as `format_args!`): no string is allocated for it.

use std::fmt;
use std::time::Duration;

/// Token counts from a response's `usage`, each when present.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt: Option<u64>,
    pub completion: Option<u64>,
    pub total: Option<u64>,
}

/// How a request ended, as `OUTCOME=` says it.
pub mod outcome {
    /// The whole response body was handed to the client's connection.
    pub const OK: &str = "ok";
    /// The client went away (or the connection broke) before the body ended.
    pub const ABORTED: &str = "aborted";
    /// The engine's body broke off (an error while reading it): a stream
    /// ended with an SSE error event and no `[DONE]` (issue 12, item 6).
    pub const UPSTREAM_ABORTED: &str = "upstream_aborted";
}

/// One API request's journal entry.
pub struct RequestEvent<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub request_id: &'a str,
    /// The model's name (aliases resolved); empty when the request named none
    /// the gateway knows.
    pub model: &'a str,
    /// Whether the request asked for a stream; `None` when it was refused
    /// before its body was read.
    pub stream: Option<bool>,
    pub status: u16,
    pub elapsed: Duration,
    /// The backend that answered.
    pub backend: Option<&'a str>,
    pub usage: Usage,
    /// One of [`outcome`], or the error code of a refused request.
    pub outcome: &'a str,
}

impl RequestEvent<'_> {
    /// Emits the entry (level INFO, target `citadel_gateway::request`).
    pub fn emit(&self) {
        let latency_ms = self.elapsed.as_micros() as f64 / 1000.0;
        let model = (!self.model.is_empty()).then_some(self.model);
        tracing::info!(
            target: "citadel_gateway::request",
            request_id = self.request_id,
            method = self.method,
            path = self.path,
            model,
            stream = self.stream,
            status = self.status,
            latency_ms,
            backend = self.backend,
            prompt_tokens = self.usage.prompt,
            completion_tokens = self.usage.completion,
            total_tokens = self.usage.total,
            outcome = self.outcome,
            "{}",
            self
        );
    }
}

/// The summary: `METHOD PATH [model=M] [stream] status=S LATENCY [TOKENS] outcome=O`.
/// The latency is in ms to a tenth below a second, else in s to a hundredth
/// (rounded half up, in integers: no float formatting per request).
impl fmt::Display for RequestEvent<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.method)?;
        f.write_str(" ")?;
        f.write_str(self.path)?;
        if !self.model.is_empty() {
            f.write_str(" model=")?;
            f.write_str(self.model)?;
        }
        if self.stream == Some(true) {
            f.write_str(" stream")?;
        }
        write!(f, " status={} ", self.status)?;
        let us = self.elapsed.as_micros();
        if us < 999_950 {
            let tenths = (us + 50) / 100;
            write!(f, "{}.{} ms", tenths / 10, tenths % 10)?;
        } else {
            let hundredths = (us + 5_000) / 10_000;
            write!(f, "{}.{:02} s", hundredths / 100, hundredths % 100)?;
        }
        match self.usage {
            Usage {
                prompt: Some(p),
                completion: Some(c),
                ..
            } => write!(f, " {p}+{c} tokens")?,
            Usage { total: Some(t), .. } => write!(f, " {t} tokens")?,
            _ => {}
        }
        f.write_str(" outcome=")?;
        f.write_str(self.outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(usage: Usage, elapsed: Duration) -> RequestEvent<'static> {
        RequestEvent {
            method: "POST",
            path: "/v1/chat/completions",
            request_id: "abc",
            model: "phi3",
            stream: Some(false),
            status: 200,
            elapsed,
            backend: Some("http://127.0.0.1:8001"),
            usage,
            outcome: outcome::OK,
        }
    }

    #[test]
    fn summary_is_one_readable_line() {
        let u = Usage {
            prompt: Some(12),
            completion: Some(34),
            total: Some(46),
        };
        assert_eq!(
            ev(u, Duration::from_micros(2345)).to_string(),
            "POST /v1/chat/completions model=phi3 status=200 2.3 ms 12+34 tokens outcome=ok"
        );
        let u = Usage {
            total: Some(7),
            ..Usage::default()
        };
        let mut e = ev(u, Duration::from_millis(12_345));
        e.stream = Some(true);
        assert_eq!(
            e.to_string(),
            "POST /v1/chat/completions model=phi3 stream status=200 12.35 s 7 tokens outcome=ok"
        );
        let mut e = ev(Usage::default(), Duration::from_micros(80));
        e.model = "";
        e.status = 401;
        e.outcome = "invalid_api_key";
        assert_eq!(
            e.to_string(),
            "POST /v1/chat/completions status=401 0.1 ms outcome=invalid_api_key"
        );
        // Rounding, and the switch from ms to s.
        for (us, want) in [
            (0, "0.0 ms"),
            (49, "0.0 ms"),
            (50, "0.1 ms"),
            (2_250, "2.3 ms"),
            (999_949, "999.9 ms"),
            (999_950, "1.00 s"),
            (1_004_999, "1.00 s"),
            (1_005_000, "1.01 s"),
            (61_234_567, "61.23 s"),
        ] {
            let e = ev(Usage::default(), Duration::from_micros(us));
            let text = e.to_string();
            assert!(
                text.contains(&format!(" status=200 {want} outcome=ok")),
                "{us}: {text}"
            );
        }
    }
}
