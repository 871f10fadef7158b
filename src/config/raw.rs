//! The config file exactly as written: every key optional, every value kept
//! with its byte span. serde only checks structure (unknown keys, types);
//! meaning is checked in `build`, where each error can point at its value.

use serde::Deserialize;
use toml::Spanned;

pub(super) type Text = Spanned<String>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub trust_domain: Option<Text>,
    pub data_dir: Option<Text>,
    pub cpu_scheduling: Option<Text>,
    pub workload_api: Option<RawWorkloadApi>,
    pub admin_api: Option<RawAdminApi>,
    pub ca: Option<RawCa>,
    pub attestors: Option<RawAttestors>,
    pub tasks: Option<RawTasks>,
    pub log: Option<RawLog>,
    pub policy: Option<RawPolicy>,
    pub audit: Option<RawAudit>,
    pub federation: Option<RawFederation>,
    pub telemetry: Option<RawTelemetry>,
    #[serde(default)]
    pub entry: Vec<Spanned<RawEntry>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWorkloadApi {
    pub socket_path: Option<Text>,
    pub reattest_interval: Option<Text>,
    pub max_connections_per_uid: Option<Spanned<i64>>,
    pub max_streams_per_uid: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdminApi {
    pub socket_path: Option<Text>,
    pub authorized: Option<Vec<Spanned<Vec<Text>>>>,
    pub bind_any_pid: Option<Vec<Spanned<Vec<Text>>>>,
    pub bind_same_uid: Option<bool>,
    pub operators: Option<Vec<Spanned<Vec<Text>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCa {
    pub ca_ttl: Option<Text>,
    pub x509_svid_ttl: Option<Text>,
    pub jwt_svid_ttl: Option<Text>,
    pub upstream: Option<Spanned<RawUpstream>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    pub cert: Option<Text>,
    pub key: Option<Text>,
    pub bundle: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAttestors {
    pub unix: Option<RawUnixAttestor>,
    pub cgroup: Option<RawCgroupAttestor>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUnixAttestor {
    pub discover_workload_path: Option<bool>,
    pub max_hash_bytes: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCgroupAttestor {
    pub trusted_roots: Option<Vec<Text>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTasks {
    pub max_ttl: Option<Text>,
    pub default_ttl: Option<Text>,
    pub x509_svid_ttl: Option<Text>,
    pub max_depth: Option<Spanned<u32>>,
    pub completed_retention: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    pub files: Option<Vec<Text>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAudit {
    pub path: Option<Text>,
    pub max_file_bytes: Option<Spanned<u64>>,
    pub preallocate_bytes: Option<u64>,
    pub checkpoint_every: Option<Spanned<u64>>,
    pub checkpoint_interval: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    pub level: Option<Text>,
    pub format: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTelemetry {
    pub listen: Option<Text>,
    pub allow_remote: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEntry {
    pub spiffe_id: Option<Text>,
    pub selectors: Option<Spanned<Vec<Text>>>,
    pub x509_svid_ttl: Option<Text>,
    pub dns_names: Option<Vec<Text>>,
    pub hint: Option<Text>,
    pub federates_with: Option<Vec<Text>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFederation {
    pub min_refresh_interval: Option<Text>,
    pub bundle_endpoint: Option<Spanned<RawBundleEndpoint>>,
    #[serde(default)]
    pub trust_domain: Vec<Spanned<RawFederatedTrustDomain>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBundleEndpoint {
    pub listen: Option<Text>,
    pub profile: Option<Text>,
    pub spiffe_id: Option<Text>,
    pub cert: Option<Text>,
    pub key: Option<Text>,
    pub refresh_hint: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFederatedTrustDomain {
    pub name: Option<Text>,
    pub url: Option<Text>,
    pub profile: Option<Text>,
    pub endpoint_spiffe_id: Option<Text>,
    pub bundle: Option<Text>,
    pub ca_bundle: Option<Text>,
    pub follow_redirects: Option<bool>,
}
