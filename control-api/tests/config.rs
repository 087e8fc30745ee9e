//! The control API's configuration as a deployer meets it: the shipped example loads, a bad
//! address or URL stops the start naming the setting, and `--print-config` shows every setting
//! with secrets hidden.

// Test helpers fail loudly by design (clippy.toml already allows this inside #[test] fns).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use figment::{providers::Serialized, Figment};
use tollgate_control_api::config::ControlApiConfig;
use tollgate_core::roles::Role;

fn with(key: &str, value: &str) -> Result<ControlApiConfig, String> {
    ControlApiConfig::load(None, Figment::from(Serialized::default(key, value))).map_err(|e| e.to_string())
}

#[test]
fn example_config_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/control-api.toml");
    let config = ControlApiConfig::load(Some(&path), Figment::new()).unwrap();
    assert_eq!(config.listen.to_string(), "127.0.0.1:8081");
    assert_eq!(config.jwt.group_roles.get("litemaas-admins"), Some(&Role::Admin));
    assert_eq!(config.litellm.timeout_seconds, 10);
    assert_eq!(config.jwt.leeway_seconds, 60);
    assert!(config.trusted_proxies.is_empty());
}

#[test]
fn trusted_proxies_are_cidr_ranges() {
    let config = with("trusted_proxies", "10.0.0.0/8, 192.168.1.7").unwrap();
    assert_eq!(config.trusted_proxy_ranges().unwrap().len(), 2);
}

#[test]
fn bad_addresses_and_urls_fail_naming_the_setting() {
    for (key, value) in [
        ("listen", "localhost-8081"),
        ("listen", "8081"),
        ("database_url", "mysql://db/tollgate"),
        ("database_url", "not a url"),
        ("redis_url", "127.0.0.1:6379"),
        ("jwt.jwks_url", "not a url"),
        ("jwt.jwks_url", "ftp://sso.example.com/certs"),
        ("litellm.url", "litellm:4000"),
        ("litellm.url", "http://"),
        ("trusted_proxies", "10.0.0.0/33"),
        ("trusted_proxies", "ingress"),
        ("litellm.sync_interval_seconds", "18446744073709551615"),
        ("litellm.sync_interval_seconds", "-1"),
    ] {
        let err = with(key, value).expect_err(&format!("{key}={value:?} was accepted"));
        assert!(err.contains(key), "{key}={value:?} gave: {err}");
    }
}

#[test]
fn good_addresses_and_urls_are_typed_and_empty_urls_mean_none() {
    assert_eq!(with("listen", "0.0.0.0:9000").unwrap().listen, "0.0.0.0:9000".parse().unwrap());
    let litellm = with("litellm.url", "http://litellm:4000/base").unwrap().litellm.url.unwrap();
    assert_eq!((litellm.host_str(), litellm.port(), litellm.path()), (Some("litellm"), Some(4000), "/base"));
    assert!(with("litellm.url", "").unwrap().litellm.url.is_none());
    assert!(with("jwt.jwks_url", " ").unwrap().jwt.jwks_url.is_none());
    assert!(with("redis_url", "redis+cluster://10.0.0.1:7000,10.0.0.2:7000").is_ok());
}

#[test]
fn print_config_shows_every_setting_and_hides_secrets() {
    let example_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/control-api.toml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate-control-api"))
        .env_clear()
        .env("TOLLGATE_JWT_SECRET", "jwt-secret-do-not-show")
        .env("TOLLGATE_ADMIN_API_KEYS", "sk-tg-admin-do-not-show-0000000000000000")
        .env("TOLLGATE_LITELLM_URL", "http://litellm:4000")
        .env("TOLLGATE_LITELLM_API_KEY", "sk-litellm-do-not-show")
        .env("TOLLGATE_REDIS_URL", "redis://:redis-password-do-not-show@cache:6379")
        .env("TOLLGATE_METRICS_LISTEN", "0.0.0.0:9091")
        .env("TOLLGATE_WEBHOOK_URL", "https://hooks.example.com/tollgate")
        .env("TOLLGATE_WEBHOOK_SECRET", "whsec-do-not-show")
        .env("TOLLGATE_ALERT_THRESHOLDS", "0.5, 0.9,1")
        .args(["--config", example_path.to_str().unwrap(), "--print-config"])
        .output()
        .unwrap();
    let example = std::fs::read_to_string(&example_path).unwrap();
    let table = tollgate_core::config::check_printed_config(&out, &example).unwrap_or_else(|e| panic!("{e}"));
    let redacted = Some(tollgate_core::config::REDACTED);
    assert_eq!(table["jwt"]["secret"].as_str(), redacted);
    assert_eq!(table["admin_api_keys"].as_str(), redacted);
    assert_eq!(table["litellm"]["api_key"].as_str(), redacted);
    assert_eq!(table["redis_url"].as_str(), Some("redis://:%3Credacted%3E@cache:6379"));
    assert_eq!(table["metrics_listen"].as_str(), Some("0.0.0.0:9091"));
    assert_eq!(table["webhook"]["secret"].as_str(), redacted);
    assert_eq!(table["webhook"]["url"].as_str(), Some("https://hooks.example.com/tollgate"));
    let thresholds: Vec<f64> =
        table["alerts"]["thresholds"].as_array().unwrap().iter().map(|t| t.as_float().unwrap()).collect();
    assert_eq!(thresholds, vec![0.5, 0.9, 1.0]);
}

fn with_all(pairs: &[(&str, &str)]) -> Result<ControlApiConfig, String> {
    let flags = pairs.iter().fold(Figment::new(), |f, (k, v)| f.merge(Serialized::default(k, v)));
    ControlApiConfig::load(None, flags).map_err(|e| e.to_string())
}

#[test]
fn alert_and_webhook_settings_are_checked_naming_the_setting() {
    let config = with_all(&[]).unwrap();
    assert_eq!(config.alerts.thresholds, vec![0.8, 1.0]);
    assert_eq!(config.alerts.scan_interval_seconds, 5);
    assert!(config.webhook.url.is_none());
    assert_eq!(with("alerts.thresholds", "0.5,0.75, 1").unwrap().alerts.thresholds, vec![0.5, 0.75, 1.0]);
    for (pairs, named) in [
        (vec![("alerts.thresholds", "0.8,0.5")], "alerts.thresholds"),
        (vec![("alerts.thresholds", "0,1")], "alerts.thresholds"),
        (vec![("alerts.thresholds", "11")], "alerts.thresholds"),
        (vec![("alerts.thresholds", "lots")], "lots"),
        (vec![("alerts.scan_interval_seconds", "99999999999")], "alerts.scan_interval_seconds"),
        (vec![("webhook.url", "ftp://hooks.example.com/x"), ("webhook.secret", "s")], "webhook.url"),
        (vec![("webhook.url", "not a url")], "webhook.url"),
        (vec![("webhook.url", "https://hooks.example.com/x")], "TOLLGATE_WEBHOOK_SECRET"),
        (vec![("webhook.timeout_seconds", "0")], "webhook.timeout_seconds"),
        (vec![("webhook.retry_base_ms", "0")], "webhook.retry_base_ms"),
    ] {
        let err = with_all(&pairs).expect_err(&format!("{pairs:?} was accepted"));
        assert!(err.contains(named), "{pairs:?} gave: {err}");
    }
    let ok = with_all(&[("webhook.url", "http://127.0.0.1:9/hook"), ("webhook.secret", "s")]).unwrap();
    assert_eq!(ok.webhook.url.unwrap().as_str(), "http://127.0.0.1:9/hook");
    assert!(with("webhook.url", "").unwrap().webhook.url.is_none());
}
