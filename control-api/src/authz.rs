//! Who may do what to which resource: the control API's authorization, as one table.
//!
//! Every operation of the API is one row of [`RULES`], naming its method and OpenAPI path and,
//! for each way a caller can stand towards the resource ([`Relation`]), what happens:
//! [`Access::Yes`], [`Access::No`] (403: the caller sees the resource but may not do this),
//! [`Access::Hidden`] (404: to this caller the resource does not exist) or
//! [`Access::YesUnless`] (allowed except while the resource is in one of the listed states, then
//! 403). Every handler asks [`Caller::authorize`] with its [`Op`] before it reads or writes, and
//! the table-driven RBAC test walks the OpenAPI document and fails on any operation without a
//! row here, so an endpoint cannot be added without saying who may call it.
//!
//! Relations: `admin` and `adminReadonly` are roles (from the token merged with the roles stored
//! in Tollgate); for a `user`, the relation depends on the resource: its **owner** (the user a key
//! or subscription belongs to, the user themself, or, for a team, a member of it), a **team
//! admin** (`team_members.role = admin` of the resource's team), or **other**. A caller holding
//! several relations gets the most permissive of their cells.
//!
//! Beyond the table, [`limits_within`] states who may change limits: what an administrator set is
//! a ceiling the owner or a team admin may tighten but never loosen or remove.

use sqlx::PgPool;
use tollgate_core::{
    limits::{Enforcement, Limits},
    roles::Role,
};
use uuid::Uuid;

use crate::{
    auth::Caller,
    error::{ApiError, ApiResult},
};

/// What a cell of the table allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Yes,
    /// Allowed, except while the resource is in one of these states (then 403).
    YesUnless(&'static [&'static str]),
    /// 403: the caller sees the resource but may not do this to it.
    No,
    /// 404: to this caller, the resource does not exist.
    Hidden,
}

/// How the caller stands towards the resource of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relation {
    Admin,
    Readonly,
    Owner,
    TeamAdmin,
    Other,
}

/// One operation of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    UsersList,
    UsersCreate,
    UsersMe,
    UsersGet,
    UsersUpdate,
    TeamsList,
    TeamsCreate,
    TeamsGet,
    TeamsUpdate,
    TeamsDelete,
    MembersList,
    MembersAdd,
    MembersRemove,
    ModelsList,
    ModelsCreate,
    ModelsGet,
    ModelsUpdate,
    ModelsDelete,
    ModelsSync,
    ModelsSyncStatus,
    SubscriptionsList,
    SubscriptionsCreate,
    SubscriptionsGet,
    SubscriptionsUpdate,
    SubscriptionsApprove,
    SubscriptionsSuspend,
    SubscriptionsReactivate,
    SubscriptionsCancel,
    KeysList,
    KeysCreate,
    KeysGet,
    KeysUpdate,
    KeysRotate,
    KeysRevoke,
    Usage,
    Audit,
    Events,
    UsersMeBudgets,
    KeysBudget,
    KeysBudgetAdjustments,
    KeysBudgetAdjust,
    UsersBudget,
    UsersBudgetAdjustments,
    UsersBudgetAdjust,
    TeamsBudget,
    TeamsBudgetAdjustments,
    TeamsBudgetAdjust,
    SubscriptionsBudget,
    SubscriptionsBudgetAdjustments,
    SubscriptionsBudgetAdjust,
    Health,
    Ready,
}

/// One row: an operation and, per relation, what it may do.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    pub op: Op,
    pub method: &'static str,
    /// The path as the OpenAPI document spells it.
    pub path: &'static str,
    /// Answered without credentials.
    pub public: bool,
    pub admin: Access,
    pub readonly: Access,
    pub owner: Access,
    pub team_admin: Access,
    pub other: Access,
}

impl Rule {
    pub fn access(&self, relation: Relation) -> Access {
        match relation {
            Relation::Admin => self.admin,
            Relation::Readonly => self.readonly,
            Relation::Owner => self.owner,
            Relation::TeamAdmin => self.team_admin,
            Relation::Other => self.other,
        }
    }
}

use Access::{Hidden as H, No as N, Yes as Y};
use Op::*;

/// Cancelling is the owner's, except out of `suspended`: an administrator's suspension is undone
/// only by an administrator.
const UNLESS_SUSPENDED: Access = Access::YesUnless(&["suspended"]);

const fn row(
    op: Op,
    method: &'static str,
    path: &'static str,
    [admin, readonly, owner, team_admin, other]: [Access; 5],
) -> Rule {
    Rule { op, method, path, public: false, admin, readonly, owner, team_admin, other }
}

const fn public(op: Op, path: &'static str) -> Rule {
    Rule { op, method: "GET", path, public: true, admin: Y, readonly: Y, owner: Y, team_admin: Y, other: Y }
}

/// The authorization table. Lists (`GET` of a collection) are open to every role and show each
/// caller only what the item rows let them see; see docs/api.md for the scoping of each.
#[rustfmt::skip]
pub const RULES: &[Rule] = &[
    //   op                       method    path                                            admin readonly owner team_admin other
    row(UsersList,               "GET",    "/api/v1/users",                                [Y,   Y,       Y,    Y,         Y]),
    row(UsersCreate,             "POST",   "/api/v1/users",                                [Y,   N,       N,    N,         N]),
    row(UsersMe,                 "GET",    "/api/v1/users/me",                             [Y,   Y,       Y,    Y,         Y]),
    row(UsersGet,                "GET",    "/api/v1/users/{id}",                           [Y,   Y,       Y,    H,         H]),
    row(UsersUpdate,             "PATCH",  "/api/v1/users/{id}",                           [Y,   N,       N,    H,         H]),
    row(TeamsList,               "GET",    "/api/v1/teams",                                [Y,   Y,       Y,    Y,         Y]),
    row(TeamsCreate,             "POST",   "/api/v1/teams",                                [Y,   N,       N,    N,         N]),
    row(TeamsGet,                "GET",    "/api/v1/teams/{id}",                           [Y,   Y,       Y,    Y,         H]),
    row(TeamsUpdate,             "PATCH",  "/api/v1/teams/{id}",                           [Y,   N,       N,    Y,         H]),
    row(TeamsDelete,             "DELETE", "/api/v1/teams/{id}",                           [Y,   N,       N,    N,         H]),
    row(MembersList,             "GET",    "/api/v1/teams/{id}/members",                   [Y,   Y,       Y,    Y,         H]),
    row(MembersAdd,              "POST",   "/api/v1/teams/{id}/members",                   [Y,   N,       N,    Y,         H]),
    row(MembersRemove,           "DELETE", "/api/v1/teams/{id}/members/{user_id}",         [Y,   N,       N,    Y,         H]),
    row(ModelsList,              "GET",    "/api/v1/models",                               [Y,   Y,       Y,    Y,         Y]),
    row(ModelsCreate,            "POST",   "/api/v1/models",                               [Y,   N,       N,    N,         N]),
    row(ModelsGet,               "GET",    "/api/v1/models/{id}",                          [Y,   Y,       Y,    Y,         Y]),
    row(ModelsUpdate,            "PATCH",  "/api/v1/models/{id}",                          [Y,   N,       N,    N,         N]),
    row(ModelsDelete,            "DELETE", "/api/v1/models/{id}",                          [Y,   N,       N,    N,         N]),
    row(ModelsSync,              "POST",   "/api/v1/models/sync",                          [Y,   N,       N,    N,         N]),
    row(ModelsSyncStatus,        "GET",    "/api/v1/models/sync",                          [Y,   Y,       N,    N,         N]),
    row(SubscriptionsList,       "GET",    "/api/v1/subscriptions",                        [Y,   Y,       Y,    Y,         Y]),
    row(SubscriptionsCreate,     "POST",   "/api/v1/subscriptions",                        [Y,   N,       Y,    H,         H]),
    row(SubscriptionsGet,        "GET",    "/api/v1/subscriptions/{id}",                   [Y,   Y,       Y,    H,         H]),
    row(SubscriptionsUpdate,     "PATCH",  "/api/v1/subscriptions/{id}",                   [Y,   N,       Y,    H,         H]),
    row(SubscriptionsApprove,    "POST",   "/api/v1/subscriptions/{id}/approve",           [Y,   N,       N,    H,         H]),
    row(SubscriptionsSuspend,    "POST",   "/api/v1/subscriptions/{id}/suspend",           [Y,   N,       N,    H,         H]),
    row(SubscriptionsReactivate, "POST",   "/api/v1/subscriptions/{id}/reactivate",        [Y,   N,       N,    H,         H]),
    row(SubscriptionsCancel,     "POST",   "/api/v1/subscriptions/{id}/cancel",            [Y,   N,       UNLESS_SUSPENDED, H, H]),
    row(KeysList,                "GET",    "/api/v1/keys",                                 [Y,   Y,       Y,    Y,         Y]),
    // A team admin never receives the secret of another user's key: creating and rotating are
    // the owner's (or an administrator's).
    row(KeysCreate,              "POST",   "/api/v1/keys",                                 [Y,   N,       Y,    N,         H]),
    row(KeysGet,                 "GET",    "/api/v1/keys/{id}",                            [Y,   Y,       Y,    Y,         H]),
    row(KeysUpdate,              "PATCH",  "/api/v1/keys/{id}",                            [Y,   N,       Y,    Y,         H]),
    row(KeysRotate,              "POST",   "/api/v1/keys/{id}/rotate",                     [Y,   N,       Y,    N,         H]),
    row(KeysRevoke,              "POST",   "/api/v1/keys/{id}/revoke",                     [Y,   N,       Y,    Y,         H]),
    row(Usage,                   "GET",    "/api/v1/usage",                                [Y,   Y,       Y,    Y,         Y]),
    row(Audit,                   "GET",    "/api/v1/audit",                                [Y,   Y,       N,    N,         N]),
    row(Events,                  "GET",    "/api/v1/events",                               [Y,   Y,       N,    N,         N]),
    // Budgets: read as the resource is (a team's only by its admins: it sums every member's
    // spend); adjusted only by administrators.
    row(UsersMeBudgets,          "GET",    "/api/v1/users/me/budgets",                     [Y,   Y,       Y,    Y,         Y]),
    row(KeysBudget,              "GET",    "/api/v1/keys/{id}/budget",                     [Y,   Y,       Y,    Y,         H]),
    row(KeysBudgetAdjustments,   "GET",    "/api/v1/keys/{id}/budget/adjustments",         [Y,   Y,       Y,    Y,         H]),
    row(KeysBudgetAdjust,        "POST",   "/api/v1/keys/{id}/budget/adjustments",         [Y,   N,       N,    N,         H]),
    row(UsersBudget,             "GET",    "/api/v1/users/{id}/budget",                    [Y,   Y,       Y,    H,         H]),
    row(UsersBudgetAdjustments,  "GET",    "/api/v1/users/{id}/budget/adjustments",        [Y,   Y,       Y,    H,         H]),
    row(UsersBudgetAdjust,       "POST",   "/api/v1/users/{id}/budget/adjustments",        [Y,   N,       N,    H,         H]),
    row(TeamsBudget,             "GET",    "/api/v1/teams/{id}/budget",                    [Y,   Y,       N,    Y,         H]),
    row(TeamsBudgetAdjustments,  "GET",    "/api/v1/teams/{id}/budget/adjustments",        [Y,   Y,       N,    Y,         H]),
    row(TeamsBudgetAdjust,       "POST",   "/api/v1/teams/{id}/budget/adjustments",        [Y,   N,       N,    N,         H]),
    row(SubscriptionsBudget,     "GET",    "/api/v1/subscriptions/{id}/budget",            [Y,   Y,       Y,    H,         H]),
    row(SubscriptionsBudgetAdjustments, "GET", "/api/v1/subscriptions/{id}/budget/adjustments", [Y, Y,    Y,    H,         H]),
    row(SubscriptionsBudgetAdjust, "POST", "/api/v1/subscriptions/{id}/budget/adjustments", [Y,   N,       N,    H,         H]),
    public(Health, "/health"),
    public(Ready, "/ready"),
];

/// What an operation's row is not found for (never, by the RBAC test): nothing is allowed.
const NOBODY: Rule = row(Health, "", "", [N, N, N, N, N]);

pub fn rule(op: Op) -> &'static Rule {
    RULES.iter().find(|r| r.op == op).unwrap_or(&NOBODY)
}

/// The resource an operation acts on, as far as authorization cares.
#[derive(Debug, Clone, Copy, Default)]
pub struct Target<'a> {
    /// The user the resource belongs to (a key's or subscription's user, or the user itself).
    pub owner: Option<Uuid>,
    /// The team the resource belongs to (a key's team, or the team itself).
    pub team: Option<Uuid>,
    /// The resource's state, for [`Access::YesUnless`].
    pub state: Option<&'a str>,
}

impl<'a> Target<'a> {
    /// A collection, or an operation on no particular resource.
    pub const NONE: Target<'static> = Target { owner: None, team: None, state: None };

    pub fn user(id: Uuid) -> Self {
        Target { owner: Some(id), ..Self::default() }
    }

    /// A team: its members stand as owners.
    pub fn team(id: Uuid) -> Self {
        Target { team: Some(id), ..Self::default() }
    }

    pub fn owned(owner: Uuid, team: Option<Uuid>) -> Self {
        Target { owner: Some(owner), team, state: None }
    }

    pub fn in_state(self, state: &'a str) -> Self {
        Target { state: Some(state), ..self }
    }
}

impl Caller {
    /// The relations the caller holds towards `target`.
    async fn relations(&self, db: &PgPool, target: &Target<'_>) -> ApiResult<Vec<Relation>> {
        let me = match (self.role(), self.actor_id()) {
            (Role::Admin, _) => return Ok(vec![Relation::Admin]),
            (Role::AdminReadonly, _) => return Ok(vec![Relation::Readonly]),
            (Role::User, Some(me)) => me,
            (Role::User, None) => return Ok(vec![Relation::Other]),
        };
        let mut relations = Vec::new();
        let team_role: Option<String> = match target.team {
            Some(team) => {
                sqlx::query_scalar("SELECT role FROM team_members WHERE team_id = $1 AND user_id = $2")
                    .bind(team)
                    .bind(me)
                    .fetch_optional(db)
                    .await?
            }
            None => None,
        };
        // A team's members stand to the team as owners; a key's owner is its user.
        let owner = match target.owner {
            Some(owner) => owner == me,
            None => team_role.is_some(),
        };
        // The stronger relation first: where both allow, the team admin's view is the wider.
        if team_role.as_deref() == Some("admin") {
            relations.push(Relation::TeamAdmin);
        }
        if owner {
            relations.push(Relation::Owner);
        }
        if relations.is_empty() {
            relations.push(Relation::Other);
        }
        Ok(relations)
    }

    /// Checks `op` on `target` against [`RULES`]: `Ok` with the relation that allows it, 404 when
    /// the caller may not see the target, 403 when they see it but may not do this.
    pub async fn authorize(&self, db: &PgPool, op: Op, target: Target<'_>) -> ApiResult<Relation> {
        let rule = rule(op);
        let relations = self.relations(db, &target).await?;
        let mut refusal = ApiError::NotFound(noun(op));
        for relation in relations {
            match rule.access(relation) {
                Access::Yes => return Ok(relation),
                Access::YesUnless(states) if !target.state.is_some_and(|s| states.contains(&s)) => {
                    return Ok(relation);
                }
                Access::YesUnless(_) => {
                    refusal = ApiError::forbidden(format!(
                        "only an administrator may do this to a {} {}",
                        target.state.unwrap_or_default(),
                        noun(op)
                    ));
                }
                Access::No => {
                    if matches!(refusal, ApiError::NotFound(_)) {
                        refusal = ApiError::forbidden(match relation {
                            Relation::Readonly => "read-only administrators cannot write",
                            _ => "your role does not allow this",
                        });
                    }
                }
                Access::Hidden => {}
            }
        }
        Err(refusal)
    }
}

/// The resource an operation's 404 names.
fn noun(op: Op) -> &'static str {
    match op {
        UsersList | UsersCreate | UsersMe | UsersGet | UsersUpdate => "user",
        TeamsList | TeamsCreate | TeamsGet | TeamsUpdate | TeamsDelete => "team",
        MembersList | MembersAdd | MembersRemove => "team",
        ModelsList | ModelsCreate | ModelsGet | ModelsUpdate | ModelsDelete | ModelsSync | ModelsSyncStatus => "model",
        SubscriptionsCreate => "user",
        SubscriptionsList
        | SubscriptionsGet
        | SubscriptionsUpdate
        | SubscriptionsApprove
        | SubscriptionsSuspend
        | SubscriptionsReactivate
        | SubscriptionsCancel => "subscription",
        KeysCreate => "user",
        KeysList | KeysGet | KeysUpdate | KeysRotate | KeysRevoke => "key",
        Usage | UsersMeBudgets => "user",
        UsersBudget | UsersBudgetAdjustments | UsersBudgetAdjust => "user",
        KeysBudget | KeysBudgetAdjustments | KeysBudgetAdjust => "key",
        TeamsBudget | TeamsBudgetAdjustments | TeamsBudgetAdjust => "team",
        SubscriptionsBudget | SubscriptionsBudgetAdjustments | SubscriptionsBudgetAdjust => "subscription",
        Audit | Events | Health | Ready => "route",
    }
}

/// How a ceiling binds new limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ceiling {
    /// Limits an administrator set on this very object: each must stay set, at most as loose.
    Set,
    /// Limits of an enclosing scope (the owner's user, the key's team): the gateway enforces them
    /// anyway, so a limit may be left unset here, but one that is set stays within them.
    Enclosing,
}

fn strictness(e: Enforcement) -> u8 {
    match e {
        Enforcement::Hard => 2,
        Enforcement::Soft => 1,
        Enforcement::Monitor => 0,
    }
}

/// The limits ownership rule, for writes by anyone but an administrator: `new` must be within
/// every ceiling in `ceilings` (`(what, limits, how)`, e.g. `("key", admin_limits, Set)`).
/// Within means: each of `rpm`, `tpm` and `max_budget` the ceiling sets is at most its value
/// (and, for [`Ceiling::Set`], present); a budget keeps the ceiling's period; enforcement is at
/// least as strict. 422 naming `field.<limit>` otherwise.
pub fn limits_within(field: &str, new: &Limits, ceilings: &[(&str, &Limits, Ceiling)]) -> ApiResult<()> {
    for (what, ceiling, how) in ceilings {
        let over = |name: &str, max: String| {
            ApiError::invalid(
                format!("{field}.{name}"),
                format!("must be at most {max}, as an administrator set on the {what}"),
            )
        };
        let bounded = |name: &str, value: Option<i64>, max: Option<i64>| match (value, max) {
            (Some(v), Some(m)) if v > m => Err(over(name, m.to_string())),
            (None, Some(m)) if *how == Ceiling::Set => Err(over(name, m.to_string())),
            _ => Ok(()),
        };
        bounded("rpm", new.rpm, ceiling.rpm)?;
        bounded("tpm", new.tpm, ceiling.tpm)?;
        match (new.max_budget, ceiling.max_budget) {
            (Some(v), Some(m)) if v > m => return Err(over("max_budget", m.to_string())),
            (None, Some(m)) if *how == Ceiling::Set => return Err(over("max_budget", m.to_string())),
            (Some(_), Some(_)) if new.budget_period != ceiling.budget_period => {
                return Err(ApiError::invalid(
                    format!("{field}.budget_period"),
                    format!("must stay {:?}, as an administrator set on the {what}", ceiling.budget_period)
                        .to_lowercase(),
                ));
            }
            _ => {}
        }
        if !ceiling.is_empty() && strictness(new.enforcement) < strictness(ceiling.enforcement) {
            return Err(ApiError::invalid(
                format!("{field}.enforcement"),
                format!(
                    "must be at least as strict as {:?}, as an administrator set on the {what}",
                    ceiling.enforcement
                )
                .to_lowercase(),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_op_has_exactly_one_row() {
        for r in RULES {
            assert_eq!(RULES.iter().filter(|o| o.op == r.op).count(), 1, "{:?}", r.op);
            assert_eq!(RULES.iter().filter(|o| o.method == r.method && o.path == r.path).count(), 1, "{}", r.path);
        }
    }

    #[test]
    fn readonly_admins_never_write() {
        for r in RULES.iter().filter(|r| r.method != "GET") {
            assert_eq!(r.readonly, Access::No, "{} {}", r.method, r.path);
        }
    }

    fn limits(json: &str) -> Limits {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn limits_may_be_tightened_not_loosened() {
        let set = limits(r#"{"rpm": 10, "max_budget": 5, "budget_period": "daily"}"#);
        let ok = |l: &str| limits_within("limits", &limits(l), &[("key", &set, Ceiling::Set)]);
        ok(r#"{"rpm": 5, "max_budget": 1, "budget_period": "daily"}"#).unwrap();
        ok(r#"{"rpm": 10, "max_budget": 5, "budget_period": "daily", "tpm": 7}"#).unwrap();
        assert!(ok("{}").is_err());
        assert!(ok(r#"{"rpm": 11, "max_budget": 5, "budget_period": "daily"}"#).is_err());
        assert!(ok(r#"{"rpm": 5, "max_budget": 5, "budget_period": "monthly"}"#).is_err());
        assert!(ok(r#"{"rpm": 5, "max_budget": 5, "budget_period": "daily", "enforcement": "soft"}"#).is_err());
        let enclosing = |l: &str| limits_within("limits", &limits(l), &[("user", &set, Ceiling::Enclosing)]);
        enclosing("{}").unwrap();
        assert!(enclosing(r#"{"rpm": 11}"#).is_err());
    }
}
