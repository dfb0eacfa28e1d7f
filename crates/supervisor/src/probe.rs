//! Readiness and health probes: a deliberately small HTTP/1.1 client
//! (one request per connection, `Connection: close`) over a tokio `TcpStream`,
//! enough for `GET /health` and one tiny completion against an engine on loopback.
//!
//! The engine is outside input: whatever bytes it sends, a request ends with
//! `Ok` or `Err` within its timeout and never panics. Every size is bounded
//! (headers [`MAX_HEAD`], decoded body [`MAX_BODY`], raw bytes read
//! [`MAX_RAW`]) and every length from the wire (Content-Length, chunk sizes)
//! is parsed with checked arithmetic; anything out of bounds or malformed is a
//! [`ResponseError`], i.e. a failed probe (issue 9: a chunk size
//! `ffffffffffffffff` used to overflow and panic the prober). A request target
//! with control characters, spaces or non-ASCII is refused before anything is
//! sent ([`RequestError::BadTarget`]), so a CR/LF in `health_path` can never
//! inject header lines (the config rejects it too; this is defence in depth).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use citadel_config::{EngineKind, Model, ReadyCheck};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response head (status line and headers) accepted.
pub const MAX_HEAD: usize = 16 * 1024;
/// Largest (de-chunked) response body accepted: health answers and
/// one-token completions are tiny.
pub const MAX_BODY: usize = 1024 * 1024;
/// Most raw bytes read for one response (head, body and chunk framing).
pub const MAX_RAW: usize = MAX_HEAD + 2 * MAX_BODY;
/// Longest chunk-size line (size, extensions) accepted.
const MAX_CHUNK_LINE: usize = 1024;
/// Bytes asked of the socket per read.
const READ_SIZE: usize = 64 * 1024;

/// The result of one probe; `Err` carries a short reason for logs and STATUS=.
pub type ProbeResult = Result<(), String>;

/// An HTTP response: status code and (de-chunked) body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Why the bytes an engine sent are not an acceptable HTTP response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    #[error("not an HTTP response: `{0}`")]
    NotHttp(String),
    #[error("connection closed without a response")]
    NoResponse,
    #[error("connection closed in the middle of the response headers")]
    TruncatedHead,
    #[error("response headers larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("response body larger than {MAX_BODY} bytes")]
    BodyTooLarge,
    #[error("response larger than {MAX_RAW} bytes")]
    RawTooLarge,
    #[error("invalid Content-Length `{0}`")]
    BadContentLength(String),
    #[error("invalid chunked body: {0}")]
    BadChunk(&'static str),
    #[error("truncated body")]
    TruncatedBody,
    #[error("truncated chunked body")]
    TruncatedChunked,
}

/// Why one request failed; each is a failed probe.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("{method} {target:?}: refusing to send a request target with control characters, spaces or non-ASCII bytes")]
    BadTarget { method: String, target: String },
    #[error("{method} {path}: {error}")]
    Io {
        method: String,
        path: String,
        error: std::io::Error,
    },
    #[error("{method} {path}: no answer within {timeout:?}")]
    Timeout {
        method: String,
        path: String,
        timeout: Duration,
    },
    #[error("{method} {path}: {error}")]
    Response {
        method: String,
        path: String,
        error: ResponseError,
    },
}

/// Whether `target` can go into a request line as is: an origin-form path
/// (`/...`) of visible ASCII only (no CR, LF, space or other control byte
/// that would end the request line or start a header).
pub fn is_safe_target(target: &str) -> bool {
    target.starts_with('/') && target.bytes().all(|b| b.is_ascii_graphic())
}

/// Sends one request and reads the whole response, all within `timeout`.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<Response, RequestError> {
    if !is_safe_target(path) || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(RequestError::BadTarget {
            method: method.escape_debug().to_string(),
            target: path.to_owned(),
        });
    }
    match tokio::time::timeout(timeout, request_inner(addr, method, path, body)).await {
        Ok(r) => r,
        Err(_) => Err(RequestError::Timeout {
            method: method.to_owned(),
            path: path.to_owned(),
            timeout,
        }),
    }
}

async fn request_inner(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<Response, RequestError> {
    let io = |error: std::io::Error| RequestError::Io {
        method: method.to_owned(),
        path: path.to_owned(),
        error,
    };
    let bad = |error: ResponseError| RequestError::Response {
        method: method.to_owned(),
        path: path.to_owned(),
        error,
    };
    let mut stream = TcpStream::connect(addr).await.map_err(io)?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: citadel-model\r\nAccept: application/json\r\nConnection: close\r\n"
    );
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        ));
    } else {
        req.push_str("\r\n");
    }
    stream.write_all(req.as_bytes()).await.map_err(io)?;
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    // Read until the headers and the announced body are in, or the peer closes.
    loop {
        buf.reserve(READ_SIZE);
        let n = stream.read_buf(&mut buf).await.map_err(io)?;
        let eof = n == 0;
        if let Some(resp) = parse_response(&buf, eof) {
            return resp.map_err(bad);
        }
        if buf.len() > MAX_RAW {
            return Err(bad(ResponseError::RawTooLarge));
        }
        if eof {
            // parse_response answers every input at eof; kept as a guard.
            return Err(bad(ResponseError::NoResponse));
        }
    }
}

/// Where `needle` first occurs in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Parses a complete response from `buf`; `None` while more bytes are needed
/// (`eof` says the peer closed, so a body without a length ends here and
/// anything incomplete is an error). Never panics, whatever `buf` holds.
pub fn parse_response(buf: &[u8], eof: bool) -> Option<Result<Response, ResponseError>> {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        return if buf.len() > MAX_HEAD + 3 {
            Some(Err(ResponseError::HeadTooLarge))
        } else if eof && buf.is_empty() {
            Some(Err(ResponseError::NoResponse))
        } else if eof {
            Some(Err(match status_of(buf) {
                Err(e) => e,
                Ok(_) => ResponseError::TruncatedHead,
            }))
        } else {
            None
        };
    };
    if head_end > MAX_HEAD {
        return Some(Err(ResponseError::HeadTooLarge));
    }
    parse_parts(&buf[..head_end], &buf[head_end + 4..], eof).transpose()
}

/// The status code of a head that starts `HTTP/1.x NNN`.
fn status_of(head: &[u8]) -> Result<u16, ResponseError> {
    let line_end = find(head, b"\r\n").unwrap_or(head.len());
    let line = head.get(..line_end).unwrap_or_default();
    let not_http = || ResponseError::NotHttp(snippet(line));
    let rest = line.strip_prefix(b"HTTP/1.").ok_or_else(not_http)?;
    match rest {
        [v, b' ', d1, d2, d3, tail @ ..]
            if v.is_ascii_digit()
                && [d1, d2, d3].iter().all(|d| d.is_ascii_digit())
                && (tail.is_empty() || tail[0] == b' ') =>
        {
            Ok(u16::from(d1 - b'0') * 100 + u16::from(d2 - b'0') * 10 + u16::from(d3 - b'0'))
        }
        _ => Err(not_http()),
    }
}

/// The body framing a response head announces.
enum Framing {
    Chunked,
    Length(usize),
    UntilClose,
}

/// `Ok(None)` while more bytes are needed.
fn parse_parts(head: &[u8], rest: &[u8], eof: bool) -> Result<Option<Response>, ResponseError> {
    let status = status_of(head)?;
    let mut length: Option<usize> = None;
    let mut chunked = false;
    for line in head.split(|&b| b == b'\n').skip(1) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (k, v) = (&line[..colon], line[colon + 1..].trim_ascii());
        if k.eq_ignore_ascii_case(b"content-length") {
            let n = parse_length(v)?;
            if length.is_some_and(|l| l != n) {
                return Err(ResponseError::BadContentLength(snippet(v)));
            }
            length = Some(n);
        } else if k.eq_ignore_ascii_case(b"transfer-encoding") {
            // The last coding decides (RFC 9112 6.3); we only decode chunked.
            chunked = v
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        }
    }
    let framing = if chunked {
        Framing::Chunked
    } else if status == 204 || status == 304 || (100..200).contains(&status) {
        Framing::Length(0)
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::UntilClose
    };
    let body = match framing {
        Framing::Chunked => match dechunk(rest)? {
            Some(body) => body,
            None if eof => return Err(ResponseError::TruncatedChunked),
            None => return Ok(None),
        },
        Framing::Length(n) => match rest.get(..n) {
            Some(body) => body.to_vec(),
            None if eof => return Err(ResponseError::TruncatedBody),
            None => return Ok(None),
        },
        Framing::UntilClose if rest.len() > MAX_BODY => return Err(ResponseError::BodyTooLarge),
        Framing::UntilClose if eof => rest.to_vec(),
        Framing::UntilClose => return Ok(None),
    };
    Ok(Some(Response { status, body }))
}

/// A Content-Length value: decimal digits only, at most [`MAX_BODY`].
fn parse_length(v: &[u8]) -> Result<usize, ResponseError> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return Err(ResponseError::BadContentLength(snippet(v)));
    }
    let mut n: usize = 0;
    for d in v {
        n = n
            .checked_mul(10)
            .and_then(|n| n.checked_add(usize::from(d - b'0')))
            .filter(|&n| n <= MAX_BODY)
            .ok_or(ResponseError::BodyTooLarge)?;
    }
    Ok(n)
}

/// A chunk size: hex digits only, at most [`MAX_BODY`].
fn parse_chunk_size(v: &[u8]) -> Result<usize, ResponseError> {
    if v.is_empty() {
        return Err(ResponseError::BadChunk("missing chunk size"));
    }
    let mut n: usize = 0;
    for &c in v {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            b'A'..=b'F' => c - b'A' + 10,
            _ => return Err(ResponseError::BadChunk("chunk size is not hexadecimal")),
        };
        n = n
            .checked_mul(16)
            .and_then(|n| n.checked_add(usize::from(d)))
            .filter(|&n| n <= MAX_BODY)
            .ok_or(ResponseError::BodyTooLarge)?;
    }
    Ok(n)
}

/// Decodes a chunked body; `Ok(None)` until the last chunk is in. Never
/// panics: sizes are bounded by [`MAX_BODY`] before any arithmetic on them.
pub fn dechunk(data: &[u8]) -> Result<Option<Vec<u8>>, ResponseError> {
    let mut out = Vec::new();
    let mut rest = data;
    loop {
        let Some(line_end) = find(rest, b"\r\n") else {
            return if rest.len() > MAX_CHUNK_LINE {
                Err(ResponseError::BadChunk("chunk-size line too long"))
            } else {
                Ok(None)
            };
        };
        if line_end > MAX_CHUNK_LINE {
            return Err(ResponseError::BadChunk("chunk-size line too long"));
        }
        let line = &rest[..line_end];
        let size_text = line.split(|&b| b == b';').next().unwrap_or_default();
        let size = parse_chunk_size(size_text.trim_ascii())?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            // Trailers, if any, are not needed: the connection closes.
            return Ok(Some(out));
        }
        if out.len().saturating_add(size) > MAX_BODY {
            return Err(ResponseError::BodyTooLarge);
        }
        let Some(end) = size.checked_add(2) else {
            return Err(ResponseError::BodyTooLarge);
        };
        let Some(chunk) = rest.get(..end) else {
            return Ok(None);
        };
        let (data, crlf) = chunk.split_at(size);
        if crlf != b"\r\n" {
            return Err(ResponseError::BadChunk(
                "chunk data is not followed by CRLF",
            ));
        }
        out.extend_from_slice(data);
        rest = &rest[end..];
    }
}

/// How the supervisor probes one model's engine.
#[derive(Debug, Clone)]
pub struct Prober {
    pub addr: SocketAddr,
    pub kind: EngineKind,
    pub name: String,
    /// Ollama's own model name (what `/api/generate` loads).
    pub ollama_model: Option<String>,
    pub health_path: String,
    pub ready_check: ReadyCheck,
    /// Timeout of one health request.
    pub health_timeout: Duration,
    /// Timeout of the readiness completion (or Ollama preload).
    pub completion_timeout: Duration,
}

impl Prober {
    pub fn new(model: &Model) -> Prober {
        let interval = model.probe_interval.duration();
        Prober {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, model.port.get())),
            kind: model.engine.kind(),
            name: model.name.to_string(),
            ollama_model: match &model.engine {
                citadel_config::Engine::Ollama { model, .. } => Some(model.clone()),
                _ => None,
            },
            health_path: model.health_path.clone(),
            ready_check: model.ready_check,
            // Short, but never below 2 s: a busy engine answers /health late.
            health_timeout: interval.max(Duration::from_secs(2)),
            // The first completion of a freshly loaded engine may compile kernels.
            completion_timeout: Duration::from_secs(60),
        }
    }

    /// `GET health_path` answers 2xx.
    pub async fn health(&self) -> ProbeResult {
        let r = request(
            self.addr,
            "GET",
            &self.health_path,
            None,
            self.health_timeout,
        )
        .await
        .map_err(|e| e.to_string())?;
        if (200..300).contains(&r.status) {
            Ok(())
        } else {
            Err(format!("GET {} answered {}", self.health_path, r.status))
        }
    }

    /// Whether the model can really serve: health, then (per profile) one
    /// tiny completion, or for Ollama the preload of its model.
    pub async fn ready(&self) -> ProbeResult {
        self.health().await?;
        if let Some(model) = &self.ollama_model {
            return self.ollama_preload(model).await;
        }
        match self.ready_check {
            ReadyCheck::Health => Ok(()),
            ReadyCheck::Completion => self.completion().await,
        }
    }

    /// `POST /v1/completions {"model": NAME, "prompt": "ping", "max_tokens": 1}`
    /// answers 200 with at least one choice.
    pub async fn completion(&self) -> ProbeResult {
        let body = serde_json::json!({"model": self.name, "prompt": "ping", "max_tokens": 1});
        let path = "/v1/completions";
        let r = request(
            self.addr,
            "POST",
            path,
            Some(&body.to_string()),
            self.completion_timeout,
        )
        .await
        .map_err(|e| e.to_string())?;
        if r.status != 200 {
            return Err(format!(
                "POST {path} answered {}: {}",
                r.status,
                snippet(&r.body)
            ));
        }
        let v: serde_json::Value = serde_json::from_slice(&r.body)
            .map_err(|e| format!("POST {path}: answer is not JSON: {e}"))?;
        match v.get("choices").and_then(|c| c.as_array()) {
            Some(c) if !c.is_empty() => Ok(()),
            _ => Err(format!(
                "POST {path}: answer has no choices: {}",
                snippet(&r.body)
            )),
        }
    }

    /// Ollama: load the model into memory (`keep_alive: -1` keeps it there);
    /// with `ready_check = "completion"` it also generates one token.
    async fn ollama_preload(&self, model: &str) -> ProbeResult {
        let path = "/api/generate";
        let body = match self.ready_check {
            ReadyCheck::Health => {
                serde_json::json!({"model": model, "keep_alive": -1, "stream": false})
            }
            ReadyCheck::Completion => serde_json::json!({
                "model": model, "prompt": "ping", "keep_alive": -1, "stream": false,
                "options": {"num_predict": 1}
            }),
        };
        let r = request(
            self.addr,
            "POST",
            path,
            Some(&body.to_string()),
            self.completion_timeout,
        )
        .await
        .map_err(|e| e.to_string())?;
        if r.status == 200 {
            Ok(())
        } else {
            Err(format!(
                "POST {path} (preload {model}) answered {}: {}",
                r.status,
                snippet(&r.body)
            ))
        }
    }
}

/// At most 200 characters of `body`, lossily decoded, for messages.
fn snippet(body: &[u8]) -> String {
    let s = String::from_utf8_lossy(body);
    let s = s.trim();
    if s.len() > 200 {
        let mut end = 200;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &s[..end])
    } else {
        s.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ok(buf: &[u8], eof: bool) -> Response {
        parse_response(buf, eof)
            .expect("complete")
            .expect("valid response")
    }

    fn err(buf: &[u8], eof: bool) -> ResponseError {
        parse_response(buf, eof)
            .expect("complete")
            .expect_err("invalid response")
    }

    #[test]
    fn parses_length_chunked_and_eof_bodies() {
        let r = ok(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", false);
        assert_eq!((r.status, r.body.as_slice()), (200, &b"ok"[..]));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nok", false).is_none());
        let r = ok(
            b"HTTP/1.1 503 X\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=1\r\nde\r\n0\r\n\r\n",
            false,
        );
        assert_eq!((r.status, r.body.as_slice()), (503, &b"abcde"[..]));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n\r\npartial", false).is_none());
        let r = ok(b"HTTP/1.0 200 OK\r\n\r\nall", true);
        assert_eq!(r.body, b"all");
        assert!(matches!(
            err(b"SSH-2.0\r\n\r\n", true),
            ResponseError::NotHttp(_)
        ));
        assert_eq!(err(b"", true), ResponseError::NoResponse);
        assert_eq!(
            err(b"HTTP/1.1 200 OK\r\nX: y", true),
            ResponseError::TruncatedHead
        );
        assert_eq!(
            err(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nok", true),
            ResponseError::TruncatedBody
        );
        let r = ok(b"HTTP/1.1 204 No Content\r\n\r\n", false);
        assert_eq!((r.status, r.body.len()), (204, 0));
    }

    /// Issue 9, item 2: the chunk size `ffffffffffffffff` overflowed
    /// `size + 2` and panicked the prober task; now it is a failed probe.
    #[test]
    fn issue9_prober_panic_huge_chunk_size_is_an_error() {
        for size in [
            "ffffffffffffffff",
            "fffffffffffffffe",
            "10000000000000000000",
            "100001",
        ] {
            let resp = format!(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{size}\r\nabc\r\n0\r\n\r\n"
            );
            for eof in [false, true] {
                assert_eq!(
                    err(resp.as_bytes(), eof),
                    ResponseError::BodyTooLarge,
                    "{size}"
                );
            }
        }
        assert_eq!(
            dechunk(b"ffffffffffffffff\r\n"),
            Err(ResponseError::BodyTooLarge)
        );
    }

    #[test]
    fn issue9_prober_panic_lengths_and_sizes_are_bounded() {
        // Content-Length beyond the body cap, or not a plain number.
        assert_eq!(
            err(
                b"HTTP/1.1 200 OK\r\nContent-Length: 18446744073709551616\r\n\r\n",
                false
            ),
            ResponseError::BodyTooLarge
        );
        assert_eq!(
            err(b"HTTP/1.1 200 OK\r\nContent-Length: 1048577\r\n\r\n", false),
            ResponseError::BodyTooLarge
        );
        for bad in ["+5", "-1", "5, 6", ""] {
            let resp = format!("HTTP/1.1 200 OK\r\nContent-Length: {bad}\r\n\r\nhello");
            assert!(
                matches!(
                    err(resp.as_bytes(), false),
                    ResponseError::BadContentLength(_)
                ),
                "{bad:?}"
            );
        }
        // Chunk framing that is not hex, or data not followed by CRLF.
        assert!(matches!(
            dechunk(b"+5\r\nhello\r\n0\r\n\r\n"),
            Err(ResponseError::BadChunk(_))
        ));
        assert!(matches!(
            dechunk(b"5\r\nhelloXY0\r\n\r\n"),
            Err(ResponseError::BadChunk(_))
        ));
        assert!(matches!(
            dechunk(&[b'1'; 2000]),
            Err(ResponseError::BadChunk(_))
        ));
        // Headers without an end.
        assert_eq!(
            err(&[b'a'; MAX_HEAD + 10], false),
            ResponseError::HeadTooLarge
        );
        // A body without a length that outgrows the cap.
        let mut big = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
        big.resize(big.len() + MAX_BODY + 1, b'x');
        assert_eq!(err(&big, false), ResponseError::BodyTooLarge);
    }

    /// Issue 9, item 15 (defence in depth): a CR/LF in `health_path` must not
    /// reach the request line; the request is refused before connecting.
    #[tokio::test]
    async fn issue9_health_path_crlf_is_never_sent() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        for path in [
            "/health\r\nX-Injected: 1",
            "/health HTTP/1.1\r\n\r\nGET /x",
            "/he alth",
            "/h\u{e9}alth",
            "/h\0",
            "health",
            "",
        ] {
            let r = request(addr, "GET", path, None, Duration::from_secs(1)).await;
            assert!(
                matches!(r, Err(RequestError::BadTarget { .. })),
                "{path:?}: {r:?}"
            );
            let msg = r.unwrap_err().to_string();
            assert!(!msg.contains('\r') && !msg.contains('\n'), "{msg:?}");
        }
        // Nothing ever connected.
        let accepted = tokio::time::timeout(Duration::from_millis(50), listener.accept()).await;
        assert!(accepted.is_err(), "a refused request must not connect");
        assert!(is_safe_target("/v1/completions?x=%0A"));
    }

    /// A well-formed response of `body`, framed as chosen, split for chunked.
    fn frame(status: u16, body: &[u8], chunked: Option<Vec<usize>>) -> Vec<u8> {
        let mut out = format!("HTTP/1.1 {status} X\r\n").into_bytes();
        match chunked {
            Some(cuts) => {
                out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
                let mut rest = body;
                for c in cuts {
                    let n = c.min(rest.len());
                    if n == 0 {
                        continue;
                    }
                    out.extend_from_slice(format!("{n:x}\r\n").as_bytes());
                    out.extend_from_slice(&rest[..n]);
                    out.extend_from_slice(b"\r\n");
                    rest = &rest[n..];
                }
                if !rest.is_empty() {
                    out.extend_from_slice(format!("{:X};ext=1\r\n", rest.len()).as_bytes());
                    out.extend_from_slice(rest);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"0\r\n\r\n");
            }
            None => {
                out.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
                out.extend_from_slice(body);
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Issue 9, item 2: no byte sequence panics the parser, and what it
        /// accepts stays within the body cap.
        #[test]
        fn issue9_prober_panic_parse_response_never_panics(
            buf in proptest::collection::vec(any::<u8>(), 0..2048),
            eof in any::<bool>(),
        ) {
            if let Some(Ok(r)) = parse_response(&buf, eof) {
                prop_assert!(r.body.len() <= MAX_BODY);
            }
            if eof {
                prop_assert!(parse_response(&buf, eof).is_some(), "eof always decides");
            }
            let _ = dechunk(&buf);
        }

        /// HTTP-shaped input (a valid head, then hostile chunk framing with
        /// sizes up to 20 hex digits) never panics either.
        #[test]
        fn issue9_prober_panic_hostile_chunks_never_panic(
            sizes in proptest::collection::vec("[0-9a-fA-F]{1,20}(;[a-z=]{0,5})?", 1..6),
            data in proptest::collection::vec(any::<u8>(), 0..64),
            crlf in any::<bool>(),
            eof in any::<bool>(),
        ) {
            let mut buf = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            for s in &sizes {
                buf.extend_from_slice(s.as_bytes());
                buf.extend_from_slice(b"\r\n");
                buf.extend_from_slice(&data);
                if crlf {
                    buf.extend_from_slice(b"\r\n");
                }
            }
            if let Some(Ok(r)) = parse_response(&buf, eof) {
                prop_assert!(r.body.len() <= MAX_BODY);
            }
        }

        /// A well-formed response round-trips, whole or fed in pieces, and no
        /// prefix of it is mistaken for a different complete response.
        #[test]
        fn well_formed_responses_round_trip(
            status in 100u16..600,
            body in proptest::collection::vec(any::<u8>(), 0..300),
            cuts in proptest::option::of(proptest::collection::vec(1usize..80, 0..6)),
            split in any::<proptest::sample::Index>(),
        ) {
            let chunked = cuts.is_some();
            let wire = frame(status, &body, cuts);
            let want_body = if !chunked && (status == 204 || status == 304 || status < 200) {
                Vec::new()
            } else {
                body.clone()
            };
            let r = ok(&wire, false);
            prop_assert_eq!((r.status, &r.body), (status, &want_body));
            let at = split.index(wire.len());
            match parse_response(&wire[..at], false) {
                None => {}
                Some(Ok(r)) => prop_assert_eq!((r.status, &r.body), (status, &want_body)),
                Some(Err(e)) => prop_assert!(false, "a prefix of a valid response is an error: {e}"),
            }
        }
    }

    /// The whole client against a server that writes `bytes` and then closes
    /// or keeps the connection open: the request ends within its timeout.
    async fn against(
        bytes: Vec<u8>,
        close: bool,
        timeout: Duration,
    ) -> Result<Response, RequestError> {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut req = [0u8; 1024];
            let _ = s.read(&mut req).await;
            let _ = s.write_all(&bytes).await;
            if close {
                drop(s);
            } else {
                std::future::pending::<()>().await;
            }
        });
        let t = std::time::Instant::now();
        let r = request(addr, "GET", "/health", None, timeout).await;
        assert!(
            t.elapsed() < timeout + Duration::from_secs(1),
            "took {:?}",
            t.elapsed()
        );
        server.abort();
        r
    }

    #[tokio::test]
    async fn issue9_prober_panic_client_survives_hostile_servers() {
        let t = Duration::from_millis(300);
        let huge_chunk =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nabc"
                .to_vec();
        for close in [true, false] {
            let r = against(huge_chunk.clone(), close, t).await;
            assert!(
                matches!(
                    &r,
                    Err(RequestError::Response {
                        error: ResponseError::BodyTooLarge,
                        ..
                    })
                ),
                "{r:?}"
            );
        }
        // Endless headers and an endless body are cut off at their caps, not read into memory.
        let mut endless_head = b"HTTP/1.1 200 OK\r\n".to_vec();
        endless_head.resize(MAX_HEAD * 2, b'a');
        let r = against(endless_head, false, Duration::from_secs(5)).await;
        assert!(
            matches!(
                &r,
                Err(RequestError::Response {
                    error: ResponseError::HeadTooLarge,
                    ..
                })
            ),
            "{r:?}"
        );
        let mut endless_body = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
        endless_body.resize(MAX_BODY + 100, b'x');
        let r = against(endless_body, false, Duration::from_secs(5)).await;
        assert!(
            matches!(
                &r,
                Err(RequestError::Response {
                    error: ResponseError::BodyTooLarge,
                    ..
                })
            ),
            "{r:?}"
        );
        // Silence is a timeout; a valid answer is an answer.
        assert!(matches!(
            against(Vec::new(), false, t).await,
            Err(RequestError::Timeout { .. })
        ));
        let r = against(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
            false,
            t,
        )
        .await;
        assert_eq!(
            r.unwrap(),
            Response {
                status: 200,
                body: b"ok".to_vec()
            }
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

        /// Issue 9, item 2, end to end: arbitrary bytes from a real TCP peer
        /// (then close, or hang) give `Ok` or `Err` within the timeout.
        #[test]
        fn issue9_prober_panic_client_never_panics_on_arbitrary_bytes(
            bytes in proptest::collection::vec(any::<u8>(), 0..512),
            prefix in any::<bool>(),
            close in any::<bool>(),
        ) {
            let mut wire = if prefix { b"HTTP/1.1 200 OK\r\n".to_vec() } else { Vec::new() };
            wire.extend_from_slice(&bytes);
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let _ = rt.block_on(against(wire, close, Duration::from_millis(100)));
        }
    }
}
