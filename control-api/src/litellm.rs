//! LiteLLM as the model catalogue's source: the client for its `/model/info` and the mapping of
//! that body onto the fields a model row holds. What a sync does with the result is the models
//! route's business.

use std::time::Duration;

use reqwest::Url;
use rust_decimal::{prelude::FromPrimitive, Decimal};
use serde_json::Value;

use crate::{
    config::LitellmConfig,
    error::{ApiError, ApiResult},
};

/// Reads LiteLLM's `/model/info`.
pub struct LitellmClient {
    url: Option<Url>,
    api_key: Option<String>,
    http: reqwest::Client,
}

/// One model as the sync understands it.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamModel {
    pub id: String,
    pub upstream_model: String,
    pub provider: Option<String>,
    pub context_length: Option<i32>,
    /// `None` when LiteLLM knows no price.
    pub input_cost_per_token: Option<Decimal>,
    pub output_cost_per_token: Option<Decimal>,
    pub metadata: Value,
}

impl LitellmClient {
    pub fn new(config: &LitellmConfig) -> anyhow::Result<Self> {
        Ok(Self {
            url: config.url.clone(),
            api_key: config.api_key.clone().filter(|k| !k.is_empty()),
            http: reqwest::Client::builder().timeout(Duration::from_secs(config.timeout_seconds.max(1))).build()?,
        })
    }

    pub async fn model_info(&self) -> ApiResult<Vec<UpstreamModel>> {
        let base = self
            .url
            .as_ref()
            .ok_or_else(|| ApiError::Unavailable("model sync is not configured (TOLLGATE_LITELLM_URL)".into()))?;
        let mut req = self.http.get(format!("{}/model/info", base.as_str().trim_end_matches('/')));
        if let Some(key) = &self.api_key {
            req = req.bearer_auth(key);
        }
        let upstream_err = |e: String| ApiError::BadGateway(format!("LiteLLM /model/info: {e}"));
        let resp = req.send().await.map_err(|e| upstream_err(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(upstream_err(format!("status {}", resp.status())));
        }
        let body: Value = resp.json().await.map_err(|e| upstream_err(e.to_string()))?;
        parse_model_info(&body).map_err(upstream_err)
    }
}

/// Maps a `/model/info` body: model_name -> id, litellm_params.model -> upstream_model,
/// custom_llm_provider (else model_info.litellm_provider, else the model's prefix) -> provider,
/// max_input_tokens (else max_tokens) -> context_length, and the per-token costs.
pub fn parse_model_info(body: &Value) -> Result<Vec<UpstreamModel>, String> {
    let data = body.get("data").and_then(Value::as_array).ok_or("no `data` array")?;
    let mut out: Vec<UpstreamModel> = Vec::with_capacity(data.len());
    for entry in data {
        let Some(id) = entry.get("model_name").and_then(Value::as_str) else { continue };
        if id.is_empty() || id == "*" || id.contains('*') || out.iter().any(|m| m.id == id) {
            continue; // wildcard routes are not models; LiteLLM lists load-balanced duplicates
        }
        let params = entry.get("litellm_params").cloned().unwrap_or(Value::Null);
        let info = entry.get("model_info").cloned().unwrap_or(Value::Null);
        let str_of = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_owned);
        let upstream_model = str_of(&params, "model").unwrap_or_else(|| id.to_string());
        let provider = str_of(&params, "custom_llm_provider")
            .or_else(|| str_of(&info, "litellm_provider"))
            .or_else(|| upstream_model.split_once('/').map(|(p, _)| p.to_string()));
        let context_length = ["max_input_tokens", "max_tokens"]
            .iter()
            .find_map(|k| info.get(*k).and_then(Value::as_i64))
            .and_then(|n| i32::try_from(n).ok())
            .filter(|n| *n > 0);
        let cost =
            |k: &str| info.get(k).and_then(Value::as_f64).and_then(Decimal::from_f64).filter(|d| !d.is_sign_negative());
        let mut metadata = serde_json::Map::new();
        for k in ["mode", "max_output_tokens", "max_tokens"] {
            if let Some(v) = info.get(k).filter(|v| !v.is_null()) {
                metadata.insert(k.to_string(), v.clone());
            }
        }
        out.push(UpstreamModel {
            id: id.to_string(),
            upstream_model,
            provider,
            context_length,
            input_cost_per_token: cost("input_cost_per_token"),
            output_cost_per_token: cost("output_cost_per_token"),
            metadata: Value::Object(metadata),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn parses_the_captured_litellm_model_info() {
        let body: Value = serde_json::from_str(include_str!("../tests/fixtures/litellm/model-info.json")).unwrap();
        let models = parse_model_info(&body).unwrap();
        let ids: Vec<&str> = models.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, ["gpt-4o-mini", "granite-3-8b", "text-embedding-3-small", "claude-sonnet"]);
        let granite = &models[1];
        assert_eq!(granite.upstream_model, "openai/ibm-granite/granite-3.1-8b-instruct");
        assert_eq!(granite.provider.as_deref(), Some("openai"));
        assert_eq!(granite.context_length, Some(131072));
        assert_eq!(granite.input_cost_per_token, Some(Decimal::from_str("0.0000002").unwrap()));
        assert_eq!(granite.output_cost_per_token, Some(Decimal::from_str("0.0000006").unwrap()));
        let mini = &models[0];
        assert_eq!(mini.provider.as_deref(), Some("openai"));
        assert_eq!(mini.context_length, Some(128000));
        assert_eq!(mini.input_cost_per_token, Some(Decimal::from_str("0.00000015").unwrap()));
        let claude = &models[3];
        assert_eq!(claude.provider.as_deref(), Some("anthropic"));
        assert_eq!(claude.input_cost_per_token, None);
        assert_eq!(claude.context_length, None);
        assert_eq!(models[2].metadata["mode"], "embedding");
    }
}
