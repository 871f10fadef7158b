//! writ: a node-local SPIFFE agent that gives every AI-agent task its own
//! short-lived identity. The binary in `main.rs` is a thin shell over this
//! library, so integration tests and benchmarks can reach the same code.

pub mod admin_api;
pub mod agent;
pub mod audit;
pub mod bundle;
pub mod ca;
mod cgroup;
mod cgroup_watch;
pub mod changes;
pub mod cli;
pub mod config;
pub mod entries;
pub mod federation;
mod grpc_codec;
mod health;
pub mod identity;
pub mod jwt;
mod jwt_cache;
pub mod peer;
pub mod policy;
pub mod prune_clock;
pub mod readiness;
mod refusal_budget;
pub mod reload;
pub mod scheduling;
pub mod service;
pub mod spiffe_id;
pub mod store;
pub mod svid;
mod sys;
pub mod systemd;
pub mod task_events;
pub mod tasks;
pub mod telemetry;
pub mod tls;
mod uds_authority;
mod wall_clock;
pub mod workload_api;
mod write_coalescing;

/// Code generated from `proto/` by build.rs.
pub mod proto {
    /// The SPIFFE Workload API. The proto has no package, so prost names the
    /// generated file `_`.
    pub mod workload {
        tonic::include_proto!("_");
    }
    pub mod admin {
        tonic::include_proto!("writ.admin.v1");
    }
    /// Encoded descriptors of the Workload API, for its socket's gRPC
    /// server reflection.
    pub const WORKLOAD_FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("workload_descriptor");
    /// Encoded descriptors of the admin API, for its socket's reflection.
    pub const ADMIN_FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("admin_descriptor");
}
