//! tollgate-control-api: the admin REST API (axum + PostgreSQL) that manages users, teams,
//! models, subscriptions and keys, reports usage and keeps the audit trail. Every write that
//! changes what the gateway enforces is announced on Redis after its commit.

pub mod alerts;
pub mod audit;
pub mod auth;
pub mod authz;
pub mod config;
pub mod csv;
pub mod error;
pub mod events;
pub mod extract;
pub mod litellm;
pub mod metrics;
pub mod model_sync;
pub mod openapi;
pub mod pagination;
pub mod routes;
pub mod standing;
pub mod state;
pub mod validate;
pub mod webhooks;
pub mod write;

use std::{future::Future, net::SocketAddr, time::Duration};

use axum::{http::StatusCode, middleware, routing::get, Router};
use sqlx::{postgres::PgPoolOptions, PgPool};
use tower_http::trace::{DefaultOnFailure, TraceLayer};
use utoipa_swagger_ui::SwaggerUi;

use crate::{config::ControlApiConfig, error::ApiError, routes::health, state::AppState};

/// The whole HTTP surface: `/api/v1/...`, `/health`, `/ready`, `/metrics`, `/docs`.
pub fn app(state: AppState) -> Router {
    app_with(state, true)
}

/// The HTTP surface, with `/metrics` (admin credentials) or without it (it is served on
/// `metrics_listen` instead).
pub fn app_with(state: AppState, metrics_here: bool) -> Router {
    let router = Router::new()
        .nest("/api/v1", routes::api_router())
        .route("/health", get(health::health))
        .route("/ready", get(health::ready));
    let router = if metrics_here { router.route("/metrics", get(metrics::render_for_admins)) } else { router };
    router
        .merge(SwaggerUi::new("/docs").external_url_unchecked("/api/v1/openapi.json", openapi::document()))
        .fallback(|| async { ApiError::NotFound("route") })
        .method_not_allowed_fallback(|| async {
            let mut response =
                axum::response::IntoResponse::into_response(ApiError::bad_request("method not allowed on this path"));
            *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
            response
        })
        .layer(middleware::from_fn_with_state(state.clone(), metrics::track))
        // A 5xx of the API's own making (a dependency away, model sync not configured) is a
        // warning; an internal error is logged at error where it is rendered (error.rs).
        .layer(TraceLayer::new_for_http().on_failure(DefaultOnFailure::new().level(tracing::Level::WARN)))
        .layer(middleware::from_fn(audit::request_ids))
        .with_state(state)
}

/// The budget alert scanner (unless `alerts.scan_interval_seconds` is 0) and the webhook
/// delivery worker (which also keeps the pending-events gauge).
pub fn spawn_events(config: &ControlApiConfig, state: &AppState) {
    if config.alerts.scan_interval_seconds > 0 {
        tokio::spawn(alerts::run(state.clone(), config.alerts.clone()));
    }
    tokio::spawn(webhooks::run(state.clone(), config.webhook.clone()));
}

pub async fn connect_db(url: &str) -> anyhow::Result<PgPool> {
    Ok(PgPoolOptions::new().max_connections(16).acquire_timeout(Duration::from_secs(5)).connect(url).await?)
}

/// Serves `app` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_app(listener, app(state), shutdown).await
}

async fn serve_app(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(shutdown)
        .await
}

/// Connects, migrates (unless disabled), keeps usage partitions ahead, and serves until SIGTERM
/// or Ctrl-C.
pub async fn run(config: ControlApiConfig) -> anyhow::Result<()> {
    if config.admin_api_keys.is_empty() && config.jwt.secret.is_none() && config.jwt.jwks_url.is_none() {
        tracing::warn!("no admin API keys and no JWT verification configured: every request will be refused");
    }
    let db = connect_db(&config.database_url).await?;
    if config.migrate_on_start {
        tollgate_core::MIGRATOR.run(&db).await?;
    }
    tollgate_core::ensure_usage_partitions(&db).await?;
    let partitions = db.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(24 * 3600));
        loop {
            tick.tick().await;
            if let Err(e) = tollgate_core::ensure_usage_partitions(&partitions).await {
                tracing::warn!(error = %e, "could not create usage partitions");
            }
        }
    });
    let state = AppState::new(&config, db)?;
    if config.litellm.url.is_some() && config.litellm.sync_interval_seconds > 0 {
        let interval = Duration::from_secs(config.litellm.sync_interval_seconds);
        tokio::spawn(model_sync::run(state.clone(), interval));
    }
    spawn_events(&config, &state);
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    tracing::info!(listen = %listener.local_addr()?, "control API listening");
    if let Some(addr) = config.metrics_listen {
        let metrics_listener = tokio::net::TcpListener::bind(addr).await?;
        tracing::info!(listen = %metrics_listener.local_addr()?, "metrics listening");
        let router = metrics::router(state.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(metrics_listener, router).await {
                tracing::error!(error = %e, "metrics listener failed");
            }
        });
    }
    serve_app(listener, app_with(state, config.metrics_listen.is_none()), shutdown_signal()).await?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
