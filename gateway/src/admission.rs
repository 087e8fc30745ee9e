//! Step 3 of a request: judging its whole body. The body is parsed once ([`request::parse`]),
//! the model must be known and usable, and the key, its team and the user's active subscriptions
//! must all allow it; what comes out is an [`Admitted`] request and the body the upstream gets.

use std::sync::Arc;

use bytes::Bytes;
use tollgate_core::limiter::Reservation;

use crate::{
    auth::{ActiveSubscription, AuthContext},
    catalog::ModelInfo,
    error::GatewayError,
    meter::Usage,
    request::{self, RequestFacts},
    state::GatewayState,
};

/// A request the gateway has authorized: who calls, which model, under which subscription, and
/// what the body asks for. What the limiter holds for it is settled or released when it ends.
#[derive(Debug)]
pub struct Admitted {
    pub auth: Arc<AuthContext>,
    pub model: Arc<ModelInfo>,
    pub subscription: ActiveSubscription,
    pub facts: RequestFacts,
    /// The most this request can use: what its budgets reserve, and what is billed when the
    /// upstream did the work but its usage never reached the gateway.
    pub ceiling: Usage,
    /// What it counts against TPM while in flight.
    pub allowance: Usage,
    /// `None` when no scope of the request has limits (or before limits are reserved).
    pub reservation: Option<Reservation>,
}

/// Judges a whole body sent by `caller` to `endpoint`: the admitted request and, when the upstream
/// must get another body than the client's, that body.
pub fn admit(
    state: &GatewayState,
    caller: &Arc<AuthContext>,
    endpoint: &str,
    body: &[u8],
) -> Result<(Admitted, Option<Bytes>), GatewayError> {
    let (facts, layout) = request::parse(body, &state.body_policy)?;
    let model = state.catalog.get(&facts.model).ok_or_else(|| GatewayError::ModelNotFound(facts.model.clone()))?;
    if !model.usable() {
        return Err(GatewayError::ModelNotAllowed(facts.model.clone()));
    }
    let subscription = caller.entitlement(&facts.model)?.clone();
    let out = request::upstream_body(body, &facts, &layout, model.upstream_name());
    let default_max_tokens = state.config.default_max_tokens;
    let ceiling = ceiling(&facts, endpoint, model.context_tokens(), default_max_tokens);
    let allowance = allowance(&facts, endpoint, default_max_tokens);
    Ok((Admitted { auth: caller.clone(), model, subscription, facts, ceiling, allowance, reservation: None }, out))
}

/// The most a request to `endpoint` can cost: its prompt estimate plus, for each choice, its
/// `max_tokens`, or else what the model's context leaves after the prompt, or else
/// `default_max_tokens` (a model whose context length is unknown cannot be bounded better).
pub fn ceiling(facts: &RequestFacts, endpoint: &str, context_length: Option<u64>, default_max_tokens: u64) -> Usage {
    let per_choice = if endpoint.ends_with("/embeddings") {
        0
    } else {
        facts.max_tokens.unwrap_or_else(|| match context_length {
            Some(context) => context.saturating_sub(facts.estimated_prompt_tokens),
            None => default_max_tokens,
        })
    };
    Usage { prompt_tokens: facts.estimated_prompt_tokens, completion_tokens: per_choice.saturating_mul(facts.choices) }
}

/// What a request counts against TPM while in flight: its prompt estimate plus, for each choice,
/// its `max_tokens` or `default_max_tokens` (a whole context per request would make any TPM
/// limit below it refuse every request that names no `max_tokens`).
pub fn allowance(facts: &RequestFacts, endpoint: &str, default_max_tokens: u64) -> Usage {
    let per_choice = if endpoint.ends_with("/embeddings") { 0 } else { facts.max_tokens.unwrap_or(default_max_tokens) };
    Usage { prompt_tokens: facts.estimated_prompt_tokens, completion_tokens: per_choice.saturating_mul(facts.choices) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(max_tokens: Option<u64>, choices: u64) -> RequestFacts {
        RequestFacts {
            model: "m".into(),
            stream: false,
            client_wants_usage: false,
            max_tokens,
            choices,
            estimated_prompt_tokens: 100,
        }
    }

    #[test]
    fn the_ceiling_bounds_every_choice() {
        let chat = "/v1/chat/completions";
        assert_eq!(ceiling(&facts(Some(50), 8), chat, Some(8192), 4096).completion_tokens, 400);
        assert_eq!(ceiling(&facts(None, 2), chat, Some(8192), 4096).completion_tokens, 2 * 8092);
        assert_eq!(ceiling(&facts(None, 3), chat, None, 4096).completion_tokens, 3 * 4096);
        assert_eq!(ceiling(&facts(None, 3), "/v1/embeddings", None, 4096).completion_tokens, 0);
        assert_eq!(allowance(&facts(None, 2), chat, 4096).completion_tokens, 2 * 4096);
        assert_eq!(allowance(&facts(Some(10), 2), chat, 4096).completion_tokens, 20);
    }
}
