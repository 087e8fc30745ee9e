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
    #[error("invalid configuration: `{key}`{}: {reason}", env.as_ref().map(|e| format!(" (TOLLGATE_{e})")).unwrap_or_default())]
    Setting { key: String, env: Option<String>, reason: String },
}

/// How one binary maps its environment variables and which keys are secrets.
pub struct ConfigSpec<'a> {
    /// `(VARIABLE without the TOLLGATE_ prefix, dotted config key)`.
    pub env: &'a [(&'a str, &'a str)],
    /// Dotted keys that must not appear in the TOML file.
    pub secrets: &'a [&'a str],
}

impl ConfigSpec<'_> {
    /// An error naming the setting `key` and the environment variable that sets it.
    pub fn invalid(&self, key: &str, reason: impl std::fmt::Display) -> ConfigError {
        let env = self.env.iter().find(|(_, k)| *k == key).map(|(name, _)| (*name).to_string());
        ConfigError::Setting { key: key.to_string(), env, reason: reason.to_string() }
    }

    /// Parses the URL in setting `key`, which must use one of `schemes` and name a host.
    pub fn url(&self, key: &str, value: &str, schemes: &[&str]) -> Result<url::Url, ConfigError> {
        let url = url::Url::parse(value.trim()).map_err(|e| self.invalid(key, format!("{e} in {value:?}")))?;
        if !schemes.contains(&url.scheme()) {
            return Err(self.invalid(key, format!("scheme must be one of {}", schemes.join(", "))));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(self.invalid(key, "the URL names no host"));
        }
        Ok(url)
    }

    /// Checks a Redis setting: one `redis://` / `rediss://` URL, several comma-separated (a
    /// cluster), or `redis+cluster://host:port,host:port`.
    pub fn redis_url(&self, key: &str, value: &str) -> Result<(), ConfigError> {
        match value.trim().strip_prefix("redis+cluster://") {
            Some(nodes) => nodes
                .split(',')
                .try_for_each(|node| self.url(key, &format!("redis://{}", node.trim()), &["redis"]).map(drop)),
            None => value.split(',').try_for_each(|u| self.url(key, u, &["redis", "rediss"]).map(drop)),
        }
    }
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

/// What stands in for a secret in [`render_redacted`].
pub const REDACTED: &str = "<redacted>";

/// The effective configuration as TOML (what `--print-config` shows): every setting, secrets
/// replaced by [`REDACTED`] (the keys in `spec.secrets` when set, and the password of any URL,
/// such as `database_url`'s), unset optional settings left out.
pub fn render_redacted<T: Serialize>(config: &T, spec: &ConfigSpec) -> Result<String, ConfigError> {
    let mut value = toml::Value::try_from(config).map_err(|e| ConfigError::Setting {
        key: "(all)".into(),
        env: None,
        reason: format!("cannot be shown as TOML: {e}"),
    })?;
    for key in spec.secrets {
        let mut slot = Some(&mut value);
        for part in key.split('.') {
            slot = slot.and_then(|v| v.get_mut(part));
        }
        if let Some(secret) = slot {
            let empty = matches!(secret, toml::Value::String(s) if s.is_empty())
                || matches!(secret, toml::Value::Array(a) if a.is_empty());
            if !empty {
                *secret = toml::Value::String(REDACTED.into());
            }
        }
    }
    redact_url_passwords(&mut value);
    let body = toml::to_string_pretty(&value).map_err(|e| ConfigError::Setting {
        key: "(all)".into(),
        env: None,
        reason: format!("cannot be shown as TOML: {e}"),
    })?;
    Ok(format!(
        "# Effective configuration: defaults, then the file, the environment and flags; secrets hidden.\n{body}"
    ))
}

/// For the binaries' tests of `--print-config`: the printed configuration as a table, once the
/// run is known to have succeeded, to show no value marked `do-not-show` (the tests' secrets),
/// and to hold only settings that the commented example `example` (a TOML file's text) names,
/// set or commented out (`key =`, `# key =` or `# key:`): a setting the example never names is
/// one a deployer reading it would not learn exists.
pub fn check_printed_config(output: &std::process::Output, example: &str) -> Result<toml::Table, String> {
    fn walk(prefix: &str, table: &toml::Table, out: &mut Vec<String>) {
        for (key, value) in table {
            let dotted = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
            match value {
                toml::Value::Table(inner) => walk(&dotted, inner, out),
                _ => out.push(dotted),
            }
        }
    }
    let shown = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!("{}: {shown}{}", output.status, String::from_utf8_lossy(&output.stderr)));
    }
    if shown.contains("do-not-show") {
        return Err(format!("a secret was shown:\n{shown}"));
    }
    let table: toml::Table = shown.parse().map_err(|e| format!("not TOML ({e}):\n{shown}"))?;
    let mut keys = Vec::new();
    walk("", &table, &mut keys);
    let named = |key: &str| {
        let last = key.rsplit('.').next().unwrap_or(key);
        example.lines().any(|line| {
            let line = line.trim_start().trim_start_matches('#').trim_start();
            line.strip_prefix(last).is_some_and(|rest| {
                let rest = rest.trim_start();
                rest.starts_with('=') || rest.starts_with(':')
            })
        })
    };
    let missing: Vec<String> = keys.into_iter().filter(|k| !named(k)).collect();
    if !missing.is_empty() {
        return Err(format!("settings the example config does not mention: {missing:?}"));
    }
    Ok(table)
}

/// Replaces the password of every URL in `value` (comma-separated lists too, as Redis cluster
/// settings are) with [`REDACTED`].
fn redact_url_passwords(value: &mut toml::Value) {
    match value {
        toml::Value::String(s) if s.contains("://") => {
            let parts: Vec<String> = s
                .split(',')
                .map(|part| match url::Url::parse(part.trim()) {
                    Ok(mut url) if url.password().is_some() => {
                        let _ = url.set_password(Some(REDACTED));
                        url.to_string()
                    }
                    _ => part.to_string(),
                })
                .collect();
            *s = parts.join(",");
        }
        toml::Value::Array(items) => items.iter_mut().for_each(redact_url_passwords),
        toml::Value::Table(table) => table.iter_mut().for_each(|(_, v)| redact_url_passwords(v)),
        _ => {}
    }
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
// figment::Jail's closures must return figment's own (large) error type.
#[allow(clippy::result_large_err)]
mod tests {
    #[test]
    fn bad_urls_name_their_setting_and_variable() {
        let spec = ConfigSpec { env: &[("REDIS_URL", "redis_url")], secrets: &[] };
        let e = spec.url("redis_url", "http://x", &["redis"]).unwrap_err().to_string();
        assert!(e.contains("`redis_url` (TOLLGATE_REDIS_URL)"), "{e}");
        let e = spec.url("redis_url", "not a url", &["redis"]).unwrap_err().to_string();
        assert!(e.contains("redis_url"), "{e}");
        assert!(spec.url("redis_url", "redis://127.0.0.1:6379/0", &["redis"]).is_ok());
        assert!(spec.redis_url("redis_url", "redis+cluster://10.0.0.1:7000, 10.0.0.2:7000").is_ok());
        assert!(spec.redis_url("redis_url", "redis://a:1,redis://b:2").is_ok());
        assert!(spec.redis_url("redis_url", "redis://a:1,b:2").is_err());
    }

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
    fn rendered_config_hides_secrets_and_url_passwords() {
        let mut demo = Demo { listen: "postgres://app:hunter2@db:5432/x".into(), ..Demo::default() };
        demo.nested.secret = Some("s3cr3t".into());
        let shown = render_redacted(&demo, &SPEC).unwrap();
        assert!(!shown.contains("s3cr3t") && !shown.contains("hunter2"), "{shown}");
        assert!(shown.contains(r#"secret = "<redacted>""#), "{shown}");
        assert!(shown.contains("postgres://app:%3Credacted%3E@db:5432/x"), "{shown}");
        let back: toml::Value = toml::from_str(&shown).unwrap();
        assert_eq!(back["nested"]["enabled"].as_bool(), Some(false));
        // An unset secret stays unset rather than looking configured.
        let shown = render_redacted(&Demo::default(), &SPEC).unwrap();
        assert!(!shown.contains(REDACTED), "{shown}");
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
