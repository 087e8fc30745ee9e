//! The shipped example config is valid for the control API's loader.

use std::path::Path;

use figment::Figment;
use tollgate_control_api::config::ControlApiConfig;
use tollgate_core::roles::Role;

#[test]
fn example_config_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/control-api.toml");
    let config = ControlApiConfig::load(Some(&path), Figment::new()).unwrap();
    assert_eq!(config.listen, "127.0.0.1:8081");
    assert_eq!(config.jwt.group_roles.get("litemaas-admins"), Some(&Role::Admin));
    assert_eq!(config.litellm.timeout_seconds, 10);
}
