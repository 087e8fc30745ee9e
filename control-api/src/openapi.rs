//! The OpenAPI 3 document served at /api/v1/openapi.json (Swagger UI at /docs). What is the same
//! for every operation is added here once rather than on each handler: the error responses,
//! unique operation ids, and the links that lead from the answer naming a resource to the
//! operations on it (a created key's id to `GET /keys/{id}`, ...), which clients and the stateful
//! fuzzer follow.

use std::collections::BTreeMap;

use serde_json::{json, Value};
use utoipa::{
    openapi::{
        link::LinkBuilder,
        path::{Operation, PathItem},
        security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
        ContentBuilder, Ref, RefOr, ResponseBuilder,
    },
    Modify, OpenApi,
};

use crate::{audit, error, routes::*};

#[derive(OpenApi)]
#[openapi(
    info(title = "Tollgate control API", description = "Users, teams, models, subscriptions, keys, usage and audit."),
    paths(
        users::list, users::create, users::me, users::fetch, users::update,
        teams::list, teams::create, teams::fetch, teams::update, teams::remove,
        teams::list_members, teams::add_member, teams::remove_member,
        models::list, models::create, models::fetch, models::update, models::remove, models::sync,
        sync_runs::sync_status,
        subscriptions::list, subscriptions::create, subscriptions::fetch, subscriptions::update,
        subscriptions::approve, subscriptions::suspend, subscriptions::reactivate, subscriptions::cancel,
        keys::list, keys::create, keys::fetch, keys::update, keys::rotate, keys::revoke,
        usage::report, audit_log::list, events::list, health::health, health::ready,
        budgets::my_budgets, budgets::key_standing, budgets::user_standing, budgets::team_standing,
        budgets::subscription_standing, budgets::key_adjust, budgets::user_adjust, budgets::team_adjust,
        budgets::subscription_adjust, budgets::key_adjustments, budgets::user_adjustments,
        budgets::team_adjustments, budgets::subscription_adjustments,
    ),
    components(schemas(error::ErrorBody, error::ErrorDetail, audit::AuditEntry, usage::ReportTime,
        usage::GroupByList, crate::csv::Format)),
    modifiers(&BearerAndErrors, &OperationIds, &Links),
    security(("bearer" = [])),
)]
pub struct ApiDoc;

/// The document as served. utoipa 5 writes a link's fields in snake case (`operation_id`,
/// `request_body`); OpenAPI spells them `operationId` and `requestBody`, and a link spelled
/// otherwise is ignored by every client, so they are renamed here.
pub fn document() -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    if let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) {
        let operations = paths.values_mut().filter_map(Value::as_object_mut).flat_map(|item| item.values_mut());
        let responses =
            operations.filter_map(|op| op.get_mut("responses")?.as_object_mut()).flat_map(|r| r.values_mut());
        let links = responses.filter_map(|r| r.get_mut("links").and_then(Value::as_object_mut));
        for link in links.flat_map(|l| l.values_mut()).filter_map(Value::as_object_mut) {
            for (snake, camel) in
                [("operation_id", "operationId"), ("operation_ref", "operationRef"), ("request_body", "requestBody")]
            {
                if let Some(v) = link.remove(snake) {
                    link.insert(camel.to_string(), v);
                }
            }
        }
    }
    doc
}

struct BearerAndErrors;

const ERRORS: &[(&str, &str)] = &[
    ("400", "Malformed request: bad JSON, path or query parameter"),
    ("401", "Missing, unknown or expired credentials"),
    ("403", "The caller's role does not allow this"),
    ("404", "Not found (or not the caller's)"),
    ("409", "Conflicts with the current state"),
    ("415", "The body is not JSON"),
    ("422", "Invalid field; `error.field` names it"),
    ("502", "An upstream (LiteLLM) failed"),
    ("503", "A dependency is unavailable"),
];

impl Modify for BearerAndErrors {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An admin API key, or a JWT (HS256 or RS256 via JWKS)"))
                    .build(),
            ),
        );
        for item in openapi.paths.paths.values_mut() {
            let ops = [&mut item.get, &mut item.post, &mut item.put, &mut item.patch, &mut item.delete];
            for op in ops.into_iter().flatten() {
                for (code, description) in ERRORS {
                    op.responses.responses.entry((*code).to_string()).or_insert_with(|| {
                        ResponseBuilder::new()
                            .description(*description)
                            .content(
                                "application/json",
                                ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build(),
                            )
                            .build()
                            .into()
                    });
                }
            }
        }
    }
}

/// Operation ids are `<tag>_<handler>` (`keys_create`, `teams_add_member`): the handlers' names
/// alone repeat across resources, and links name their target by operation id.
struct OperationIds;

impl Modify for OperationIds {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for item in openapi.paths.paths.values_mut() {
            for (_, op) in operations_mut(item) {
                let tag = op.tags.as_ref().and_then(|t| t.first()).cloned().unwrap_or_default();
                if let Some(id) = op.operation_id.as_mut() {
                    if !tag.is_empty() && !id.starts_with(&format!("{tag}_")) {
                        *id = format!("{tag}_{id}");
                    }
                }
            }
        }
    }
}

/// Links out of each answer that names a resource:
/// - a create (`POST /keys`, 201) to every operation on what it created (`/keys/{id}...`), the
///   new id taken from the answer (`id`, or the field named like the parameter: a team member's
///   `user_id`), the parameters the create shared (`/teams/{id}/members`) from its request;
/// - an action on a resource (`POST /subscriptions/{id}/suspend`, 200) to the other operations on
///   it, so that a client can follow the states (suspend, then reactivate or cancel);
/// - [`body_links`]: an id into another resource's create (a new user to a subscription for it).
struct Links;

impl Modify for Links {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let schemas = openapi.components.as_ref().map(|c| c.schemas.clone()).unwrap_or_default();
        // Every operation: (path, method, operation id).
        let mut all: Vec<(String, &'static str, String)> = Vec::new();
        for (path, item) in openapi.paths.paths.iter_mut() {
            for (method, op) in operations_mut(item) {
                if let Some(id) = &op.operation_id {
                    all.push((path.clone(), method, id.clone()));
                }
            }
        }
        let body_links = body_links();
        for (path, item) in openapi.paths.paths.iter_mut() {
            let Some(op) = item.post.as_mut() else { continue };
            let (status, base) = if op.responses.responses.contains_key("201") {
                // A create: its collection's path is the base of what it made.
                ("201", path.clone())
            } else {
                // An action (`/subscriptions/{id}/suspend`) answering the resource it acted on.
                match path.rsplit_once("/{") {
                    Some((base, _)) if !path.ends_with('}') => ("200", base.to_string()),
                    _ => continue,
                }
            };
            let Some(RefOr::T(response)) = op.responses.responses.get_mut(status) else { continue };
            let fields = response_fields(&schemas, response);
            let source_id = op.operation_id.clone().unwrap_or_default();
            for (target_path, method, target_id) in &all {
                let Some(rest) = target_path.strip_prefix(&format!("{base}/{{")) else { continue };
                if *target_id == source_id {
                    continue;
                }
                let new_param = rest.split('}').next().unwrap_or_default();
                let mut parameters = BTreeMap::new();
                for name in path_params(target_path) {
                    let expression = if path.contains(&format!("{{{name}}}")) {
                        format!("$request.path.{name}")
                    } else if fields.iter().any(|f| f == name) {
                        format!("$response.body#/{name}")
                    } else if name == new_param && fields.iter().any(|f| f == "id") {
                        "$response.body#/id".to_string()
                    } else {
                        parameters.clear();
                        break;
                    };
                    parameters.insert(name.to_string(), expression);
                }
                if parameters.is_empty() {
                    continue;
                }
                let mut link = LinkBuilder::new()
                    .operation_id(target_id.clone())
                    .description(format!("{} {target_path} on what this answer names", method.to_uppercase()));
                for (name, expression) in parameters {
                    link = link.parameter(name, expression);
                }
                response.links.insert(target_id.clone(), link.build().into());
            }
            for (_, target_id, body, description) in body_links.iter().filter(|(from, ..)| *from == source_id) {
                let link = LinkBuilder::new()
                    .operation_id(*target_id)
                    .request_body(Some(body.clone()))
                    .description(*description);
                response.links.insert((*target_id).to_string(), link.build().into());
            }
        }
    }
}

/// Links that carry an id into another resource's create: `(from, to, request body, description)`.
/// The body holds runtime expressions; the other fields are the client's.
fn body_links() -> Vec<(&'static str, &'static str, Value, &'static str)> {
    vec![
        (
            "users_create",
            "subscriptions_create",
            json!({"user_id": "$response.body#/id"}),
            "Subscribe the new user to a model",
        ),
        (
            "users_create",
            "keys_create",
            json!({"user_id": "$response.body#/id", "models": []}),
            "A key for the new user, for every model of their active subscriptions",
        ),
        (
            "models_create",
            "subscriptions_create",
            json!({"model_id": "$response.body#/id"}),
            "Subscribe a user to the new model",
        ),
        (
            "subscriptions_create",
            "keys_create",
            json!({"user_id": "$response.body#/user_id", "models": ["$response.body#/model_id"]}),
            "A key for the subscribed model",
        ),
    ]
}

fn operations_mut(item: &mut PathItem) -> impl Iterator<Item = (&'static str, &mut Operation)> {
    [
        ("get", &mut item.get),
        ("post", &mut item.post),
        ("put", &mut item.put),
        ("patch", &mut item.patch),
        ("delete", &mut item.delete),
    ]
    .into_iter()
    .filter_map(|(method, op)| op.as_mut().map(|op| (method, op)))
}

/// The `{name}`s of a path template.
fn path_params(path: &str) -> impl Iterator<Item = &str> {
    path.split('{').skip(1).filter_map(|s| s.split_once('}').map(|(name, _)| name))
}

/// The top-level fields of a response's JSON body (through `$ref`s and `allOf`).
fn response_fields(
    schemas: &BTreeMap<String, RefOr<utoipa::openapi::schema::Schema>>,
    response: &utoipa::openapi::Response,
) -> Vec<String> {
    let Some(content) = response.content.get("application/json") else { return Vec::new() };
    let Some(schema) = &content.schema else { return Vec::new() };
    let mut fields = Vec::new();
    let mut pending = vec![serde_json::to_value(schema).unwrap_or_default()];
    while let Some(schema) = pending.pop() {
        if let Some(name) = schema["$ref"].as_str().and_then(|r| r.strip_prefix("#/components/schemas/")) {
            pending.extend(schemas.get(name).and_then(|s| serde_json::to_value(s).ok()));
        }
        if let Some(props) = schema["properties"].as_object() {
            fields.extend(props.keys().cloned());
        }
        if let Some(all) = schema["allOf"].as_array() {
            pending.extend(all.iter().cloned());
        }
    }
    fields
}
