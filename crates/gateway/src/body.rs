//! Response bodies: a small full body, or an upstream body streamed through
//! frame by frame (never buffered), carrying the request's accounting guard.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::proxy::Finish;
use crate::reqlog::Usage;

// One per response, moved once into hyper: boxing the stream would cost an
// allocation per request for nothing.
#[allow(clippy::large_enum_variant)]
pub enum GwBody {
    Full(Option<Bytes>),
    Stream {
        inner: Incoming,
        finish: Finish,
        /// An SSE stream (`text/event-stream`): a break is told in-band.
        sse: bool,
        /// Whether the data sent so far ends between SSE events.
        at_event_end: bool,
        /// The upstream broke off and the error event was sent: the body ends.
        ended: bool,
    },
}

/// The SSE event that ends a stream the engine broke off (issue 12, item 6):
/// OpenAI's error shape, and no `[DONE]` after it.
pub fn aborted_event(model: &str) -> Bytes {
    let v = serde_json::json!({
        "error": {
            "message": format!("The model `{model}` stopped before the response was complete; the response is truncated"),
            "type": "upstream_error",
            "param": null,
            "code": "upstream_aborted",
        }
    });
    Bytes::from(format!("data: {v}\n\n"))
}

impl GwBody {
    /// An upstream body passed through; `finish` is told how it ended. A
    /// body that is empty from the start (`Content-Length: 0`) is complete
    /// before hyper looks at it. `sse`: the body is an event stream.
    pub fn stream(inner: Incoming, mut finish: Finish, sse: bool) -> GwBody {
        if inner.is_end_stream() {
            finish.complete();
        }
        GwBody::Stream {
            inner,
            finish,
            sse,
            at_event_end: true,
            ended: false,
        }
    }
    pub fn full(b: impl Into<Bytes>) -> GwBody {
        GwBody::Full(Some(b.into()))
    }
    pub fn empty() -> GwBody {
        GwBody::Full(None)
    }
}

impl Body for GwBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            GwBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            GwBody::Stream {
                inner,
                finish,
                sse,
                at_event_end,
                ended,
            } => {
                if *ended {
                    return Poll::Ready(None);
                }
                let r = Pin::new(&mut *inner).poll_frame(cx);
                match &r {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Some(data) = frame.data_ref() {
                            finish.saw_data(data);
                            if !data.is_empty() {
                                *at_event_end =
                                    data.ends_with(b"\n\n") || data.ends_with(b"\r\n\r\n");
                            }
                        }
                        // hyper stops polling once `is_end_stream()` is true
                        // (after the last frame of a body with a
                        // Content-Length), so the `None` below never comes
                        // for such a body: the frame in hand is its end.
                        if inner.is_end_stream() {
                            finish.complete();
                        }
                    }
                    Poll::Ready(Some(Err(_))) => {
                        finish.upstream_aborted();
                        if *sse {
                            // Tell the client in the stream, then end it
                            // cleanly: an SSE client reads the error event
                            // instead of a bare connection reset. A partial
                            // event is closed first so the error stands alone.
                            *ended = true;
                            let mut out = Vec::new();
                            if !*at_event_end {
                                out.extend_from_slice(b"\n\n");
                            }
                            out.extend_from_slice(&aborted_event(finish.model()));
                            return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                        }
                    }
                    Poll::Ready(None) => finish.complete(),
                    Poll::Pending => {}
                }
                r
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            GwBody::Full(b) => b.is_none(),
            GwBody::Stream { inner, ended, .. } => *ended || inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            GwBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            GwBody::Full(None) => SizeHint::with_exact(0),
            GwBody::Stream { ended: true, .. } => SizeHint::with_exact(0),
            GwBody::Stream {
                inner, sse: true, ..
            } => {
                // An error event may be added: never promise an exact length.
                let mut h = SizeHint::new();
                h.set_lower(inner.size_hint().lower());
                h
            }
            GwBody::Stream { inner, .. } => inner.size_hint(),
        }
    }
}

/// Finds the last `"total_tokens":N` in a chunk of a response body or SSE
/// stream (usage comes last). `None` when there is none or N does not fit a
/// u64; never panics, whatever the bytes.
pub fn scan_tokens(data: &[u8]) -> Option<u64> {
    scan_u64(data, b"\"total_tokens\":")
}

/// The usage in a chunk of a response body or SSE stream: `None` unless it
/// has a `"total_tokens":N`; then the last `"prompt_tokens":N` and
/// `"completion_tokens":N` as well, when present. The chunks without usage
/// (nearly all of a stream) cost one scan, as before. Never panics.
pub fn scan_usage(data: &[u8]) -> Option<Usage> {
    let total = scan_tokens(data)?;
    Some(Usage {
        prompt: scan_u64(data, b"\"prompt_tokens\":"),
        completion: scan_u64(data, b"\"completion_tokens\":"),
        total: Some(total),
    })
}

/// The number after the last `key` (spaces allowed), if it fits a u64.
fn scan_u64(data: &[u8], key: &[u8]) -> Option<u64> {
    let pos = find(data, key)?;
    let rest = &data[pos + key.len()..];
    let rest = &rest[rest.iter().take_while(|b| **b == b' ').count()..];
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

/// Whether a chunk of an SSE stream carries generated output: a non-empty
/// `"content"`, `"reasoning_content"` or `"text"` string, or a non-empty
/// `"tool_calls"` list (OpenAI's chat and completion chunks). The role
/// chunk, the final one (`"content":""` and a finish reason), the usage chunk
/// (`"choices":[]`) and `[DONE]` carry none. Text inside a JSON string cannot
/// match (its quotes are escaped). Never panics.
pub fn scan_content(data: &[u8]) -> bool {
    let after = |key: &[u8], ok: &dyn Fn(&[u8]) -> bool| {
        let mut from = 0;
        while let Some(p) = find_from(data, from, key) {
            let rest = &data[p + key.len()..];
            let rest = &rest[rest.iter().take_while(|b| **b == b' ').count()..];
            if ok(rest) {
                return true;
            }
            from = p + 1;
        }
        false
    };
    let non_empty_string =
        |r: &[u8]| r.first() == Some(&b'"') && r.get(1).is_some_and(|c| *c != b'"');
    let non_empty_list = |r: &[u8]| {
        r.first() == Some(&b'[')
            && r[1..]
                .iter()
                .find(|b| **b != b' ')
                .is_some_and(|c| *c != b']')
    };
    after(b"\"content\":", &non_empty_string)
        || after(b"\"text\":", &non_empty_string)
        || after(b"\"reasoning_content\":", &non_empty_string)
        || after(b"\"tool_calls\":", &non_empty_list)
}

/// The first `needle` in `hay` at or after `from`.
fn find_from(hay: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    let hay = hay.get(from..)?;
    hay.windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if hay.len() < needle.len() {
        return None;
    }
    // `usage` comes at the end of a response or in the last stream chunk.
    (0..=hay.len() - needle.len())
        .rev()
        .find(|&i| &hay[i..i + needle.len()] == needle)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::scan_tokens;

    /// SSE events as an engine streams them: `data: {json}` and a blank line,
    /// usage (when present) in the event's JSON.
    /// Generated text and, maybe, usage (prompt, completion, total).
    type Event = (String, Option<(u64, u64, u64)>);

    fn sse(events: &[Event]) -> Vec<u8> {
        let mut out = Vec::new();
        for (content, usage) in events {
            let mut v = serde_json::json!({
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"content": content}}],
            });
            if let Some((p, c, t)) = usage {
                v["usage"] = serde_json::json!({
                    "prompt_tokens": p, "completion_tokens": c, "total_tokens": t,
                });
            }
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(v.to_string().as_bytes());
            out.extend_from_slice(b"\n\n");
        }
        out.extend_from_slice(b"data: [DONE]\n\n");
        out
    }

    /// The reference: parse every event back with serde_json.
    fn reference(chunk: &[u8]) -> Option<u64> {
        String::from_utf8_lossy(chunk)
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .filter_map(|e| serde_json::from_str::<serde_json::Value>(e).ok())
            .filter_map(|v| v["usage"]["total_tokens"].as_u64())
            .last()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(384))]

        /// Issue 9 (checks): the SSE/body scanner never panics on outside bytes.
        #[test]
        fn issue9_scan_tokens_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = scan_tokens(&bytes);
        }

        /// ... nor on what follows the key: signs, spaces, 20+ digit numbers.
        #[test]
        fn issue9_scan_tokens_never_panics_after_the_key(
            prefix in prop::collection::vec(any::<u8>(), 0..16),
            tail in prop::collection::vec(prop::sample::select(b"0123456789 -+.e\"".to_vec()), 0..48),
        ) {
            let mut b = prefix;
            b.extend_from_slice(b"\"total_tokens\":");
            b.extend_from_slice(&tail);
            let got = scan_tokens(&b);
            let digits: String = String::from_utf8_lossy(&tail)
                .trim_start_matches(' ')
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            prop_assert_eq!(got, digits.parse::<u64>().ok());
        }

        /// On a stream of events, it finds what serde_json finds: the last
        /// event's usage, whatever the generated text (which may itself
        /// contain `"total_tokens":`, escaped by JSON).
        #[test]
        fn issue9_scan_tokens_agrees_with_serde_json(
            events in prop::collection::vec(
                (
                    prop_oneof![any::<String>(), Just("\"total_tokens\": 7".to_owned())],
                    prop::option::of((any::<u64>(), any::<u64>(), any::<u64>())),
                ),
                0..6,
            )
        ) {
            let chunk = sse(&events);
            prop_assert_eq!(scan_tokens(&chunk), reference(&chunk));
        }
    }

    /// The reference for [`super::scan_usage`]: the last event's usage.
    fn reference_usage(chunk: &[u8]) -> Option<crate::reqlog::Usage> {
        String::from_utf8_lossy(chunk)
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .filter_map(|e| serde_json::from_str::<serde_json::Value>(e).ok())
            .filter(|v| v["usage"]["total_tokens"].is_u64())
            .map(|v| crate::reqlog::Usage {
                prompt: v["usage"]["prompt_tokens"].as_u64(),
                completion: v["usage"]["completion_tokens"].as_u64(),
                total: v["usage"]["total_tokens"].as_u64(),
            })
            .last()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Issue 10, item 4 (the request's journal entry has prompt and
        /// completion tokens): the usage scanner never panics ...
        #[test]
        fn scan_usage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = super::scan_usage(&bytes);
        }

        /// ... and finds what serde_json finds in the last event's usage.
        #[test]
        fn scan_usage_agrees_with_serde_json(
            events in prop::collection::vec(
                (
                    prop_oneof![any::<String>(), Just("\"prompt_tokens\": 7".to_owned())],
                    prop::option::of((any::<u64>(), any::<u64>(), any::<u64>())),
                ),
                0..6,
            )
        ) {
            let chunk = sse(&events);
            prop_assert_eq!(super::scan_usage(&chunk), reference_usage(&chunk));
        }
    }

    /// The reference for [`super::scan_content`]: some choice has a non-empty
    /// delta content (chat) or text (completions).
    fn reference_content(chunk: &[u8]) -> bool {
        String::from_utf8_lossy(chunk)
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .filter_map(|e| serde_json::from_str::<serde_json::Value>(e).ok())
            .any(|v| {
                v["choices"].as_array().is_some_and(|cs| {
                    cs.iter().any(|c| {
                        c["delta"]["content"]
                            .as_str()
                            .is_some_and(|s| !s.is_empty())
                            || c["text"].as_str().is_some_and(|s| !s.is_empty())
                    })
                })
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Issue 14, item 1 (time to first token, inter-token latency): the
        /// content scanner never panics ...
        #[test]
        fn issue14_scan_content_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = super::scan_content(&bytes);
        }

        /// ... and sees generated output exactly where serde_json does, also
        /// when the text itself looks like JSON.
        #[test]
        fn issue14_scan_content_agrees_with_serde_json(
            events in prop::collection::vec(
                (
                    prop_oneof![Just(String::new()), any::<String>(), Just("\"content\":\"x\"".to_owned())],
                    prop::option::of((any::<u64>(), any::<u64>(), any::<u64>())),
                ),
                0..4,
            )
        ) {
            let chunk = sse(&events);
            prop_assert_eq!(super::scan_content(&chunk), reference_content(&chunk));
        }
    }

    #[test]
    fn content_chunks() {
        use super::scan_content;
        assert!(!scan_content(
            br#"data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#
        ));
        assert!(scan_content(
            br#"data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}"#
        ));
        assert!(scan_content(
            br#"data: {"choices":[{"index":0,"text": " a","logprobs":null}]}"#
        ));
        assert!(!scan_content(
            br#"data: {"choices":[],"usage":{"total_tokens":3}}"#
        ));
        assert!(scan_content(
            br#"data: {"choices":[{"delta":{"tool_calls":[{"index":0}]}}]}"#
        ));
        assert!(!scan_content(b"data: [DONE]\n\n"));
    }

    #[test]
    fn tokens() {
        assert_eq!(
            super::scan_tokens(br#"{"usage":{"prompt_tokens":3,"total_tokens": 19}}"#),
            Some(19)
        );
        assert_eq!(super::scan_tokens(b"data: {}"), None);
    }
}
