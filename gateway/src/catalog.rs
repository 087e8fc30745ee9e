//! The model catalogue as the gateway needs it: enabled flag and prices, by model id. Loaded
//! whole at start, refreshed on a timer, and reloaded per model on invalidation.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use bytes::Bytes;
use rust_decimal::Decimal;
use serde_json::json;
use sqlx::{FromRow, PgPool};
use tollgate_core::sync::{read, write};

use crate::auth::AuthContext;

#[derive(Debug, Clone, FromRow)]
pub struct ModelInfo {
    pub id: String,
    pub upstream_model: String,
    pub enabled: bool,
    pub available: bool,
    pub input_cost_per_token: Decimal,
    pub output_cost_per_token: Decimal,
    /// Tokens of context (prompt and completion), when known.
    pub context_length: Option<i32>,
}

impl ModelInfo {
    pub fn usable(&self) -> bool {
        self.enabled && self.available
    }

    /// Tokens of context, when known and sensible.
    pub fn context_tokens(&self) -> Option<u64> {
        self.context_length.and_then(|c| u64::try_from(c).ok()).filter(|c| *c > 0)
    }

    /// The name the upstream knows the model by.
    pub fn upstream_name(&self) -> &str {
        if self.upstream_model.is_empty() {
            &self.id
        } else {
            &self.upstream_model
        }
    }

    pub fn cost(&self, prompt_tokens: u64, completion_tokens: u64) -> Decimal {
        self.input_cost_per_token * Decimal::from(prompt_tokens)
            + self.output_cost_per_token * Decimal::from(completion_tokens)
    }
}

const COLUMNS: &str =
    "id, upstream_model, enabled, available, input_cost_per_token, output_cost_per_token, context_length";

#[derive(Default)]
pub struct ModelCatalog {
    models: RwLock<HashMap<String, Arc<ModelInfo>>>,
}

impl ModelCatalog {
    pub fn get(&self, id: &str) -> Option<Arc<ModelInfo>> {
        read(&self.models).get(id).cloned()
    }

    pub async fn reload_all(&self, db: &PgPool) -> Result<usize, sqlx::Error> {
        let rows: Vec<ModelInfo> = sqlx::query_as(&format!("SELECT {COLUMNS} FROM models")).fetch_all(db).await?;
        let map: HashMap<String, Arc<ModelInfo>> = rows.into_iter().map(|m| (m.id.clone(), Arc::new(m))).collect();
        let n = map.len();
        *write(&self.models) = map;
        Ok(n)
    }

    pub async fn reload_one(&self, db: &PgPool, id: &str) -> Result<(), sqlx::Error> {
        let row: Option<ModelInfo> =
            sqlx::query_as(&format!("SELECT {COLUMNS} FROM models WHERE id = $1")).bind(id).fetch_optional(db).await?;
        let mut models = write(&self.models);
        match row {
            Some(m) => models.insert(id.to_string(), Arc::new(m)),
            None => models.remove(id),
        };
        Ok(())
    }

    /// `GET /v1/models`, answered by the gateway: the usable models this caller may call.
    pub fn list_for(&self, caller: &AuthContext) -> Bytes {
        let data: Vec<_> = caller
            .usable_models()
            .filter(|m| self.get(m).is_some_and(|info| info.usable()))
            .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "tollgate"}))
            .collect();
        Bytes::from(json!({"object": "list", "data": data}).to_string())
    }
}
