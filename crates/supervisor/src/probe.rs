//! Readiness and health probes: a deliberately small HTTP/1.1 client
//! (one request per connection, `Connection: close`) over a tokio `TcpStream`,
//! enough for `GET /health` and one tiny completion against an engine on loopback.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use citadel_config::{EngineKind, Model, ReadyCheck};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response body read from an engine (health and 1-token completions are tiny).
const MAX_RESPONSE: usize = 1024 * 1024;

/// The result of one probe; `Err` carries a short reason for logs and STATUS=.
pub type ProbeResult = Result<(), String>;

/// An HTTP response: status code and (de-chunked) body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Sends one request and reads the whole response, all within `timeout`.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<Response, String> {
    match tokio::time::timeout(timeout, request_inner(addr, method, path, body)).await {
        Ok(r) => r,
        Err(_) => Err(format!("{method} {path}: no answer within {timeout:?}")),
    }
}

async fn request_inner(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<Response, String> {
    let what = |e: std::io::Error| format!("{method} {path}: {e}");
    let mut stream = TcpStream::connect(addr).await.map_err(what)?;
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
    stream.write_all(req.as_bytes()).await.map_err(what)?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    // Read until the headers and the announced body are in, or the peer closes.
    loop {
        let n = stream.read(&mut chunk).await.map_err(what)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_RESPONSE {
            return Err(format!(
                "{method} {path}: response larger than {MAX_RESPONSE} bytes"
            ));
        }
        if let Some(resp) = parse_response(&buf, false) {
            return resp.map_err(|e| format!("{method} {path}: {e}"));
        }
    }
    match parse_response(&buf, true) {
        Some(r) => r.map_err(|e| format!("{method} {path}: {e}")),
        None => Err(format!(
            "{method} {path}: connection closed without a response"
        )),
    }
}

/// Parses a complete response from `buf`; `None` while more bytes are needed
/// (`eof` says the peer closed, so a body without a length ends here).
fn parse_response(buf: &[u8], eof: bool) -> Option<Result<Response, String>> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..head_end]);
    let rest = &buf[head_end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = match status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
    {
        Some(s) if status_line.starts_with("HTTP/1.") => s,
        _ => return Some(Err(format!("not an HTTP response: `{status_line}`"))),
    };
    let mut length = None;
    let mut chunked = false;
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            let (k, v) = (k.trim(), v.trim());
            if k.eq_ignore_ascii_case("content-length") {
                length = v.parse::<usize>().ok();
            } else if k.eq_ignore_ascii_case("transfer-encoding")
                && v.to_ascii_lowercase().contains("chunked")
            {
                chunked = true;
            }
        }
    }
    if chunked {
        return match dechunk(rest) {
            Some(body) => Some(Ok(Response { status, body })),
            None if eof => Some(Err("truncated chunked body".into())),
            None => None,
        };
    }
    match length {
        Some(n) if rest.len() >= n => Some(Ok(Response {
            status,
            body: rest[..n].to_vec(),
        })),
        Some(_) if eof => Some(Err("truncated body".into())),
        Some(_) => None,
        None if eof || status == 204 || status == 304 => Some(Ok(Response {
            status,
            body: rest.to_vec(),
        })),
        None => None,
    }
}

/// Decodes a complete chunked body; `None` until the last chunk is in.
fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        if data.len() < size + 2 {
            return None;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
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
        .await?;
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
        .await?;
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
        .await?;
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

    #[test]
    fn parses_length_chunked_and_eof_bodies() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", false)
            .unwrap()
            .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"ok"[..]));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nok", false).is_none());
        let r = parse_response(
            b"HTTP/1.1 503 X\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=1\r\nde\r\n0\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (503, &b"abcde"[..]));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n\r\npartial", false).is_none());
        let r = parse_response(b"HTTP/1.0 200 OK\r\n\r\nall", true)
            .unwrap()
            .unwrap();
        assert_eq!(r.body, b"all");
        assert!(parse_response(b"SSH-2.0\r\n\r\n", true).unwrap().is_err());
    }
}
