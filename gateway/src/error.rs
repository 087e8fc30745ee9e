//! Every answer the gateway gives on its own, in OpenAI's error shape
//! `{"error": {"message", "type", "code"}}`, with its status; rendered in one place.

use bytes::Bytes;
use serde_json::json;

#[derive(Debug, Clone, thiserror::Error)]
pub enum GatewayError {
    #[error("missing API key: send it as `Authorization: Bearer <key>`")]
    MissingKey,
    #[error("invalid API key")]
    InvalidKey,
    #[error("this API key has been revoked")]
    RevokedKey,
    #[error("this API key has expired")]
    ExpiredKey,
    #[error("the account that owns this key is suspended")]
    SuspendedUser,
    #[error("too many failed authentication attempts; retry later")]
    TooManyFailures,
    #[error("the key cannot be checked right now; retry shortly")]
    AuthUnavailable,
    #[error("model `{0}` is not available to this key")]
    ModelNotAllowed(String),
    #[error("the model `{0}` does not exist")]
    ModelNotFound(String),
    #[error("no active subscription for model `{0}`")]
    NoSubscription(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("request body must be JSON (content-type: application/json)")]
    UnsupportedContentType,
    #[error("request body exceeds {0} bytes")]
    TooLarge(usize),
    #[error("unknown path {0}")]
    NotFound(String),
    #[error("{path} accepts only {allow}")]
    MethodNotAllowed { path: String, allow: &'static str },
    #[error("rate limit reached for {reason} on this {scope}; retry after {retry_after}s")]
    RateLimited { scope: &'static str, reason: &'static str, retry_after: u64 },
    #[error("budget exhausted for this {scope}")]
    BudgetExhausted { scope: &'static str, retry_after: u64 },
    #[error("limits cannot be checked right now; retry shortly")]
    LimitsUnavailable,
    #[error("the upstream could not be reached")]
    UpstreamUnreachable,
    #[error("the upstream did not answer in time")]
    UpstreamTimeout,
    #[error("internal error")]
    Internal,
}

impl GatewayError {
    pub fn status(&self) -> u16 {
        use GatewayError::*;
        match self {
            MissingKey | InvalidKey | RevokedKey | ExpiredKey => 401,
            SuspendedUser | ModelNotAllowed(_) | NoSubscription(_) => 403,
            TooManyFailures | RateLimited { .. } | BudgetExhausted { .. } => 429,
            LimitsUnavailable => 503,
            AuthUnavailable => 503,
            InvalidRequest(_) => 400,
            UnsupportedContentType => 400,
            TooLarge(_) => 413,
            NotFound(_) | ModelNotFound(_) => 404,
            MethodNotAllowed { .. } => 405,
            UpstreamUnreachable => 502,
            UpstreamTimeout => 504,
            Internal => 500,
        }
    }

    /// OpenAI's `type` and `code` for this error.
    fn kind(&self) -> (&'static str, &'static str) {
        use GatewayError::*;
        match self {
            MissingKey => ("invalid_request_error", "missing_api_key"),
            InvalidKey => ("invalid_request_error", "invalid_api_key"),
            RevokedKey => ("invalid_request_error", "revoked_api_key"),
            ExpiredKey => ("invalid_request_error", "expired_api_key"),
            SuspendedUser => ("permission_error", "user_suspended"),
            TooManyFailures => ("rate_limit_error", "too_many_auth_failures"),
            RateLimited { .. } => ("rate_limit_error", "rate_limit_exceeded"),
            BudgetExhausted { .. } => ("insufficient_quota", "insufficient_quota"),
            LimitsUnavailable => ("server_error", "limits_unavailable"),
            AuthUnavailable => ("server_error", "auth_unavailable"),
            ModelNotAllowed(_) => ("permission_error", "model_not_allowed"),
            NoSubscription(_) => ("permission_error", "no_active_subscription"),
            InvalidRequest(_) => ("invalid_request_error", "invalid_request"),
            UnsupportedContentType => ("invalid_request_error", "unsupported_content_type"),
            TooLarge(_) => ("invalid_request_error", "request_too_large"),
            NotFound(_) => ("invalid_request_error", "unknown_url"),
            MethodNotAllowed { .. } => ("invalid_request_error", "method_not_allowed"),
            ModelNotFound(_) => ("invalid_request_error", "model_not_found"),
            UpstreamUnreachable => ("server_error", "upstream_unreachable"),
            UpstreamTimeout => ("server_error", "upstream_timeout"),
            Internal => ("server_error", "internal_error"),
        }
    }

    /// Seconds after which a retry may succeed, for `retry-after`.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            GatewayError::RateLimited { retry_after, .. } | GatewayError::BudgetExhausted { retry_after, .. } => {
                Some(*retry_after).filter(|s| *s > 0)
            }
            GatewayError::TooManyFailures => Some(60),
            GatewayError::LimitsUnavailable => Some(1),
            _ => None,
        }
    }

    /// The headers an answer with this error carries besides its body: `retry-after` when a
    /// retry may succeed later, `allow` for a method the path does not take.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut h = Vec::new();
        if let Some(secs) = self.retry_after() {
            h.push(("retry-after", secs.to_string()));
        }
        if let GatewayError::MethodNotAllowed { allow, .. } = self {
            h.push(("allow", (*allow).to_string()));
        }
        h
    }

    /// A short label for metrics and usage rows.
    pub fn label(&self) -> &'static str {
        self.kind().1
    }

    /// What the client is told when pingora fails to proxy with `e`: `None` when the client
    /// went away (nobody to answer).
    pub fn from_proxy_failure(e: &pingora::Error, max_body_bytes: usize) -> Option<Self> {
        use pingora::{ErrorSource, ErrorType::*};
        match e.etype() {
            ConnectTimedout | ConnectRefused | ConnectNoRoute | ConnectError | ConnectProxyFailure
            | TLSHandshakeFailure | InvalidCert => Some(GatewayError::UpstreamUnreachable),
            ReadTimedout | WriteTimedout => Some(GatewayError::UpstreamTimeout),
            HTTPStatus(413) => Some(GatewayError::TooLarge(max_body_bytes)),
            _ => match e.esource() {
                ErrorSource::Upstream => Some(GatewayError::UpstreamUnreachable),
                ErrorSource::Downstream => None,
                _ => Some(GatewayError::Internal),
            },
        }
    }

    /// Whether the upstream failed (rather than the gateway refusing).
    pub fn is_upstream_failure(&self) -> bool {
        matches!(self, GatewayError::UpstreamUnreachable | GatewayError::UpstreamTimeout)
    }

    /// Refusals the limiter already counted in `rejections_total` by their scope.
    pub fn counted_by_limiter(&self) -> bool {
        matches!(self, GatewayError::RateLimited { .. } | GatewayError::BudgetExhausted { .. })
    }

    pub fn body(&self) -> Bytes {
        let (kind, code) = self.kind();
        Bytes::from(json!({"error": {"message": self.to_string(), "type": kind, "code": code}}).to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_shape() {
        let e = GatewayError::ModelNotAllowed("gpt".into());
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["error"]["message"], "model `gpt` is not available to this key");
        assert_eq!(v["error"]["type"], "permission_error");
        assert_eq!(v["error"]["code"], "model_not_allowed");
        assert_eq!(e.status(), 403);
    }
}
