//! Response bodies: a small full body, or an upstream body streamed through
//! frame by frame (never buffered), carrying the request's accounting guard.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::proxy::Finish;

pub enum GwBody {
    Full(Option<Bytes>),
    Stream { inner: Incoming, finish: Finish },
}

impl GwBody {
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
            GwBody::Stream { inner, finish } => {
                let r = Pin::new(inner).poll_frame(cx);
                match &r {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Some(data) = frame.data_ref() {
                            finish.saw_data(data);
                        }
                    }
                    Poll::Ready(Some(Err(_))) => finish.upstream_error(),
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
            GwBody::Stream { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            GwBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            GwBody::Full(None) => SizeHint::with_exact(0),
            GwBody::Stream { inner, .. } => inner.size_hint(),
        }
    }
}

/// Finds the last `"total_tokens":N` (or `"completion_tokens":N`) in a chunk.
pub fn scan_tokens(data: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"\"total_tokens\":";
    let pos = find(data, KEY)?;
    let rest = &data[pos + KEY.len()..];
    let rest = &rest[rest.iter().take_while(|b| **b == b' ').count()..];
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
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
    #[test]
    fn tokens() {
        assert_eq!(
            super::scan_tokens(br#"{"usage":{"prompt_tokens":3,"total_tokens": 19}}"#),
            Some(19)
        );
        assert_eq!(super::scan_tokens(b"data: {}"), None);
    }
}
