//! The gateway binary over real HTTP, with real PostgreSQL and Redis and a mock upstream.

// Test helpers fail loudly by design (clippy.toml already allows this inside #[test] fns).
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod harness;

mod alerts;
mod budgets;
mod downstream;
mod errors;
mod faults;
mod integrity;
mod leases;
mod limits;
mod load;
mod observability;
mod proxying;
mod reports;
mod resilience;
mod tls;
