//! How a request ended, named once: the [`Outcome`] label of `requests_total` and the
//! [`ErrorKind`] recorded in its usage row. Both render to the strings operators query.

/// Why a request did not end as a plain success (the usage row's `error_kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The gateway answered with one of its own errors; `code` is the OpenAI error code.
    Answered { code: &'static str },
    /// The client went away before the answer was complete.
    ClientDisconnected,
    /// The response was cut after it had started.
    Interrupted,
    /// A successful response that reported no usage (billed from an estimate or not at all).
    UsageMissing,
    /// The upstream answered with an error status.
    UpstreamStatus,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Answered { code } => code,
            ErrorKind::ClientDisconnected => "client_disconnected",
            ErrorKind::Interrupted => "interrupted",
            ErrorKind::UsageMissing => "usage_missing",
            ErrorKind::UpstreamStatus => "upstream_status",
        }
    }
}

/// The `outcome` label of `tollgate_gateway_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered by the gateway itself without the upstream (`GET /v1/models`).
    Answered,
    /// Refused by the gateway before the upstream was contacted.
    Rejected,
    /// The upstream was contacted and the exchange broke off.
    Interrupted,
    Success,
    /// The upstream answered with an error status.
    UpstreamError,
}

impl Outcome {
    /// Classifies a finished request from whether it ended in an error, whether the upstream
    /// was contacted, and the status the client got.
    pub fn of(errored: bool, upstream_contacted: bool, status: u16) -> Self {
        let ok = (200..300).contains(&status);
        match (errored, upstream_contacted, ok) {
            (_, false, true) => Outcome::Answered,
            (_, false, false) => Outcome::Rejected,
            (true, true, _) => Outcome::Interrupted,
            (false, true, true) => Outcome::Success,
            (false, true, false) => Outcome::UpstreamError,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Answered => "answered",
            Outcome::Rejected => "rejected",
            Outcome::Interrupted => "interrupted",
            Outcome::Success => "success",
            Outcome::UpstreamError => "upstream_error",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes() {
        assert_eq!(Outcome::of(false, false, 200), Outcome::Answered);
        assert_eq!(Outcome::of(false, false, 429), Outcome::Rejected);
        assert_eq!(Outcome::of(true, false, 401), Outcome::Rejected);
        assert_eq!(Outcome::of(true, true, 200), Outcome::Interrupted);
        assert_eq!(Outcome::of(false, true, 200), Outcome::Success);
        assert_eq!(Outcome::of(false, true, 500), Outcome::UpstreamError);
        assert_eq!(ErrorKind::Answered { code: "invalid_api_key" }.as_str(), "invalid_api_key");
    }
}
