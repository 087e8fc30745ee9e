//! The shipped example config is valid for the gateway's loader.

use std::path::Path;

use tollgate_gateway::config::GatewayConfig;

#[test]
fn example_config_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/gateway.toml");
    let config = GatewayConfig::load(Some(&path), figment::Figment::new()).unwrap();
    assert_eq!(config.admin_listen, "127.0.0.1:9090");
}
