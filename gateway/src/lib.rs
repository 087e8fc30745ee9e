//! tollgate-gateway: the data plane. A pingora proxy ([`proxy::Gateway`]) authenticates each
//! call by its hashed key, authorizes the model, proxies to the upstream with the upstream's own
//! credential, meters usage from the response (JSON or SSE) and records one usage row per request.
//!
//! Two kinds of runtime: pingora's worker threads serve traffic; one small "support" tokio
//! runtime owns the PostgreSQL pool, the Redis subscription, the usage writer and the admin
//! listener. Requests reach the database only on a key-cache miss, through that runtime.

pub mod access_log;
pub mod admin;
pub mod admission;
pub mod auth;
pub mod catalog;
pub mod config;
pub mod context;
pub mod downstream;
pub mod error;
pub mod invalidation;
pub mod journal;
pub mod key_cache;
pub mod limits;
pub mod meter;
pub mod metrics;
pub mod outcome;
pub mod proxy;
pub mod request;
pub mod settlement;
pub mod spool;
pub mod state;
pub mod upstream;
pub mod usage;

use std::{sync::Arc, time::Duration};

use pingora::{
    proxy::http_proxy,
    server::{configuration::ServerConf, RunArgs, Server},
    services::listening::Service,
};
use sqlx::postgres::PgPoolOptions;

use crate::{
    access_log::AccessLog,
    auth::FailedAuthThrottle,
    catalog::ModelCatalog,
    config::GatewayConfig,
    invalidation::Invalidator,
    journal::Journal,
    key_cache::{KeyCache, KeyLoads},
    metrics::Metrics,
    spool::Spool,
    state::{metered_paths, GatewayState},
    upstream::Upstream,
};

/// JSON logs on stderr, level from `RUST_LOG` (default `info`). pingora dumps request and
/// response headers (client keys, the upstream credential) at debug and trace level, so its
/// crates are held at `info` whatever `RUST_LOG` says: no key ever reaches a log line.
pub fn init_logging() {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    for target in ["pingora", "pingora_core", "pingora_proxy", "pingora_http"] {
        // A constant, well-formed directive: parsing it cannot fail.
        #[allow(clippy::expect_used)]
        let directive = format!("{target}=info").parse().expect("directive");
        filter = filter.add_directive(directive);
    }
    tracing_subscriber::fmt().json().with_env_filter(filter).init();
}

/// Resolves the upstream's host again every `every`, off the request path: new connections go
/// to the new addresses, pooled ones to the old until they close.
async fn follow_upstream_dns(upstream: Arc<Upstream>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let lookup = upstream.clone();
        match tokio::task::spawn_blocking(move || lookup.refresh()).await {
            Ok(Ok(true)) => tracing::info!(addrs = ?upstream.addrs(), "upstream host resolves to new addresses"),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "upstream host not resolved again; keeping its addresses"),
            Err(e) => tracing::warn!(error = %e, "upstream resolution task failed"),
        }
    }
}

/// Starts everything and serves until SIGTERM (graceful: in-flight requests finish, their usage
/// rows are flushed) or SIGINT.
pub fn run(config: GatewayConfig) -> anyhow::Result<()> {
    let upstream = Arc::new(Upstream::new(&config)?);
    let support = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("tollgate-support")
        .enable_all()
        .build()?;
    let metrics = Arc::new(Metrics::new());
    let db = support.block_on(async {
        PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(2))
            .connect_lazy(&config.database_url)
    })?;
    support.block_on(async {
        if config.migrate_on_start {
            tollgate_core::MIGRATOR.run(&db).await?;
        }
        if let Err(e) = tollgate_core::ensure_usage_partitions(&db).await {
            tracing::warn!(error = %e, "could not create usage partitions");
        }
        anyhow::Ok(())
    })?;
    let catalog = Arc::new(ModelCatalog::default());
    if let Err(e) = support.block_on(catalog.reload_all(&db)) {
        tracing::warn!(error = %e, "model catalogue not loaded; it will be on the next refresh");
    }
    let keys = Arc::new(KeyCache::new(
        Duration::from_secs(config.key_cache_ttl_seconds),
        Duration::from_secs(config.negative_cache_ttl_seconds),
        config.key_cache_max_entries,
        metrics.key_cache_evictions.clone(),
    ));
    let spool = Spool::start(&config.spool_dir, config.spool_max_bytes, metrics.clone())?;
    let journal = Arc::new(Journal::new(std::path::Path::new(&config.spool_dir)));
    let (sink, writer) = support.block_on(async {
        usage::channel(
            db.clone(),
            spool,
            journal,
            metrics.clone(),
            config.usage_queue_capacity,
            config.usage_batch_size,
            Duration::from_millis(config.usage_flush_interval_ms),
        )
    });
    let writer = support.spawn(writer.run());
    let invalidator =
        Invalidator { keys: keys.clone(), catalog: catalog.clone(), db: db.clone(), metrics: metrics.clone() };
    support.spawn(invalidator.run(config.redis_url.clone()));
    let refresh = (catalog.clone(), db.clone());
    support.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            let _ = refresh.0.reload_all(&refresh.1).await;
            let _ = tollgate_core::ensure_usage_partitions(&refresh.1).await;
        }
    });

    if config.upstream_resolve_interval_seconds > 0 {
        support.spawn(follow_upstream_dns(
            upstream.clone(),
            Duration::from_secs(config.upstream_resolve_interval_seconds),
        ));
    }

    let limiter = limits::LimiterHandle::start(&config, db.clone(), &support, metrics.clone());
    let state = Arc::new(GatewayState {
        limiter,
        access_log: AccessLog::new(config.access_log, config.access_log_sample_rate),
        metered_paths: metered_paths(&config),
        auth_failures: FailedAuthThrottle::new(
            config.failed_auth_per_minute,
            config.failed_auth_max_addresses,
            metrics.auth_throttle_evictions.clone(),
        ),
        trusted_proxies: config.trusted_proxy_ranges()?,
        body_policy: request::BodyPolicy::new(
            &config.denied_body_fields,
            config.image_input_tokens,
            config.audio_input_tokens,
        ),
        upstream,
        keys,
        key_loads: KeyLoads::default(),
        catalog,
        db,
        support: support.handle().clone(),
        usage: sink.clone(),
        metrics,
        config: config.clone(),
    });
    let admin = support.block_on(tokio::net::TcpListener::bind(config.admin_listen))?;
    let admin_router = admin::router(state.clone());
    support.spawn(async move { axum::serve(admin, admin_router).await });

    let conf = ServerConf {
        threads: config.threads.max(1),
        grace_period_seconds: Some(config.grace_period_seconds),
        graceful_shutdown_timeout_seconds: Some(config.graceful_shutdown_timeout_seconds),
        pid_file: std::env::temp_dir()
            .join(format!("tollgate-gateway-{}.pid", std::process::id()))
            .display()
            .to_string(),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    // Client connections: capped, with header and keep-alive deadlines (downstream.rs).
    let limits = downstream::Limits::new(&config, &state.metrics);
    let limiter = state.limiter.clone();
    let proxy = http_proxy(&server.configuration, proxy::Gateway { state });
    let mut service = Service::new("tollgate gateway".into(), downstream::Guarded::new(proxy, limits));
    match (&config.tls_cert_file, &config.tls_key_file) {
        (Some(cert), Some(key)) => service
            .add_tls(&config.listen.to_string(), cert, key)
            .map_err(|e| anyhow::anyhow!("tls_cert_file {cert} / tls_key_file {key}: {e}"))?,
        _ => service.add_tcp(&config.listen.to_string()),
    }
    server.add_service(service);
    tracing::info!(
        listen = %config.listen,
        tls = config.tls_cert_file.is_some(),
        admin = %config.admin_listen,
        "gateway listening"
    );
    server.run(RunArgs::default());

    // Every in-flight request has finished and queued its row: flush them all before exiting.
    // Settlements Redis has not taken are sent once more, then kept for the next start.
    tracing::info!("draining settlements and usage rows");
    support.block_on(limiter.shut_down(&config.spool_dir));
    support.block_on(async {
        sink.flush().await;
        drop(sink);
        let _ = tokio::time::timeout(Duration::from_secs(1), async { drop(writer) }).await;
    });
    support.shutdown_timeout(Duration::from_secs(1));
    tracing::info!("gateway stopped");
    Ok(())
}
