//! The authorization table, tested from itself: every operation of the OpenAPI document must have
//! a row in `tollgate_control_api::authz::RULES` (and every row an operation), and every row is
//! walked with every role (admin, adminReadonly, owner, team admin, other user, no token) over
//! HTTP, the answer compared with the row's cell: Yes = neither 401, 403 nor 404 (a business
//! refusal such as 409 is still "allowed past authorization"), No = 403, Hidden = 404, no token =
//! 401 unless the row is public.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sqlx::PgPool;
use tollgate_control_api::authz::{Access, Relation, Rule, RULES};

use crate::common::*;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Who {
    Role(Relation),
    Anonymous,
}

const WHO: [Who; 6] = [
    Who::Role(Relation::Admin),
    Who::Role(Relation::Readonly),
    Who::Role(Relation::Owner),
    Who::Role(Relation::TeamAdmin),
    Who::Role(Relation::Other),
    Who::Anonymous,
];

/// A world for one request: an owner with a subscription and a key on a team that has a team
/// admin and a plain member, another user, an administrator and a read-only administrator.
struct World {
    n: String,
    owner: String,
    member: String,
    newcomer: String,
    team: String,
    model: String,
    spare_model: String,
    sub: String,
    key: String,
    tokens: [(Relation, String); 5],
}

impl World {
    async fn new(app: &TestApp, n: &str) -> World {
        let login =
            |name: &str, roles: &[&str]| user_token(&format!("{name}-{n}"), &format!("{name}-{n}@example.com"), roles);
        let tokens = [
            (Relation::Admin, login("admin", &["admin"])),
            (Relation::Readonly, login("ro", &["adminReadonly"])),
            (Relation::Owner, login("owner", &["user"])),
            (Relation::TeamAdmin, login("lead", &["user"])),
            (Relation::Other, login("other", &["user"])),
        ];
        let mut ids = Vec::new();
        for (_, token) in &tokens {
            let (status, me) = app.get("/api/v1/users/me", token).await;
            assert_eq!(status, StatusCode::OK, "{me}");
            ids.push(id(&me));
        }
        let (owner, lead) = (ids[2].clone(), ids[3].clone());
        let member = id(&app.create_user(&format!("member-{n}@example.com")).await);
        let newcomer = id(&app.create_user(&format!("new-{n}@example.com")).await);
        let model = format!("m-{n}");
        let spare_model = format!("spare-{n}");
        app.create_model(&model).await;
        app.create_model(&spare_model).await;
        let team = id(&app.admin_post("/api/v1/teams", json!({"name": format!("team-{n}")})).await);
        let members = format!("/api/v1/teams/{team}/members");
        app.admin_post(&members, json!({"user_id": owner})).await;
        app.admin_post(&members, json!({"user_id": lead, "role": "admin"})).await;
        app.admin_post(&members, json!({"user_id": member})).await;
        let sub = id(&app.subscribe(&owner, &model).await);
        let key = id(&app
            .admin_post("/api/v1/keys", json!({"user_id": owner, "team_id": team, "name": "k", "models": [model]}))
            .await);
        World { n: n.into(), owner, member, newcomer, team, model, spare_model, sub, key, tokens }
    }

    fn token(&self, who: Relation) -> &str {
        self.tokens.iter().find(|(r, _)| *r == who).map(|(_, t)| t.as_str()).unwrap()
    }

    /// The rule's path with this world's ids in it.
    fn path(&self, rule: &Rule) -> String {
        let resource = rule.path.split('/').nth(3).unwrap_or_default();
        let id = match resource {
            "users" => &self.owner,
            "teams" => &self.team,
            "models" => &self.model,
            "subscriptions" => &self.sub,
            "keys" => &self.key,
            _ => "",
        };
        rule.path.replace("{id}", id).replace("{user_id}", &self.member)
    }

    /// A body the operation accepts from a caller allowed to make it.
    fn body(&self, rule: &Rule) -> Option<Value> {
        let n = &self.n;
        let body = match (rule.method, rule.path) {
            ("GET" | "DELETE", _) => return None,
            ("POST", "/api/v1/users") => json!({"email": format!("made-{n}@example.com"), "name": "made"}),
            ("PATCH", "/api/v1/users/{id}") => json!({"name": "renamed"}),
            ("POST", "/api/v1/teams") => json!({"name": format!("made-{n}")}),
            ("PATCH", "/api/v1/teams/{id}") => json!({"description": "changed"}),
            ("POST", "/api/v1/teams/{id}/members") => json!({"user_id": self.newcomer}),
            ("POST", "/api/v1/models") => {
                json!({"id": format!("made-{n}"), "input_cost_per_token": 0, "output_cost_per_token": 0})
            }
            ("PATCH", "/api/v1/models/{id}") => json!({"enabled": true}),
            ("POST", "/api/v1/subscriptions") => json!({"user_id": self.owner, "model_id": self.spare_model}),
            ("PATCH", "/api/v1/subscriptions/{id}") => json!({"limits": {}}),
            ("POST", "/api/v1/keys") => {
                json!({"user_id": self.owner, "team_id": self.team, "name": "made", "models": [self.model]})
            }
            ("PATCH", "/api/v1/keys/{id}") => json!({"name": "renamed"}),
            ("POST", path) if path.ends_with("/budget/adjustments") => json!({"amount": 1, "reason": "rbac"}),
            ("POST", path) if path.ends_with("/sync") || path.contains("/{id}/") => json!({}),
            (method, path) => panic!("no sample body for {method} {path}: add one here"),
        };
        Some(body)
    }
}

fn expected(rule: &Rule, who: Who) -> Access {
    match who {
        Who::Role(relation) => rule.access(relation),
        Who::Anonymous if rule.public => Access::Yes,
        Who::Anonymous => Access::No,
    }
}

#[sqlx::test(migrator = "tollgate_core::MIGRATOR")]
async fn every_operation_answers_every_role_as_the_table_says(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let (status, doc) = app.call(Method::GET, "/api/v1/openapi.json", None, None).await;
    assert_eq!(status, StatusCode::OK);
    let mut operations = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in ["get", "post", "put", "patch", "delete"] {
            if item.get(method).is_some() {
                operations.push((method.to_uppercase(), path.clone()));
            }
        }
    }
    for (method, path) in &operations {
        assert!(
            RULES.iter().any(|r| r.method == method && r.path == path),
            "{method} {path} has no row in authz::RULES: say who may call it"
        );
    }
    for rule in RULES {
        assert!(
            operations.iter().any(|(m, p)| m == rule.method && p == rule.path),
            "authz::RULES has a row for {} {} that the OpenAPI document lacks",
            rule.method,
            rule.path
        );
    }

    // Reads share one world; each write gets a fresh one, so that one role's write cannot change
    // what the next role meets.
    let shared = World::new(&app, "shared").await;
    let mut case = 0;
    for rule in RULES {
        for who in WHO {
            case += 1;
            let fresh;
            let world = if rule.method == "GET" {
                &shared
            } else {
                fresh = World::new(&app, &format!("c{case}")).await;
                &fresh
            };
            let method = Method::from_bytes(rule.method.as_bytes()).unwrap();
            let path = world.path(rule);
            let token = match who {
                Who::Role(relation) => Some(world.token(relation)),
                Who::Anonymous => None,
            };
            let (status, body) = app.call(method, &path, token, world.body(rule)).await;
            let what = format!("{} {} as {who:?}: {status} {body}", rule.method, path);
            match (expected(rule, who), who) {
                (Access::No, Who::Anonymous) => assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}"),
                (Access::Yes | Access::YesUnless(_), _) => assert!(
                    ![StatusCode::UNAUTHORIZED, StatusCode::FORBIDDEN, StatusCode::NOT_FOUND].contains(&status)
                        && !status.is_server_error()
                        || (rule.path == "/ready" && status == StatusCode::SERVICE_UNAVAILABLE),
                    "allowed, yet {what}"
                ),
                (Access::No, _) => assert_eq!(status, StatusCode::FORBIDDEN, "{what}"),
                (Access::Hidden, _) => assert_eq!(status, StatusCode::NOT_FOUND, "{what}"),
            }
        }
    }
}
