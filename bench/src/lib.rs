//! tollgate-bench: the load benchmark's tooling, and `mock`, the OpenAI-compatible stand-in
//! upstream used by the tests, local runs and the benchmark.

pub mod mock;
