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
    /// The most this request can use: what is reserved, and what is billed when the upstream
    /// did the work but its usage never reached the gateway.
    pub ceiling: Usage,
    /// `None` when no scope of the request has limits (or before limits are reserved).
    pub reservation: Option<Reservation>,
}

/// Judges a whole body sent by `caller` to `endpoint`: the admitted request and the body to send
/// upstream.
pub fn admit(
    state: &GatewayState,
    caller: &Arc<AuthContext>,
    endpoint: &str,
    body: Bytes,
) -> Result<(Admitted, Bytes), GatewayError> {
    let facts = request::parse(&body)?;
    let model = state
        .catalog
        .get(&facts.model)
        .filter(|m| m.usable())
        .ok_or_else(|| GatewayError::ModelNotAllowed(facts.model.clone()))?;
    let subscription = caller.entitlement(&facts.model)?.clone();
    let out = request::upstream_body(body, &facts);
    let ceiling = ceiling(&facts, endpoint, state.config.default_max_tokens);
    Ok((Admitted { auth: caller.clone(), model, subscription, facts, ceiling, reservation: None }, out))
}

/// The most a request to `endpoint` can use: its prompt estimate plus its completion allowance.
pub fn ceiling(facts: &RequestFacts, endpoint: &str, default_max_tokens: u64) -> Usage {
    let completion = if endpoint.ends_with("/embeddings") { 0 } else { facts.max_tokens.unwrap_or(default_max_tokens) };
    Usage { prompt_tokens: facts.estimated_prompt_tokens, completion_tokens: completion }
}
