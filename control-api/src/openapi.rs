//! The OpenAPI 3 document served at /api/v1/openapi.json (Swagger UI at /docs). Error responses
//! are the same for every operation, so they are added here once rather than on each handler.

use utoipa::{
    openapi::{
        security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
        ContentBuilder, Ref, ResponseBuilder,
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
        subscriptions::list, subscriptions::create, subscriptions::fetch, subscriptions::update,
        subscriptions::approve, subscriptions::suspend, subscriptions::reactivate, subscriptions::cancel,
        keys::list, keys::create, keys::fetch, keys::update, keys::rotate, keys::revoke,
        usage::report, audit_log::list, health::health, health::ready,
    ),
    components(schemas(error::ErrorBody, error::ErrorDetail, audit::AuditEntry)),
    modifiers(&BearerAndErrors),
    security(("bearer" = [])),
)]
pub struct ApiDoc;

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
