//! Layered configuration: built-in defaults, then one TOML file, then `TOLLGATE_*` environment
//! variables, then command-line flags. Unknown keys in the file are an error (each binary's config
//! struct denies unknown fields); secrets may come only from the environment or from files named
//! in the config, never from the TOML itself.

use std::path::Path;

use figment::{
    providers::{Env, Format, Serialized, Toml},
    Figment,
};
use serde::{de::DeserializeOwned, Deserialize, Deserializer, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} does not exist")]
    Missing(String),
    #[error("config key `{0}` is a secret: set it through its environment variable instead")]
    SecretInFile(String),
    #[error("invalid configuration: {0}")]
    Invalid(#[from] Box<figment::Error>),
}

/// How one binary maps its environment variables and which keys are secrets.
pub struct ConfigSpec<'a> {
    /// `(VARIABLE without the TOLLGATE_ prefix, dotted config key)`.
    pub env: &'a [(&'a str, &'a str)],
    /// Dotted keys that must not appear in the TOML file.
    pub secrets: &'a [&'a str],
}

/// Loads `T` from defaults, an optional TOML file, the environment and `overrides` (flags).
pub fn load<T>(file: Option<&Path>, spec: &ConfigSpec<'static>, overrides: Figment) -> Result<T, ConfigError>
where
    T: DeserializeOwned + Serialize + Default,
{
    let mut figment = Figment::from(Serialized::defaults(T::default()));
    if let Some(path) = file {
        if !path.exists() {
            return Err(ConfigError::Missing(path.display().to_string()));
        }
        let toml = Figment::from(Toml::file(path));
        if let Some(secret) = spec.secrets.iter().find(|k| toml.find_value(k).is_ok()) {
            return Err(ConfigError::SecretInFile((*secret).to_string()));
        }
        figment = figment.merge(toml);
    }
    let env: &'static [(&str, &str)] = spec.env;
    let figment = figment
        .merge(Env::prefixed("TOLLGATE_").filter_map(move |var| {
            env.iter().find(|(name, _)| var.as_str().eq_ignore_ascii_case(name)).map(|(_, key)| (*key).into())
        }))
        .merge(overrides);
    figment.extract().map_err(|e| ConfigError::Invalid(Box::new(e)))
}

/// Deserializes a list given either as a TOML/JSON array or as one comma-separated string (the
/// form environment variables take). Empty items are dropped.
pub fn comma_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        One(String),
        Many(Vec<String>),
    }
    let items = match Raw::deserialize(d)? {
        Raw::One(s) => s.split(',').map(str::to_owned).collect(),
        Raw::Many(v) => v,
    };
    Ok(items.into_iter().map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Demo {
        listen: String,
        #[serde(deserialize_with = "comma_list")]
        keys: Vec<String>,
        nested: Nested,
    }
    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Nested {
        secret: Option<String>,
        enabled: bool,
    }
    impl Default for Demo {
        fn default() -> Self {
            Self { listen: "127.0.0.1:1".into(), keys: vec![], nested: Nested::default() }
        }
    }

    const SPEC: ConfigSpec<'static> = ConfigSpec {
        env: &[("DEMO_LISTEN", "listen"), ("DEMO_KEYS", "keys"), ("DEMO_SECRET", "nested.secret")],
        secrets: &["nested.secret"],
    };

    #[test]
    fn layers_file_env_and_flags_in_order() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("c.toml", "listen = \"0.0.0.0:2\"\n[nested]\nenabled = true\n")?;
            jail.set_env("TOLLGATE_DEMO_KEYS", "a, b,,c");
            jail.set_env("TOLLGATE_DEMO_SECRET", "s3");
            jail.set_env("TOLLGATE_UNRELATED", "ignored");
            let c: Demo = load(Some(Path::new("c.toml")), &SPEC, Figment::new()).unwrap();
            assert_eq!(c.listen, "0.0.0.0:2");
            assert_eq!(c.keys, vec!["a", "b", "c"]);
            assert_eq!(c.nested, Nested { secret: Some("s3".into()), enabled: true });
            jail.set_env("TOLLGATE_DEMO_LISTEN", "1.2.3.4:5");
            let c: Demo = load(Some(Path::new("c.toml")), &SPEC, Figment::new()).unwrap();
            assert_eq!(c.listen, "1.2.3.4:5");
            let flags = Figment::from(Serialized::default("listen", "9.9.9.9:9"));
            let c: Demo = load(Some(Path::new("c.toml")), &SPEC, flags).unwrap();
            assert_eq!(c.listen, "9.9.9.9:9");
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_missing_files_and_secrets_in_files_are_errors() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("bad.toml", "lisen = \"x\"\n")?;
            let err = load::<Demo>(Some(Path::new("bad.toml")), &SPEC, Figment::new()).unwrap_err();
            assert!(err.to_string().contains("lisen"), "{err}");
            let err = load::<Demo>(Some(Path::new("nope.toml")), &SPEC, Figment::new()).unwrap_err();
            assert!(matches!(err, ConfigError::Missing(_)));
            jail.create_file("secret.toml", "[nested]\nsecret = \"x\"\n")?;
            let err = load::<Demo>(Some(Path::new("secret.toml")), &SPEC, Figment::new()).unwrap_err();
            assert!(matches!(err, ConfigError::SecretInFile(_)), "{err}");
            Ok(())
        });
    }
}
