//! hostd, the host daemon: runs many VMs on one host (one `vmm` process each) and moves memory
//! between them inside a budget, through each VMM's own REST API.
//!
//! Layout: [`spec`] (what users ask for, and its rules), [`host`] (budget, tick, policy
//! parameters), [`registry`] (the daemon's records and admission control), [`statedir`] (what
//! survives a restart), [`monitor`] (the small process that starts each VMM and records how it
//! ended), [`lifecycle`] (create, watch, stop, recover), [`control`] (the control loop around
//! `policy::decide`), [`procfs`] (/proc readings), [`routes`] and [`server`] (the REST API),
//! [`daemon`] (the shared core and its counters), [`vms_file`] (`--vms FILE`).

pub mod control;
pub mod daemon;
pub mod host;
pub mod lifecycle;
pub mod monitor;
pub mod procfs;
pub mod registry;
pub mod routes;
pub mod server;
pub mod spec;
pub mod statedir;
pub mod vms_file;

/// The OpenAPI document of the daemon's API.
pub const OPENAPI_YAML: &str = include_str!("../openapi.yaml");
