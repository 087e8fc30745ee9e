//! Limits: the same shape on keys, users, teams and subscriptions.
//!
//! `rpm` and `tpm` count requests and tokens in a rolling 60 s window; `max_budget` is USD per
//! `budget_period` (UTC calendar); `enforcement` says what happens at the limit. Budgets carry at
//! most six decimal places (micro-USD): a request's budget is rounded to the micro-USD (half to
//! even) as it is read, because clients compute budgets in binary floats (`0.1 + 0.2` has 17
//! decimals) and refusing those would refuse honest values. The limiter counts spend in integer
//! nano-USD, so that requests costing fractions of a micro-USD add up exactly.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Requests per minute above this are treated as a mistake, not a limit.
pub const MAX_RPM: i64 = 1_000_000_000;
pub const MAX_TPM: i64 = 1_000_000_000_000;
/// One million USD per period: in nano-USD that is 10^15, which Redis's Lua (doubles) still counts
/// exactly.
pub const MAX_BUDGET_USD: i64 = 1_000_000;
/// Alert thresholds are fractions of `max_budget` in (0, this]: 10 is ten times the budget, for
/// soft and monitor budgets that may be overspent.
pub const MAX_ALERT_THRESHOLD: f64 = 10.0;
/// At most this many alert thresholds per budget.
pub const MAX_ALERT_THRESHOLDS: usize = 10;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum BudgetPeriod {
    #[default]
    None,
    Daily,
    Weekly,
    Monthly,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Enforcement {
    /// Refuse at the limit.
    #[default]
    Hard,
    /// Admit with a warning header.
    Soft,
    /// Only count.
    Monitor,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Requests admitted in any rolling 60 s window.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 1_000_000_000)]
    pub rpm: Option<i64>,
    /// Tokens (reserved, then settled) in any rolling 60 s window.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 1_000_000_000_000_i64)]
    pub tpm: Option<i64>,
    /// USD per budget period, rounded to six decimal places (micro-USD).
    #[serde(default, deserialize_with = "micro_usd")]
    #[schema(value_type = Option<f64>, minimum = 0, maximum = 1_000_000)]
    pub max_budget: Option<Decimal>,
    #[serde(default)]
    pub budget_period: BudgetPeriod,
    #[serde(default)]
    pub enforcement: Enforcement,
    /// Fractions of `max_budget` at which a `budget.threshold` event is sent once per period
    /// (e.g. `[0.5, 0.9, 1.0]`); each in (0, 10], at most 10, read sorted with duplicates
    /// dropped. Absent: the control API's global default (0.8 and 1.0); `[]`: none.
    #[serde(default, deserialize_with = "thresholds", skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = thresholds_schema)]
    pub alert_thresholds: Option<Vec<f64>>,
}

/// A validation failure naming the offending field (relative to the limits object).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

impl Limits {
    pub fn is_empty(&self) -> bool {
        self.rpm.is_none() && self.tpm.is_none() && self.max_budget.is_none()
    }

    pub fn validate(&self) -> Result<(), FieldError> {
        check_range("rpm", self.rpm, MAX_RPM)?;
        check_range("tpm", self.tpm, MAX_TPM)?;
        if let Some(b) = self.max_budget {
            if b.is_sign_negative() {
                return Err(FieldError::new("max_budget", "must be >= 0"));
            }
            if b > Decimal::from(MAX_BUDGET_USD) {
                return Err(FieldError::new("max_budget", format!("must be <= {MAX_BUDGET_USD}")));
            }
            if b.normalize().scale() > 6 {
                return Err(FieldError::new("max_budget", "at most 6 decimal places (micro-USD)"));
            }
        }
        if let Some(t) = &self.alert_thresholds {
            check_thresholds(t).map_err(|m| FieldError::new("alert_thresholds", m))?;
        }
        Ok(())
    }

    /// The budget in integer nano-USD, as the limiter counts it.
    pub fn max_budget_nanos(&self) -> Option<i64> {
        use rust_decimal::prelude::ToPrimitive;
        self.max_budget.and_then(|b| (b * Decimal::from(crate::limiter::NANOS_PER_USD)).trunc().to_i64())
    }
}

/// Reads a budget rounded to the micro-USD (half to even).
fn micro_usd<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Decimal>, D::Error> {
    let value = Option::<Decimal>::deserialize(d)?;
    Ok(value.map(|v| v.round_dp_with_strategy(6, rust_decimal::RoundingStrategy::MidpointNearestEven).normalize()))
}

/// Checks alert thresholds as [`Limits::alert_thresholds`] holds them (and the control API's
/// global default): each in (0, [`MAX_ALERT_THRESHOLD`]], at most [`MAX_ALERT_THRESHOLDS`],
/// strictly increasing. The message says what is wrong; the caller names the field.
pub fn check_thresholds(thresholds: &[f64]) -> Result<(), String> {
    if thresholds.len() > MAX_ALERT_THRESHOLDS {
        return Err(format!("at most {MAX_ALERT_THRESHOLDS} thresholds"));
    }
    if let Some(t) = thresholds.iter().find(|t| !(**t > 0.0 && **t <= MAX_ALERT_THRESHOLD)) {
        return Err(format!(
            "{t} is not a fraction of max_budget in (0, {MAX_ALERT_THRESHOLD}] (0.8 = 80% of the budget)"
        ));
    }
    if thresholds.windows(2).any(|w| w[0] >= w[1]) {
        return Err("must be sorted, without duplicates".into());
    }
    Ok(())
}

/// Reads alert thresholds sorted, duplicates dropped; `null` is none (the global default).
fn thresholds<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<f64>>, D::Error> {
    Ok(Option::<Vec<f64>>::deserialize(d)?.map(|mut t| {
        t.sort_by(f64::total_cmp);
        t.dedup();
        t
    }))
}

fn thresholds_schema() -> utoipa::openapi::schema::Array {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Type};
    ArrayBuilder::new()
        .items(
            ObjectBuilder::new()
                .schema_type(Type::Number)
                .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(utoipa::openapi::KnownFormat::Double)))
                .exclusive_minimum(Some(0.0))
                .maximum(Some(MAX_ALERT_THRESHOLD)),
        )
        .max_items(Some(MAX_ALERT_THRESHOLDS))
        .unique_items(true)
        .description(Some(
            "Fractions of max_budget at which a budget.threshold event is sent, once per period (e.g. \
             [0.5, 0.9, 1.0]); read sorted, duplicates dropped. Absent: the global default (0.8, 1.0); \
             empty: none.",
        ))
        .build()
}

fn check_range(field: &str, value: Option<i64>, max: i64) -> Result<(), FieldError> {
    match value {
        Some(v) if v < 0 => Err(FieldError::new(field, "must be >= 0")),
        Some(v) if v > max => Err(FieldError::new(field, format!("must be <= {max}"))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn parse(json: &str) -> Result<Limits, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn defaults_are_no_period_and_hard() {
        let l = parse("{}").unwrap();
        assert_eq!(l.budget_period, BudgetPeriod::None);
        assert_eq!(l.enforcement, Enforcement::Hard);
        assert!(l.is_empty());
        l.validate().unwrap();
    }

    #[test]
    fn full_limits_round_trip() {
        let l =
            parse(r#"{"rpm":10,"tpm":1000,"max_budget":1.5,"budget_period":"monthly","enforcement":"soft"}"#).unwrap();
        l.validate().unwrap();
        assert_eq!(l.max_budget_nanos(), Some(1_500_000_000));
        let back = parse(&serde_json::to_string(&l).unwrap()).unwrap();
        assert_eq!(back, l);
    }

    #[test]
    fn negative_and_absurd_values_name_their_field() {
        assert_eq!(parse(r#"{"rpm":-1}"#).unwrap().validate().unwrap_err().field, "rpm");
        assert!(parse(r#"{"tpm":1e13}"#).is_err(), "float tpm is a type error");
        assert_eq!(parse(r#"{"tpm":10000000000000}"#).unwrap().validate().unwrap_err().field, "tpm");
        assert_eq!(parse(r#"{"max_budget":-0.01}"#).unwrap().validate().unwrap_err().field, "max_budget");
        assert_eq!(parse(r#"{"max_budget":1e12}"#).unwrap().validate().unwrap_err().field, "max_budget");
        assert_eq!(parse(r#"{"max_budget":1000000.01}"#).unwrap().validate().unwrap_err().field, "max_budget");
        parse(r#"{"max_budget":1000000}"#).unwrap().validate().unwrap();
        let fine = Limits { max_budget: Some(Decimal::from_str("0.0000001").unwrap()), ..Default::default() };
        assert_eq!(fine.validate().unwrap_err().field, "max_budget");
    }

    #[test]
    fn budgets_are_read_rounded_to_the_micro_usd() {
        // A float client's 0.1 + 0.2, and a value past the micro-USD: rounded, half to even.
        let l = parse(r#"{"max_budget":0.30000000000000004}"#).unwrap();
        assert_eq!(l.max_budget, Some(Decimal::from_str("0.3").unwrap()));
        l.validate().unwrap();
        assert_eq!(parse(r#"{"max_budget":78064.87725202538}"#).unwrap().max_budget_nanos(), Some(78_064_877_252_000));
        assert_eq!(
            parse(r#"{"max_budget":0.0000025}"#).unwrap().max_budget,
            Some(Decimal::from_str("0.000002").unwrap())
        );
        assert_eq!(parse(r#"{"max_budget":null}"#).unwrap().max_budget, None);
    }

    #[test]
    fn alert_thresholds_are_read_sorted_and_checked() {
        let l = parse(r#"{"max_budget":1,"alert_thresholds":[1.0,0.5,0.9,0.5]}"#).unwrap();
        assert_eq!(l.alert_thresholds, Some(vec![0.5, 0.9, 1.0]));
        l.validate().unwrap();
        let back = serde_json::to_value(&l).unwrap();
        assert_eq!(back["alert_thresholds"], serde_json::json!([0.5, 0.9, 1.0]));
        // Absent: not echoed (the global default applies); empty: no alerts.
        assert!(serde_json::to_value(parse("{}").unwrap()).unwrap().get("alert_thresholds").is_none());
        assert_eq!(parse(r#"{"alert_thresholds":null}"#).unwrap().alert_thresholds, None);
        parse(r#"{"alert_thresholds":[]}"#).unwrap().validate().unwrap();
        parse(r#"{"alert_thresholds":[10]}"#).unwrap().validate().unwrap();
        for bad in ["[0]", "[-0.5]", "[10.01]", "[0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0,1.1]"] {
            let e = parse(&format!(r#"{{"alert_thresholds":{bad}}}"#)).unwrap().validate().unwrap_err();
            assert_eq!(e.field, "alert_thresholds", "{bad}");
        }
        assert!(parse(r#"{"alert_thresholds":["0.8"]}"#).is_err(), "strings are a type error");
        assert!(parse(r#"{"alert_thresholds":0.8}"#).is_err(), "a number is not a list");
        assert!(check_thresholds(&[0.9, 0.8]).is_err(), "the global default must be sorted");
        assert!(check_thresholds(&[0.8, 0.8]).is_err());
        check_thresholds(&[0.8, 1.0]).unwrap();
    }

    #[test]
    fn unknown_period_mode_or_field_is_rejected() {
        assert!(parse(r#"{"budget_period":"hourly"}"#).is_err());
        assert!(parse(r#"{"enforcement":"loud"}"#).is_err());
        assert!(parse(r#"{"rpn":1}"#).is_err());
    }
}
