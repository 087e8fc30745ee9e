//! tollgate-gateway: the data plane. This crate currently owns the gateway's configuration; the
//! pingora proxy (authenticate, authorize, reserve, proxy, settle, record) builds on it.

pub mod config;
