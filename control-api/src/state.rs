//! The shared application state every handler receives.

use std::sync::Arc;

use sqlx::PgPool;

use crate::{
    auth::Authenticator,
    config::{ControlApiConfig, DefaultsConfig},
    events::EventPublisher,
    litellm::LitellmClient,
    metrics::Metrics,
    standing::{Clock, LimiterRedis},
};

#[derive(Clone)]
pub struct AppState {
    pub db: PgPool,
    pub auth: Arc<Authenticator>,
    pub events: EventPublisher,
    pub metrics: Arc<Metrics>,
    pub litellm: Arc<LitellmClient>,
    /// Limits for new users and keys created without any.
    pub defaults: Arc<DefaultsConfig>,
    /// The limiter's Redis, read for budget standings and told of adjustments.
    pub limiter_redis: Arc<LimiterRedis>,
    /// The clock budget periods are read by (offset in tests).
    pub clock: Arc<Clock>,
}

impl AppState {
    pub fn new(config: &ControlApiConfig, db: PgPool) -> anyhow::Result<Self> {
        Ok(Self {
            auth: Arc::new(Authenticator::new(config, db.clone())?),
            events: EventPublisher::new(&config.redis_url)?,
            metrics: Arc::new(Metrics::new()?),
            litellm: Arc::new(LitellmClient::new(&config.litellm)?),
            defaults: Arc::new(config.defaults.clone()),
            limiter_redis: Arc::new(LimiterRedis::new(&config.redis_url)),
            clock: Arc::default(),
            db,
        })
    }
}
