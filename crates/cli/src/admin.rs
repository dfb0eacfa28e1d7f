//! A client of the gateway's admin channel (issue 15): HTTP/1.1 with JSON
//! over the root-only Unix socket `/run/citadel-gateway-admin.sock`
//! (`citadel-gateway-admin.socket`). It lists each model's backends with their
//! health, drain flag and requests in flight, drains and admits a backend, and
//! adds or removes a temporary one. The protocol is the gateway's
//! (`crates/gateway/README.md`, "Admin channel").

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};
use serde::Deserialize;

/// Where systemd binds the admin socket (`citadel-gateway-admin.socket`).
pub const SOCKET_PATH: &str = citadel_config::unit_names::ADMIN_SOCKET_PATH;

/// How long one admin exchange may take, connect to last body byte.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Largest answer read (a list of backends).
const MAX_BODY: usize = 4 * 1024 * 1024;

/// One backend of a model, as the gateway sees it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Backend {
    pub url: String,
    /// `ready`, `loading`, `down` or `ejected`.
    pub health: String,
    #[serde(default)]
    pub drained: bool,
    /// Requests and streams not yet finished on this backend.
    #[serde(default)]
    pub in_flight: u64,
    /// Added through `/admin/add` (a surge instance), not from the config.
    #[serde(default)]
    pub temporary: bool,
}

impl Backend {
    /// Whether the gateway routes new requests to it.
    pub fn serves(&self) -> bool {
        self.health == "ready" && !self.drained
    }

    /// `ready`, `ready, drained`, `down, drained`, ...
    pub fn describe(&self) -> String {
        if self.drained {
            format!("{}, drained", self.health)
        } else {
            self.health.clone()
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct ModelBackends {
    pub model: String,
    pub backends: Vec<Backend>,
}

#[derive(Debug, Deserialize)]
struct BackendsAnswer {
    models: Vec<ModelBackends>,
}

/// Why an admin exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot connect to the gateway's admin socket {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the gateway's admin socket gave no complete answer within {0:?}")]
    Timeout(Duration),
    #[error("bad HTTP answer on the gateway's admin socket: {0}")]
    Http(#[from] hyper::Error),
    #[error("the gateway's admin answer is larger than {0} bytes")]
    TooLarge(usize),
    #[error("the gateway answered {status} to {what}: {message}")]
    Status {
        status: u16,
        what: String,
        message: String,
    },
    #[error("the gateway's answer to {what} is not what was expected: {detail}")]
    Shape { what: String, detail: String },
}

/// The admin channel of the running gateway.
pub struct Admin {
    path: PathBuf,
}

impl Admin {
    /// The admin channel of the host's gateway. With `--root` other than `/`
    /// there is no host gateway to talk to: refused.
    pub fn for_root(root: &Path) -> Result<Admin> {
        if root != Path::new("/") {
            bail!(
                "--root {} is not this host's running stack: a rolling or surge restart talks to \
                 the host's systemd and gateway, so it runs only without --root",
                root.display()
            );
        }
        Ok(Admin::at(Path::new(SOCKET_PATH)))
    }

    pub fn at(path: &Path) -> Admin {
        Admin {
            path: path.to_owned(),
        }
    }

    /// `GET /admin/backends`: every model's backends.
    pub async fn backends(&self) -> Result<Vec<ModelBackends>, AdminError> {
        let body = self.exchange("GET", "/admin/backends", None).await?;
        let answer: BackendsAnswer = parse(&body, "GET /admin/backends")?;
        Ok(answer.models)
    }

    /// The backend at `url` (`None` when the gateway has none there).
    pub async fn backend(&self, url: &str) -> Result<Option<Backend>, AdminError> {
        Ok(self
            .backends()
            .await?
            .into_iter()
            .flat_map(|m| m.backends)
            .find(|b| b.url == url))
    }

    /// `POST /admin/drain`: no new request goes to `url`.
    pub async fn drain(&self, url: &str) -> Result<Backend, AdminError> {
        self.post_backend("/admin/drain", serde_json::json!({ "url": url }))
            .await
    }

    /// `POST /admin/admit`: clears the drain and probes `url` at once.
    pub async fn admit(&self, url: &str) -> Result<Backend, AdminError> {
        self.post_backend("/admin/admit", serde_json::json!({ "url": url }))
            .await
    }

    /// `POST /admin/add`: a temporary backend of `model`.
    pub async fn add(&self, model: &str, url: &str) -> Result<Backend, AdminError> {
        self.post_backend(
            "/admin/add",
            serde_json::json!({ "model": model, "url": url }),
        )
        .await
    }

    /// `POST /admin/remove`: removes a temporary backend.
    pub async fn remove(&self, url: &str) -> Result<(), AdminError> {
        let what = "POST /admin/remove";
        self.exchange(
            "POST",
            "/admin/remove",
            Some(serde_json::json!({ "url": url }).to_string()),
        )
        .await
        .map(|_| ())
        .map_err(|e| with_what(e, what))
    }

    async fn post_backend(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> Result<Backend, AdminError> {
        let what = format!("POST {path}");
        let text = self.exchange("POST", path, Some(body.to_string())).await?;
        parse(&text, &what)
    }

    /// One request on a fresh connection: the body of a 2xx answer, else
    /// [`AdminError::Status`] with the gateway's error message.
    async fn exchange(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
    ) -> Result<String, AdminError> {
        use http_body_util::Full;

        let what = format!("{method} {path}");
        let request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::CONNECTION, "close")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(bytes::Bytes::from(body.unwrap_or_default())))
            .map_err(|e| AdminError::Shape {
                what: what.clone(),
                detail: e.to_string(),
            })?;
        let exchange = async {
            let stream = tokio::net::UnixStream::connect(&self.path)
                .await
                .map_err(|source| AdminError::Connect {
                    path: self.path.clone(),
                    source,
                })?;
            crate::observe::exchange(stream, request, MAX_BODY)
                .await
                .map_err(|e| match e {
                    crate::observe::Exchange::Http(e) => AdminError::Http(e),
                    crate::observe::Exchange::TooLarge(n) => AdminError::TooLarge(n),
                })
        };
        let (status, text) = tokio::time::timeout(TIMEOUT, exchange)
            .await
            .map_err(|_| AdminError::Timeout(TIMEOUT))??;
        if !(200..300).contains(&status) {
            return Err(AdminError::Status {
                status,
                what,
                message: error_message(&text),
            });
        }
        Ok(text)
    }
}

fn with_what(e: AdminError, what: &str) -> AdminError {
    match e {
        AdminError::Status {
            status, message, ..
        } => AdminError::Status {
            status,
            what: what.to_owned(),
            message,
        },
        other => other,
    }
}

fn parse<T: serde::de::DeserializeOwned>(text: &str, what: &str) -> Result<T, AdminError> {
    serde_json::from_str(text).map_err(|e| AdminError::Shape {
        what: what.to_owned(),
        detail: e.to_string(),
    })
}

/// The message of the gateway's JSON error (`{"error":{"message":...}}`, or a
/// top-level `message`/`error` string), else the answer's text, shortened.
fn error_message(text: &str) -> String {
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(text) {
        let found = [&v["error"]["message"], &v["message"], &v["error"]]
            .into_iter()
            .find_map(|m| m.as_str().map(str::to_owned));
        if let Some(m) = found {
            return m;
        }
    }
    let t = text.trim();
    if t.is_empty() {
        return "(no message)".into();
    }
    t.chars().take(300).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// A one-connection admin server: returns the request it read, answers `response`.
    async fn serve_once(
        dir: &Path,
        response: &'static str,
    ) -> (PathBuf, tokio::task::JoinHandle<String>) {
        let path = dir.join("admin.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let mut got = Vec::new();
            // Headers, then the body by Content-Length.
            loop {
                let n = s.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&got).into_owned();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap())
                        })
                        .unwrap_or(0);
                    if body.len() >= len {
                        break;
                    }
                }
                if n == 0 {
                    break;
                }
            }
            s.write_all(response.as_bytes()).await.unwrap();
            s.shutdown().await.unwrap();
            String::from_utf8_lossy(&got).into_owned()
        });
        (path, task)
    }

    #[test]
    fn issue15_admin_client_reads_backends_and_posts_json() {
        runtime().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let body = r#"{"models":[{"model":"phi3","backends":[{"url":"http://127.0.0.1:11403","health":"ready","drained":false,"in_flight":2,"temporary":false}]}]}"#;
            let answer: &'static str = Box::leak(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .into_boxed_str(),
            );
            let (path, task) = serve_once(dir.path(), answer).await;
            let models = Admin::at(&path).backends().await.unwrap();
            assert_eq!(models[0].model, "phi3");
            assert_eq!(models[0].backends[0].in_flight, 2);
            assert!(models[0].backends[0].serves());
            let request = task.await.unwrap();
            assert!(request.starts_with("GET /admin/backends HTTP/1.1\r\n"), "{request}");
            std::fs::remove_file(&path).unwrap();

            let one = r#"{"url":"http://127.0.0.1:11403","health":"ready","drained":true,"in_flight":0,"temporary":false}"#;
            let answer: &'static str = Box::leak(
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{one}", one.len())
                    .into_boxed_str(),
            );
            let (path, task) = serve_once(dir.path(), answer).await;
            let b = Admin::at(&path).drain("http://127.0.0.1:11403").await.unwrap();
            assert!(b.drained && !b.serves());
            let request = task.await.unwrap();
            assert!(request.starts_with("POST /admin/drain HTTP/1.1\r\n"), "{request}");
            assert!(
                request.ends_with(r#"{"url":"http://127.0.0.1:11403"}"#),
                "{request}"
            );
        });
    }

    #[test]
    fn issue15_admin_client_reports_the_gateways_error_and_a_missing_socket() {
        runtime().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let err = r#"{"error":{"message":"no backend http://x","type":"not_found"}}"#;
            let answer: &'static str = Box::leak(
                format!(
                    "HTTP/1.1 404 Not Found\r\nContent-Length: {}\r\n\r\n{err}",
                    err.len()
                )
                .into_boxed_str(),
            );
            let (path, _task) = serve_once(dir.path(), answer).await;
            let e = Admin::at(&path).admit("http://x").await.unwrap_err();
            let text = e.to_string();
            assert!(
                text.contains("404")
                    && text.contains("POST /admin/admit")
                    && text.contains("no backend http://x"),
                "{text}"
            );
            let e = Admin::at(&dir.path().join("none.sock"))
                .backends()
                .await
                .unwrap_err();
            assert!(matches!(e, AdminError::Connect { .. }), "{e}");
        });
    }

    #[test]
    fn issue15_admin_refuses_another_root() {
        assert!(Admin::for_root(Path::new("/")).is_ok());
        let e = Admin::for_root(Path::new("/tmp/r")).err().unwrap();
        assert!(e.to_string().contains("only without --root"), "{e}");
    }
}
