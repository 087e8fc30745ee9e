//! The gateway binary over real HTTP, with real PostgreSQL and Redis and a mock upstream.

mod harness;

mod errors;
mod limits;
mod load;
mod observability;
mod proxying;
mod resilience;
