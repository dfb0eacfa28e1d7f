//! The gateway's one error type, rendered in OpenAI's JSON error shape.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::body::GwBody;

/// Everything the gateway itself can answer with instead of a backend response.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("The model `{0}` does not exist")]
    UnknownModel(String),
    #[error("The model `{model}` is not ready ({state}); retry later")]
    NotReady {
        model: String,
        state: &'static str,
        retry_after: u64,
    },
    #[error("We could not parse the JSON body of your request: {0}")]
    BadJson(String),
    #[error("You must provide a model parameter")]
    MissingModel,
    #[error("Request body too large: the limit is {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("Missing API key: send `Authorization: Bearer KEY`")]
    MissingKey,
    #[error("Incorrect API key provided")]
    BadKey,
    #[error("Rate limit reached for this API key; retry after {retry_after}s")]
    RateLimited { retry_after: u64 },
    #[error(
        "Too many requests with an invalid API key from your address; retry after {retry_after}s"
    )]
    AuthThrottled { retry_after: u64 },
    #[error("Loop detected: this request already passed through this gateway ({hops} Citadel hops); check the model's replicas")]
    LoopDetected { hops: usize },
    #[error("Unknown request URL: {method} {path}")]
    NotFound { method: String, path: String },
    #[error("Timed out reading the request body")]
    BodyTimeout,
    #[error("The request body could not be read")]
    BodyRead,
    #[error("The model `{0}` did not answer in time")]
    UpstreamTimeout(String),
    #[error("The model `{0}` could not be reached")]
    UpstreamFailed(String),
    #[error("The gateway is shutting down")]
    Draining,
}

impl GatewayError {
    pub fn status(&self) -> StatusCode {
        use GatewayError::*;
        match self {
            UnknownModel(_) | NotFound { .. } => StatusCode::NOT_FOUND,
            NotReady { .. } | Draining => StatusCode::SERVICE_UNAVAILABLE,
            BadJson(_) | MissingModel | BodyRead => StatusCode::BAD_REQUEST,
            BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            MissingKey | BadKey => StatusCode::UNAUTHORIZED,
            RateLimited { .. } | AuthThrottled { .. } => StatusCode::TOO_MANY_REQUESTS,
            LoopDetected { .. } => StatusCode::LOOP_DETECTED,
            BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            UpstreamFailed(_) => StatusCode::BAD_GATEWAY,
        }
    }

    /// OpenAI's `type` field.
    fn kind(&self) -> &'static str {
        use GatewayError::*;
        match self {
            UnknownModel(_)
            | BadJson(_)
            | MissingModel
            | BodyTooLarge { .. }
            | NotFound { .. }
            | BodyTimeout
            | BodyRead => "invalid_request_error",
            MissingKey | BadKey => "invalid_request_error",
            RateLimited { .. } | AuthThrottled { .. } => "rate_limit_error",
            NotReady { .. }
            | Draining
            | UpstreamTimeout(_)
            | UpstreamFailed(_)
            | LoopDetected { .. } => "server_error",
        }
    }

    /// OpenAI's `code` field.
    pub fn code_str(&self) -> &'static str {
        use GatewayError::*;
        match self {
            UnknownModel(_) => "model_not_found",
            NotReady { .. } => "model_not_ready",
            BadJson(_) => "invalid_json",
            MissingModel => "missing_model",
            BodyTooLarge { .. } => "request_too_large",
            MissingKey => "missing_api_key",
            BadKey => "invalid_api_key",
            RateLimited { .. } => "rate_limit_exceeded",
            AuthThrottled { .. } => "too_many_invalid_keys",
            LoopDetected { .. } => "loop_detected",
            NotFound { .. } => "unknown_url",
            BodyTimeout => "request_timeout",
            BodyRead => "invalid_body",
            UpstreamTimeout(_) => "upstream_timeout",
            UpstreamFailed(_) => "upstream_unavailable",
            Draining => "shutting_down",
        }
    }

    fn param(&self) -> Option<&'static str> {
        match self {
            GatewayError::UnknownModel(_) | GatewayError::MissingModel => Some("model"),
            _ => None,
        }
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            GatewayError::NotReady { retry_after, .. }
            | GatewayError::RateLimited { retry_after }
            | GatewayError::AuthThrottled { retry_after } => Some(*retry_after),
            GatewayError::Draining => Some(1),
            _ => None,
        }
    }

    /// `{"error":{"message","type","param","code"}}` with the right status.
    pub fn to_response(&self) -> Response<GwBody> {
        let body = serde_json::json!({
            "error": {
                "message": self.to_string(),
                "type": self.kind(),
                "param": self.param(),
                "code": self.code_str(),
            }
        });
        let mut resp = Response::new(GwBody::full(Bytes::from(body.to_string())));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(secs) = self.retry_after() {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if matches!(self, GatewayError::MissingKey | GatewayError::BadKey) {
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"citadel\""),
            );
        }
        resp
    }
}

/// Errors that stop the gateway from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration cannot work (exit status 78, EX_CONFIG).
    #[error("{0}")]
    Config(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl StartError {
    /// `EX_CONFIG`: systemd's RestartPreventExitStatus=78 stops restart loops.
    pub const EXIT_CONFIG: i32 = 78;

    pub fn exit_code(&self) -> i32 {
        match self {
            StartError::Config(_) => Self::EXIT_CONFIG,
            StartError::Io { .. } => 1,
        }
    }
}
