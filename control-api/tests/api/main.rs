//! Control API over real HTTP against real PostgreSQL (`#[sqlx::test]` gives each test its own
//! database) and the shared Redis.

// Test helpers fail loudly by design (clippy.toml already allows this inside #[test] fns; the
// helpers outside them need it said here).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

mod audit;
mod auth;
mod authorization;
mod bad_input;
mod budgets;
mod defaults;
mod invalidation;
mod jwt;
mod keys;
mod lists;
mod models;
mod rbac;
mod rbac_table;
mod reports;
mod service;
mod subscriptions;
mod teams;
mod usage;
mod users;
