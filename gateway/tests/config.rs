//! The gateway's configuration as a deployer meets it: the shipped example loads, bad addresses
//! and URLs stop it at start naming the setting, the README's table of environment variables is
//! exactly what the two binaries read, and `--print-config` shows every setting with secrets hidden.

// Test helpers fail loudly by design (clippy.toml already allows this inside #[test] fns).
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use figment::{providers::Serialized, Figment};
use tollgate_core::config::ConfigSpec;
use tollgate_gateway::config::GatewayConfig;

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

#[test]
fn example_config_loads() {
    let path = root().join("configs/gateway.toml");
    let config = GatewayConfig::load(Some(&path), figment::Figment::new()).unwrap();
    assert_eq!(config.admin_listen, "127.0.0.1:9090".parse().unwrap());
}

#[test]
fn bad_addresses_and_urls_fail_naming_the_setting() {
    for (key, value) in [
        ("listen", "localhost-8080"),
        ("admin_listen", "9090"),
        ("upstream_url", "not a url"),
        ("upstream_url", "ftp://litellm:4000"),
        ("database_url", "mysql://db/tollgate"),
        ("redis_url", "127.0.0.1:6379"),
        ("trusted_proxies", "10.0.0.0/33"),
        ("forward_request_headers", "x-litellm-api-key"),
        ("forward_request_headers", "authorization"),
        ("forward_request_headers", "x-tollgate-key-id"),
        ("forward_request_headers", "X-Upper"),
    ] {
        let flags = Figment::from(Serialized::default(key, value));
        let err = GatewayConfig::load(None, flags).unwrap_err().to_string();
        assert!(err.contains(key), "{key}={value:?} gave: {err}");
    }
    for rate in [-0.1, 1.5] {
        let flags = Figment::from(Serialized::default("access_log_sample_rate", rate));
        let err = GatewayConfig::load(None, flags).unwrap_err().to_string();
        assert!(err.contains("access_log_sample_rate") && err.contains("between 0 and 1"), "{rate}: {err}");
    }
}

/// `TOLLGATE_*` variable -> who reads it ("gateway", "control API" or "both"), from the README's
/// configuration table.
fn readme_variables() -> BTreeMap<String, String> {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let mut vars = BTreeMap::new();
    for line in readme.lines().filter(|l| l.starts_with("| `TOLLGATE_")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let who = cells[2].to_string();
        for name in cells[1].split(',') {
            vars.insert(name.trim().trim_matches('`').to_string(), who.clone());
        }
    }
    vars
}

fn read_by(spec: &ConfigSpec) -> BTreeSet<String> {
    // TOLLGATE_CONFIG names the file (a clap flag of both binaries).
    spec.env.iter().map(|(name, _)| format!("TOLLGATE_{name}")).chain(["TOLLGATE_CONFIG".to_string()]).collect()
}

#[test]
fn readme_lists_exactly_the_variables_each_binary_reads() {
    let readme = readme_variables();
    assert!(readme.len() > 10, "the README's table was not found: {readme:?}");
    let documented_for = |binary: &str| -> BTreeSet<String> {
        readme.iter().filter(|(_, who)| *who == binary || *who == "both").map(|(v, _)| v.clone()).collect()
    };
    assert_eq!(documented_for("gateway"), read_by(&tollgate_gateway::config::SPEC), "gateway");
    assert_eq!(documented_for("control API"), read_by(&tollgate_control_api::config::SPEC), "control API");
    let unknown: Vec<_> =
        readme.iter().filter(|(_, who)| !["gateway", "control API", "both"].contains(&who.as_str())).collect();
    assert!(unknown.is_empty(), "rows with an unknown reader: {unknown:?}");
}

#[test]
fn print_config_shows_every_setting_and_hides_secrets() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate-gateway"))
        .env_clear()
        .env("TOLLGATE_UPSTREAM_API_KEY", "sk-upstream-do-not-show")
        .env("TOLLGATE_DATABASE_URL", "postgres://app:pg-password-do-not-show@db:5432/tollgate")
        .env("TOLLGATE_KEY_CACHE_TTL_SECONDS", "7")
        .args(["--config", root().join("configs/gateway.toml").to_str().unwrap(), "--listen", "0.0.0.0:18080"])
        .arg("--print-config")
        .output()
        .unwrap();
    let example = std::fs::read_to_string(root().join("configs/gateway.toml")).unwrap();
    let table = tollgate_core::config::check_printed_config(&out, &example).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(table["upstream_api_key"].as_str(), Some(tollgate_core::config::REDACTED));
    assert_eq!(table["database_url"].as_str(), Some("postgres://app:%3Credacted%3E@db:5432/tollgate"));
    // File, environment and flag, each where it wins.
    assert_eq!(table["admin_listen"].as_str(), Some("127.0.0.1:9090"));
    assert_eq!(table["key_cache_ttl_seconds"].as_integer(), Some(7));
    assert_eq!(table["listen"].as_str(), Some("0.0.0.0:18080"));
}
