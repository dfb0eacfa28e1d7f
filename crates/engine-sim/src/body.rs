//! Response bodies: a complete buffer, or a paced server-sent-event token stream
//! generated lazily as hyper polls it (no task, no channel; a client that goes
//! away drops the body and generation stops).

use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

use crate::{Phase, Shared};

/// Synthetic vocabulary; token `i` is `WORDS[i % len]` (the very first token
/// without its leading space). Deliberately reads as simulator output.
const WORDS: &[&str] = &[
    " This",
    " is",
    " simulated",
    " output",
    " from",
    " citadel-engine-sim,",
    " not",
    " a",
    " real",
    " model;",
    " tokens",
    " repeat",
    " in",
    " a",
    " fixed",
    " cycle.",
];

pub(crate) fn token(i: u64) -> &'static str {
    let w = WORDS[(i % WORDS.len() as u64) as usize];
    if i == 0 {
        &w[1..]
    } else {
        w
    }
}

/// The deterministic text of `n` tokens.
pub(crate) fn text(n: u64) -> String {
    let mut s = String::with_capacity(n as usize * 8);
    for i in 0..n {
        s.push_str(token(i));
    }
    s
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Kind {
    Chat,
    Completion,
}

/// Keeps `vllm:num_requests_running` up while a request is in flight.
pub(crate) struct Running {
    shared: Arc<Shared>,
    model: usize,
}

impl Running {
    pub(crate) fn new(shared: Arc<Shared>, model: usize) -> Self {
        shared.models[model].m.running.fetch_add(1, Relaxed);
        Running { shared, model }
    }
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
    pub(crate) fn model(&self) -> usize {
        self.model
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shared.models[self.model]
            .m
            .running
            .fetch_sub(1, Relaxed);
    }
}

/// Everything a generation needs, shared by the streaming and buffered paths.
pub(crate) struct Gen {
    pub(crate) kind: Kind,
    pub(crate) id: String,
    pub(crate) created: u64,
    pub(crate) prompt_tokens: u64,
    pub(crate) max_tokens: u64,
    pub(crate) include_usage: bool,
    pub(crate) start: Instant,
    /// Sequence number of this completion request (for `hang_after`).
    pub(crate) seq: u64,
}

impl Gen {
    /// When token `i` is due.
    pub(crate) fn due(&self, shared: &Shared, i: u64) -> Instant {
        let period = shared.token_period;
        let offset = period
            .checked_mul(u32::try_from(i).unwrap_or(u32::MAX))
            .unwrap_or(Duration::MAX / 4);
        self.start + shared.cfg.first_token_delay + offset
    }

    /// Records the outcome of a finished generation.
    pub(crate) fn record_success(&self, run: &Running, first_token: Option<Instant>) {
        let shared = run.shared();
        let m = &shared.models[run.model()].m;
        m.prompt_tokens.fetch_add(self.prompt_tokens, Relaxed);
        m.generation_tokens.fetch_add(self.max_tokens, Relaxed);
        m.success_length.fetch_add(1, Relaxed);
        if let Some(t) = first_token {
            m.ttft.observe(t.duration_since(self.start));
        }
        m.e2e.observe(self.start.elapsed());
        shared.counters.completions_ok.fetch_add(1, Relaxed);
    }

    fn usage(&self, out: &mut String) {
        let _ = write!(
            out,
            r#"{{"prompt_tokens":{},"completion_tokens":{},"total_tokens":{}}}"#,
            self.prompt_tokens,
            self.max_tokens,
            self.prompt_tokens + self.max_tokens
        );
    }

    /// Buffered (non-stream) response JSON.
    pub(crate) fn full_json(&self, model_json: &str) -> Vec<u8> {
        let text = text(self.max_tokens);
        let mut out = String::with_capacity(300 + text.len());
        let (object, choice_open, choice_close) = match self.kind {
            Kind::Chat => (
                "chat.completion",
                r#"{"index":0,"message":{"role":"assistant","content":""#,
                r#""},"logprobs":null,"finish_reason":"length","stop_reason":null}"#,
            ),
            Kind::Completion => (
                "text_completion",
                r#"{"index":0,"text":""#,
                r#"","logprobs":null,"finish_reason":"length","stop_reason":null}"#,
            ),
        };
        let _ = write!(
            out,
            r#"{{"id":"{}","object":"{object}","created":{},"model":{model_json},"choices":[{choice_open}{text}{choice_close}],"usage":"#,
            self.id, self.created
        );
        self.usage(&mut out);
        out.push('}');
        out.into_bytes()
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stage {
    Role,
    Tokens,
    Final,
    Usage,
    Done,
    End,
}

/// Lazily generated SSE stream.
pub(crate) struct TokenStream {
    run: Running,
    gen: Gen,
    next: u64,
    stage: Stage,
    first_token: Option<Instant>,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl TokenStream {
    pub(crate) fn new(run: Running, gen: Gen) -> Self {
        let stage = if gen.kind == Kind::Chat {
            Stage::Role
        } else {
            Stage::Tokens
        };
        TokenStream {
            run,
            gen,
            next: 0,
            stage,
            first_token: None,
            sleep: None,
        }
    }

    fn wait_until(&mut self, cx: &mut Context<'_>, deadline: Instant) -> Poll<()> {
        if Instant::now() >= deadline {
            return Poll::Ready(());
        }
        let deadline = tokio::time::Instant::from_std(deadline);
        let sleep = match &mut self.sleep {
            Some(s) => {
                if s.deadline() != deadline {
                    s.as_mut().reset(deadline);
                }
                s
            }
            None => self
                .sleep
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        sleep.as_mut().poll(cx)
    }

    fn hung(&self) -> bool {
        let s = self.run.shared();
        s.hang.load(Relaxed) || self.gen.seq > s.hang_after.load(Relaxed)
    }

    /// Starts an SSE event: `data: {"id":..,"object":..,"created":..,"model":..,"choices":[`.
    fn open(&self, out: &mut String) {
        let object = match self.gen.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        };
        let model = &self.run.shared().models[self.run.model()].json;
        let _ = write!(
            out,
            r#"data: {{"id":"{}","object":"{object}","created":{},"model":{model},"choices":["#,
            self.gen.id, self.gen.created
        );
    }

    fn close(&self, out: &mut String) {
        out.push(']');
        if self.gen.include_usage {
            out.push_str(r#","usage":null"#);
        }
        out.push_str("}\n\n");
    }

    fn choice(&self, out: &mut String, content: &str, role: bool, finish: bool) {
        let finish = if finish { r#""length""# } else { "null" };
        match self.gen.kind {
            Kind::Chat => {
                let delta_role = if role { r#""role":"assistant","# } else { "" };
                if finish == "null" {
                    let _ = write!(
                        out,
                        r#"{{"index":0,"delta":{{{delta_role}"content":"{content}"}},"logprobs":null,"finish_reason":null}}"#
                    );
                } else {
                    let _ = write!(
                        out,
                        r#"{{"index":0,"delta":{{}},"logprobs":null,"finish_reason":{finish},"stop_reason":null}}"#
                    );
                }
            }
            Kind::Completion => {
                let stop = if finish == "null" {
                    ""
                } else {
                    r#","stop_reason":null"#
                };
                let _ = write!(
                    out,
                    r#"{{"index":0,"text":"{content}","logprobs":null,"finish_reason":{finish}{stop}}}"#
                );
            }
        }
    }

    fn event(&self, content: &str, role: bool, finish: bool) -> Bytes {
        let mut out = String::with_capacity(256);
        self.open(&mut out);
        self.choice(&mut out, content, role, finish);
        self.close(&mut out);
        Bytes::from(out)
    }

    fn usage_event(&self) -> Bytes {
        let mut out = String::with_capacity(256);
        self.open(&mut out);
        out.push_str(r#"],"usage":"#);
        self.gen.usage(&mut out);
        out.push_str("}\n\n");
        Bytes::from(out)
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        loop {
            if self.stage == Stage::End {
                return Poll::Ready(None);
            }
            if matches!(self.run.shared().phase(), Phase::Stopped | Phase::Crashed) {
                // Stopped abruptly or crashed: cut the stream short. (A graceful
                // stop lets it finish within the shutdown grace period.)
                self.stage = Stage::End;
                return Poll::Ready(None);
            }
            if self.hung() {
                let again = Instant::now() + Duration::from_millis(50);
                if self.wait_until(cx, again).is_pending() {
                    return Poll::Pending;
                }
                continue;
            }
            match self.stage {
                Stage::Role => {
                    self.stage = Stage::Tokens;
                    return Poll::Ready(Some(self.event("", true, false)));
                }
                Stage::Tokens => {
                    if self.next >= self.gen.max_tokens {
                        self.stage = Stage::Final;
                        continue;
                    }
                    let due = self.gen.due(self.run.shared(), self.next);
                    if self.wait_until(cx, due).is_pending() {
                        return Poll::Pending;
                    }
                    let ev = self.event(token(self.next), false, false);
                    if self.next == 0 {
                        self.first_token = Some(Instant::now());
                    }
                    self.next += 1;
                    return Poll::Ready(Some(ev));
                }
                Stage::Final => {
                    self.stage = if self.gen.include_usage {
                        Stage::Usage
                    } else {
                        Stage::Done
                    };
                    return Poll::Ready(Some(self.event("", false, true)));
                }
                Stage::Usage => {
                    self.stage = Stage::Done;
                    return Poll::Ready(Some(self.usage_event()));
                }
                Stage::Done => {
                    self.stage = Stage::End;
                    self.gen.record_success(&self.run, self.first_token);
                    return Poll::Ready(Some(Bytes::from_static(b"data: [DONE]\n\n")));
                }
                Stage::End => return Poll::Ready(None),
            }
        }
    }
}

/// The response body type of every simulator response.
pub(crate) enum SimBody {
    Full(Option<Bytes>),
    Tokens(Box<TokenStream>),
}

impl SimBody {
    pub(crate) fn full(b: impl Into<Bytes>) -> Self {
        let b = b.into();
        SimBody::Full((!b.is_empty()).then_some(b))
    }
}

impl Body for SimBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            SimBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            SimBody::Tokens(s) => s.poll_next(cx).map(|o| o.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            SimBody::Full(b) => b.is_none(),
            SimBody::Tokens(s) => s.stage == Stage::End,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            SimBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            SimBody::Tokens(_) => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_deterministic() {
        assert_eq!(text(3), "This is simulated");
        assert_eq!(text(0), "");
        assert_eq!(token(16), " This");
    }
}
