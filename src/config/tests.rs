//! Tests for defaults, loading and validation of whole config files.

use super::*;

const ORIGIN: &str = "/etc/writ/writ.toml";

fn alice() -> Environment {
    Environment {
        uid: 1000,
        user_name: "alice".into(),
        home: Some("/home/alice".into()),
        xdg_state_home: None,
        xdg_runtime_dir: Some("/run/user/1000".into()),
    }
}

fn root() -> Environment {
    Environment {
        uid: 0,
        user_name: "root".into(),
        home: Some("/root".into()),
        xdg_state_home: Some("/root/.state".into()),
        xdg_runtime_dir: Some("/run/user/0".into()),
    }
}

fn parse(text: &str) -> Result<Config, Vec<ConfigError>> {
    Config::from_toml_str_with_env(text, Path::new(ORIGIN), &alice())
}

fn parse_ok(text: &str) -> Config {
    match parse(text) {
        Ok(config) => config,
        Err(errors) => panic!("unexpected errors: {errors:#?}"),
    }
}

fn errors(text: &str) -> Vec<ConfigError> {
    match parse(text) {
        Ok(config) => panic!("accepted invalid config: {config:#?}"),
        Err(errors) => errors,
    }
}

/// Asserts `text` yields exactly one error, at `line:column`, whose message
/// contains `message`.
#[track_caller]
fn assert_single_error(text: &str, line: usize, column: usize, message: &str) {
    let errors = errors(text);
    assert_eq!(errors.len(), 1, "expected one error, got {errors:#?}");
    let error = &errors[0];
    assert_eq!(error.position(), Some((line, column)), "{error}");
    assert!(
        error.message().contains(message),
        "{error:?} lacks {message:?}"
    );
}

fn selector(text: &str) -> Selector {
    text.parse().unwrap()
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

#[test]
fn builtin_defaults_for_root() {
    let config = Config::builtin_defaults(&root());
    assert_eq!(config.trust_domain.name(), "writ.test");
    assert_eq!(config.data_dir, Path::new("/var/lib/writ"));
    assert_eq!(
        config.workload_api.socket_path,
        Path::new("/run/writ/workload.sock")
    );
    assert_eq!(
        config.admin_api.socket_path,
        Path::new("/run/writ/admin.sock")
    );
    assert_eq!(
        config.admin_api.authorized,
        vec![vec![selector("unix:uid:0")]]
    );
    assert_eq!(config.ca, CaConfig::default());
    assert_eq!(config.ca.ca_ttl, secs(86_400));
    assert_eq!(config.ca.x509_svid_ttl, secs(3_600));
    assert_eq!(config.ca.jwt_svid_ttl, secs(300));
    assert_eq!(config.tasks.max_ttl, secs(3_600));
    assert_eq!(config.tasks.default_ttl, secs(600));
    assert_eq!(config.tasks.x509_svid_ttl, secs(600));
    assert_eq!(config.tasks.max_depth, 4);
    assert!(config.attestors.unix.discover_workload_path);
    assert_eq!(config.attestors.unix.max_hash_bytes, 104_857_600);
    assert_eq!(
        config.attestors.cgroup.trusted_roots,
        ["/system.slice", "/writ.slice"]
    );
    assert_eq!(config.log.level, "info");
    assert_eq!(config.log.format, LogFormat::Text);
    assert_eq!(config.entries.len(), 1);
    let entry = &config.entries[0];
    assert_eq!(entry.spiffe_id.to_string(), "spiffe://writ.test/user/root");
    assert_eq!(entry.selectors, vec![selector("unix:uid:0")]);
    assert_eq!(entry.x509_svid_ttl, None);
}

#[test]
fn builtin_defaults_for_a_user_follow_xdg() {
    let mut env = alice();
    env.xdg_state_home = Some("/home/alice/.xdg-state".into());
    let config = Config::builtin_defaults(&env);
    assert_eq!(config.data_dir, Path::new("/home/alice/.xdg-state/writ"));
    assert_eq!(
        config.workload_api.socket_path,
        Path::new("/run/user/1000/writ/workload.sock")
    );
    assert_eq!(
        config.admin_api.socket_path,
        Path::new("/run/user/1000/writ/admin.sock")
    );
    assert_eq!(
        config.admin_api.authorized,
        vec![vec![selector("unix:uid:1000")]]
    );
    // Entries are managed by the same user by default, so the no-config
    // quick start can register them.
    assert_eq!(
        config.admin_api.operators,
        vec![vec![selector("unix:uid:1000")]]
    );
    assert_eq!(config.entries.len(), 1);
    assert_eq!(
        config.entries[0].spiffe_id.to_string(),
        "spiffe://writ.test/user/alice"
    );
    assert_eq!(config.entries[0].selectors, vec![selector("unix:uid:1000")]);
}

#[test]
fn builtin_defaults_without_xdg_vars_fall_back_to_home() {
    let mut env = alice();
    env.xdg_runtime_dir = None;
    let config = Config::builtin_defaults(&env);
    assert_eq!(config.data_dir, Path::new("/home/alice/.local/state/writ"));
    assert_eq!(
        config.workload_api.socket_path,
        Path::new("/home/alice/.local/state/writ/run/workload.sock")
    );
    assert_eq!(
        config.admin_api.socket_path,
        Path::new("/home/alice/.local/state/writ/run/admin.sock")
    );
}

#[test]
fn default_entry_uses_the_uid_when_the_name_is_not_a_path_segment() {
    let mut env = alice();
    env.user_name = "alice smith@corp".into();
    let config = Config::builtin_defaults(&env);
    assert_eq!(
        config.entries[0].spiffe_id.to_string(),
        "spiffe://writ.test/user/1000"
    );
}

#[test]
fn builtin_defaults_pass_validation() {
    for env in [root(), alice()] {
        let config = Config::builtin_defaults(&env);
        let text = config.to_toml().unwrap();
        let reloaded = Config::from_toml_str_with_env(&text, Path::new(ORIGIN), &env).unwrap();
        assert_eq!(reloaded, config, "{text}");
    }
}

#[test]
fn empty_file_gets_defaults_but_no_entries() {
    let config = parse_ok("");
    let mut expected = Config::builtin_defaults(&alice());
    expected.entries.clear();
    assert_eq!(config, expected);
}

#[test]
fn fallback_socket_dir_follows_a_configured_data_dir() {
    let mut env = alice();
    env.xdg_runtime_dir = None;
    let config =
        Config::from_toml_str_with_env("data_dir = \"/srv/writ\"\n", Path::new(ORIGIN), &env)
            .unwrap();
    assert_eq!(
        config.workload_api.socket_path,
        Path::new("/srv/writ/run/workload.sock")
    );
    assert_eq!(
        config.admin_api.socket_path,
        Path::new("/srv/writ/run/admin.sock")
    );
}

const FULL: &str = r#"
trust_domain = "example.org"
data_dir = "/srv/writ"
cpu_scheduling = "inherit"

[workload_api]
socket_path = "/srv/writ/sock/workload.sock"
max_connections_per_uid = 4096
max_streams_per_uid = 2048

[admin_api]
socket_path = "/srv/writ/sock/admin.sock"
authorized = [["unix:uid:0"], ["unix:uid:1000", "systemd:unit:orchestrator.service"]]
bind_any_pid = [["unix:uid:0"]]
bind_same_uid = false
operators = [["unix:uid:0", "unix:gid:0"]]

[ca]
ca_ttl = "2d"
x509_svid_ttl = "2h"
jwt_svid_ttl = "15m"
upstream = { cert = "/etc/writ/ca.pem", key = "/etc/writ/ca.key", bundle = "/etc/writ/roots.pem" }

[attestors.unix]
discover_workload_path = false
max_hash_bytes = 1048576

[attestors.cgroup]
trusted_roots = ["/", "/agents.slice/a_b.scope"]

[tasks]
max_ttl = "4h"
default_ttl = "30m"
x509_svid_ttl = "5m"
max_depth = 2
completed_retention = "2h"

[log]
level = "info,writ::tasks=debug"
format = "json"

[policy]
files = ["/etc/writ/policies/base.cedar", "/etc/writ/policies/prod.cedar"]

[audit]
path = "/var/log/writ/audit.jsonl"
max_file_bytes = 1048576
preallocate_bytes = 0
checkpoint_every = 100
checkpoint_interval = "30s"

[telemetry]
listen = "[::1]:9600"
allow_remote = true

[federation]
min_refresh_interval = "10s"

[federation.bundle_endpoint]
listen = "[::]:8443"
profile = "https_web"
cert = "/etc/writ/endpoint.pem"
key = "/etc/writ/endpoint.key"
refresh_hint = "2m"

[[federation.trust_domain]]
name = "partner.example"
url = "https://spire.partner.example:8443/"
profile = "https_spiffe"
endpoint_spiffe_id = "spiffe://partner.example/spire/server"
bundle = "/etc/writ/partner.json"
follow_redirects = false

[[federation.trust_domain]]
name = "spiffe://other.example"
url = "https://other.example/bundle"
profile = "https_web"
ca_bundle = "/etc/writ/web-roots.pem"

[[entry]]
spiffe_id = "spiffe://example.org/agent/researcher"
selectors = ["unix:uid:1000", "cgroup:path:/system.slice/research-agent.service"]
x509_svid_ttl = "10m"
dns_names = ["researcher.internal", "*.agents.example.org"]
hint = "internal"
federates_with = ["partner.example", "spiffe://other.example"]

[[entry]]
spiffe_id = "spiffe://example.org/agent/researcher"
selectors = ["unix:uid:1001"]
"#;

#[test]
fn full_config_loads_every_key() {
    let config = parse_ok(FULL);
    let expected = Config {
        trust_domain: TrustDomain::new("example.org").unwrap(),
        data_dir: "/srv/writ".into(),
        cpu_scheduling: CpuScheduling::Inherit,
        workload_api: WorkloadApiConfig {
            socket_path: "/srv/writ/sock/workload.sock".into(),
            reattest_interval: Duration::from_secs(5),
            max_connections_per_uid: 4096,
            max_streams_per_uid: 2048,
        },
        admin_api: AdminApiConfig {
            socket_path: "/srv/writ/sock/admin.sock".into(),
            authorized: vec![
                vec![selector("unix:uid:0")],
                vec![
                    selector("unix:uid:1000"),
                    selector("systemd:unit:orchestrator.service"),
                ],
            ],
            bind_any_pid: vec![vec![selector("unix:uid:0")]],
            bind_same_uid: false,
            operators: vec![vec![selector("unix:uid:0"), selector("unix:gid:0")]],
        },
        ca: CaConfig {
            ca_ttl: secs(2 * 86_400),
            x509_svid_ttl: secs(7_200),
            jwt_svid_ttl: secs(900),
            upstream: Some(UpstreamCaConfig {
                cert: "/etc/writ/ca.pem".into(),
                key: "/etc/writ/ca.key".into(),
                bundle: "/etc/writ/roots.pem".into(),
            }),
        },
        attestors: AttestorsConfig {
            unix: UnixAttestorConfig {
                discover_workload_path: false,
                max_hash_bytes: 1_048_576,
            },
            cgroup: CgroupAttestorConfig {
                trusted_roots: vec!["/".into(), "/agents.slice/a_b.scope".into()],
            },
        },
        tasks: TasksConfig {
            max_ttl: secs(4 * 3_600),
            default_ttl: secs(1_800),
            x509_svid_ttl: secs(300),
            max_depth: 2,
            completed_retention: secs(7_200),
        },
        log: LogConfig {
            level: "info,writ::tasks=debug".into(),
            format: LogFormat::Json,
        },
        policy: PolicyConfig {
            files: vec![
                "/etc/writ/policies/base.cedar".into(),
                "/etc/writ/policies/prod.cedar".into(),
            ],
        },
        audit: AuditConfig {
            path: "/var/log/writ/audit.jsonl".into(),
            max_file_bytes: 1_048_576,
            preallocate_bytes: 0,
            checkpoint_every: 100,
            checkpoint_interval: secs(30),
        },
        telemetry: TelemetryConfig {
            listen: Some("[::1]:9600".parse().unwrap()),
            allow_remote: true,
        },
        federation: FederationConfig {
            min_refresh_interval: secs(10),
            bundle_endpoint: Some(BundleEndpointConfig {
                listen: "[::]:8443".parse().unwrap(),
                profile: EndpointServerProfile::HttpsWeb {
                    cert: "/etc/writ/endpoint.pem".into(),
                    key: "/etc/writ/endpoint.key".into(),
                },
                refresh_hint: secs(120),
            }),
            trust_domains: vec![
                FederatedTrustDomainConfig {
                    name: TrustDomain::new("partner.example").unwrap(),
                    url: "https://spire.partner.example:8443/".into(),
                    profile: EndpointClientProfile::HttpsSpiffe {
                        endpoint_spiffe_id: "spiffe://partner.example/spire/server"
                            .parse()
                            .unwrap(),
                    },
                    bundle: Some("/etc/writ/partner.json".into()),
                    follow_redirects: false,
                },
                FederatedTrustDomainConfig {
                    name: TrustDomain::new("other.example").unwrap(),
                    url: "https://other.example/bundle".into(),
                    profile: EndpointClientProfile::HttpsWeb {
                        ca_bundle: Some("/etc/writ/web-roots.pem".into()),
                    },
                    bundle: None,
                    follow_redirects: true,
                },
            ],
        },
        entries: vec![
            EntryConfig {
                spiffe_id: "spiffe://example.org/agent/researcher".parse().unwrap(),
                selectors: vec![
                    selector("unix:uid:1000"),
                    selector("cgroup:path:/system.slice/research-agent.service"),
                ],
                x509_svid_ttl: Some(secs(600)),
                dns_names: vec!["researcher.internal".into(), "*.agents.example.org".into()],
                hint: "internal".into(),
                federates_with: vec![
                    TrustDomain::new("partner.example").unwrap(),
                    TrustDomain::new("other.example").unwrap(),
                ],
            },
            EntryConfig {
                spiffe_id: "spiffe://example.org/agent/researcher".parse().unwrap(),
                selectors: vec![selector("unix:uid:1001")],
                x509_svid_ttl: None,
                dns_names: vec![],
                hint: String::new(),
                federates_with: vec![],
            },
        ],
    };
    assert_eq!(config, expected);
}

#[test]
fn full_config_round_trips_through_to_toml() {
    let config = parse_ok(FULL);
    let text = config.to_toml().unwrap();
    assert_eq!(parse_ok(&text), config, "{text}");
}

#[test]
fn example_config_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/writ.toml");
    let config = match validate_file_with_env(&path, &alice()) {
        Ok(config) => config,
        Err(errors) => panic!("examples/writ.toml is invalid: {errors:#?}"),
    };
    assert_eq!(config.trust_domain.name(), "example.org");
    assert_eq!(
        config.admin_api.authorized,
        vec![vec![selector("unix:uid:0")]]
    );
    assert_eq!(config.entries.len(), 2);
    assert_eq!(
        config.entries[0].spiffe_id.to_string(),
        "spiffe://example.org/agent/researcher"
    );
    // Also through the public entry point that uses the real environment.
    assert_eq!(Config::load(&path).unwrap().entries, config.entries);
}

#[test]
fn example_config_mentions_every_key() {
    let example =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/writ.toml"))
            .unwrap();
    // FULL sets every key, so its rendering lists them all.
    let table: toml::Table = parse_ok(FULL).to_toml().unwrap().parse().unwrap();
    let mut keys = Vec::new();
    collect_keys("", &toml::Value::Table(table), &mut keys);
    assert!(keys.len() > 25, "{keys:?}");
    for (path, is_table) in keys {
        let name = path.rsplit('.').next().unwrap();
        let documented = if is_table {
            example.contains(&format!("[{path}")) || example.contains(&format!("{name} = {{"))
        } else {
            example.contains(&format!("{name} ="))
        };
        assert!(documented, "examples/writ.toml does not document {path}");
    }
}

/// Every key under `value` as (dotted path, whether it holds a table).
fn collect_keys(prefix: &str, value: &toml::Value, keys: &mut Vec<(String, bool)>) {
    let toml::Value::Table(table) = value else {
        return;
    };
    for (key, value) in table {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match value {
            toml::Value::Array(items)
                if items.iter().all(toml::Value::is_table) && !items.is_empty() =>
            {
                keys.push((path.clone(), true));
                items
                    .iter()
                    .for_each(|item| collect_keys(&path, item, keys));
            }
            toml::Value::Table(_) => {
                keys.push((path.clone(), true));
                collect_keys(&path, value, keys);
            }
            _ => keys.push((path, false)),
        }
    }
}

#[test]
fn load_reads_a_real_file_and_reports_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("writ.toml");
    std::fs::write(&path, "[ca]\njwt_svid_ttl = \"0s\"\n").unwrap();
    let err = Config::load(&path).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}:2:16: ca.jwt_svid_ttl must be greater than zero",
            path.display()
        )
    );

    std::fs::write(&path, "trust_domain = \"good.example\"\n").unwrap();
    assert_eq!(
        Config::load(&path).unwrap().trust_domain.name(),
        "good.example"
    );
}

#[test]
fn missing_file_is_a_read_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.toml");
    let errors = validate_file(&path).unwrap_err();
    assert_eq!(errors.len(), 1);
    match &errors[0] {
        ConfigError::Read { path: p, kind, .. } => {
            assert_eq!(p, &path);
            assert_eq!(*kind, std::io::ErrorKind::NotFound);
        }
        other => panic!("expected a read error, got {other:?}"),
    }
    assert!(
        errors[0]
            .to_string()
            .starts_with(&format!("{}: ", path.display()))
    );
}

#[test]
fn invalid_utf8_is_located() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("writ.toml");
    std::fs::write(&path, b"trust_domain = \"a.b\"\nhint = \"\xff\"\n").unwrap();
    let errors = validate_file_with_env(&path, &alice()).unwrap_err();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].position(), Some((2, 9)));
    assert!(errors[0].message().contains("not valid UTF-8"));
}

#[test]
fn display_is_file_line_column_message() {
    let errors = errors("trust_domain = \"Example.org\"\n");
    assert_eq!(
        errors[0].to_string(),
        "/etc/writ/writ.toml:1:16: trust_domain \"Example.org\": trust domain contains 'E': only lowercase letters, digits, '.', '-' and '_' are allowed"
    );
}

#[test]
fn unknown_keys_are_rejected_at_the_key() {
    assert_single_error(
        "trust_domian = \"x.org\"\n",
        1,
        1,
        "unknown field `trust_domian`",
    );
    assert_single_error("[ca]\nca_tll = \"1h\"\n", 2, 1, "unknown field `ca_tll`");
    assert_single_error("[attestors.docker]\n", 1, 12, "unknown field `docker`");
    assert_single_error(
        "[[entry]]\nspiffe_id = \"spiffe://writ.test/a\"\nselector = [\"unix:uid:1\"]\n",
        3,
        1,
        "unknown field `selector`",
    );
    assert_single_error(
        "[ca]\nupstream = { cert = \"/c\", key = \"/k\", bundle = \"/b\", chain = \"/x\" }\n",
        2,
        54,
        "unknown field `chain`",
    );
}

/// A config entry is bounded as CreateEntry bounds one: no entry, from the
/// file or the admin API, can make `writ entry list` fail.
#[test]
fn config_entries_are_bounded_as_admin_entries_are() {
    let list = |n: usize, item: &dyn Fn(usize) -> String| {
        (0..n)
            .map(|i| format!("\"{}\"", item(i)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let entry = |selectors: String, dns: String, federates: String| {
        format!(
            "[[entry]]\nspiffe_id = \"spiffe://writ.test/a\"\nselectors = [{selectors}]\n\
             dns_names = [{dns}]\nfederates_with = [{federates}]\n"
        )
    };
    let most = crate::entries::MAX_ENTRY_ITEMS;
    parse_ok(&entry(
        list(most, &|i| format!("unix:uid:{i}")),
        list(most, &|i| format!("h{i}.example")),
        list(most, &|i| format!("td{i}.example")),
    ));
    let errors = errors(&entry(
        list(most + 1, &|i| format!("unix:uid:{i}")),
        list(most + 1, &|i| format!("h{i}.example")),
        list(most + 1, &|i| format!("td{i}.example")),
    ));
    let messages: Vec<&str> = errors.iter().map(ConfigError::message).collect();
    for field in ["selectors", "dns_names", "federates_with"] {
        assert!(
            messages.contains(
                &format!(
                    "entry[0].{field} has {} items; an entry has at most {most}",
                    most + 1
                )
                .as_str()
            ),
            "{messages:#?}"
        );
    }
    let long = format!(
        "unix:path:/{}",
        "p".repeat(crate::entries::MAX_SELECTOR_BYTES)
    );
    let too_long = self::errors(&entry(format!("\"{long}\""), String::new(), String::new()));
    assert!(
        too_long
            .iter()
            .any(|e| e.message().starts_with("entry[0].selectors[0] is ")),
        "{too_long:#?}"
    );
}

#[test]
fn a_config_entry_hint_may_not_hold_control_characters() {
    assert_single_error(
        "[[entry]]\nspiffe_id = \"spiffe://writ.test/a\"\nselectors = [\"unix:uid:1\"]\nhint = \"x\\u001b[2J\"\n",
        4,
        8,
        "entry[0].hint contains the control character U+001B",
    );
    // Nor an invisible formatting character.
    assert_single_error(
        "[[entry]]\nspiffe_id = \"spiffe://writ.test/a\"\nselectors = [\"unix:uid:1\"]\nhint = \"db\\u200b\"\n",
        4,
        8,
        "entry[0].hint contains the invisible formatting character U+200B",
    );
}

/// `writ validate` names every unknown key and mistyped value at once, each
/// at its own line, instead of stopping at the first.
#[test]
fn every_structural_problem_is_reported_in_one_pass() {
    let errors = errors(
        "trust_domian = \"x.org\"\n[workload_api]\nreattest_interval = 5\n[ca]\nca_tll = \"1h\"\n\
         [attestors.docker]\n[[entry]]\nspiffe_id = \"spiffe://writ.test/a\"\nselector = [\"unix:uid:1\"]\n",
    );
    let found: Vec<(Option<(usize, usize)>, &str)> =
        errors.iter().map(|e| (e.position(), e.message())).collect();
    assert_eq!(
        found,
        [
            (
                Some((1, 1)),
                "unknown field `trust_domian`, expected one of `trust_domain`, `data_dir`, `cpu_scheduling`, `workload_api`, `admin_api`, `ca`, `attestors`, `tasks`, `log`, `policy`, `audit`, `federation`, `telemetry`, `entry`"
            ),
            (
                Some((3, 21)),
                "workload_api.reattest_interval: expected a duration string such as \"5s\", found 5"
            ),
            (
                Some((5, 1)),
                "unknown field `ca_tll`, expected one of `ca_ttl`, `x509_svid_ttl`, `jwt_svid_ttl`, `upstream`"
            ),
            (
                Some((6, 12)),
                "unknown field `docker`, expected `unix` or `cgroup`"
            ),
            (
                Some((9, 1)),
                "unknown field `selector`, expected one of `spiffe_id`, `selectors`, `x509_svid_ttl`, `dns_names`, `hint`, `federates_with`"
            ),
        ]
    );
}

/// A value of the wrong type is said in the words of the config file, not
/// of Rust's types, and names its key: testers read "invalid value:
/// integer -1, expected u64" and "expected a string" for a duration.
#[test]
fn type_errors_name_the_key_and_what_it_takes_in_plain_words() {
    for (text, said) in [
        (
            "[workload_api]\nreattest_interval = 5\n",
            "workload_api.reattest_interval: expected a duration string such as \"5s\", found 5",
        ),
        (
            "[workload_api]\nsocket_path = 5\n",
            "workload_api.socket_path: expected a string, found 5",
        ),
        (
            "[workload_api]\nmax_streams_per_uid = \"many\"\n",
            "workload_api.max_streams_per_uid: expected a whole number, found the string \"many\"",
        ),
        (
            "trust_domain = [\"a\"]\n",
            "trust_domain: expected a string, found a list",
        ),
    ] {
        let errors = errors(text);
        assert_eq!(errors.len(), 1, "{text}: {errors:#?}");
        assert_eq!(errors[0].message(), said, "{text}");
    }
}

#[test]
fn type_and_syntax_errors_are_located() {
    assert_single_error(
        "[tasks]\nmax_depth = \"4\"\n",
        2,
        13,
        "tasks.max_depth: expected a whole number of 0 or more, found the string \"4\"",
    );
    assert_single_error(
        "[attestors.unix]\nmax_hash_bytes = -1\n",
        2,
        18,
        "attestors.unix.max_hash_bytes: expected a whole number of 0 or more, found -1",
    );
    assert_single_error(
        "[attestors.unix]\ndiscover_workload_path = \"yes\"\n",
        2,
        26,
        "attestors.unix.discover_workload_path: expected true or false, found the string \"yes\"",
    );
    assert_single_error(
        "[ca]\nca_ttl = 3600\n",
        2,
        10,
        "ca.ca_ttl: expected a duration string such as \"5s\", found 3600",
    );
    let syntax = errors("trust_domain = \"x.org\"\ndata_dir = \n");
    assert_eq!(syntax.len(), 1);
    assert_eq!(
        syntax[0].position().map(|(line, _)| line),
        Some(2),
        "{}",
        syntax[0]
    );
    assert_single_error("[ca]\nca_ttl = \"1h\"\n[ca]\n", 3, 2, "duplicate key `ca`");
}

#[test]
fn bad_trust_domain_and_paths() {
    assert_single_error(
        "trust_domain = \"Example.org\"\n",
        1,
        16,
        "trust domain contains 'E'",
    );
    assert_single_error(
        "data_dir = \"var/lib/writ\"\n",
        1,
        12,
        "data_dir \"var/lib/writ\" must be an absolute path",
    );
    assert_single_error("data_dir = \"\"\n", 1, 12, "data_dir \"\" is empty");
    assert_single_error(
        "[[entry]]\nspiffe_id = \"spiffe://writ.test/a\"\nselectors = [\"unix:uid:1\"]\ndns_names = [\"a.example\", \"A.Example\"]\n",
        4,
        27,
        "entry[0].dns_names[1] \"A.Example\" repeats dns_names[0]",
    );
    assert_single_error(
        "[[entry]]\nspiffe_id = \"spiffe://writ.test/a\"\nselectors = [\"unix:uid:1\"]\nfederates_with = [\"other.example\", \"spiffe://other.example\"]\n",
        4,
        36,
        "entry[0].federates_with[1] \"spiffe://other.example\" repeats federates_with[0] (other.example)",
    );
    assert_single_error(
        "[[entry]]\nspiffe_id = \"spiffe://writ.test/a\"\nselectors = [\"unix:uid:1\", \"unix:uid:1\"]\n",
        3,
        28,
        "entry[0].selectors[1] \"unix:uid:1\" repeats selectors[0]",
    );
    assert_single_error(
        "[admin_api]\nauthorized = [[\"unix:uid:0\"], [\"unix:gid:0\", \"unix:gid:0\"]]\n",
        2,
        46,
        "admin_api.authorized[1][1] \"unix:gid:0\" repeats authorized[1][0]",
    );
    assert_single_error(
        "cpu_scheduling = \"fifo\"\n",
        1,
        18,
        "cpu_scheduling \"fifo\" is unknown; use \"batch\" or \"inherit\"",
    );
    assert_single_error(
        "[workload_api]\nsocket_path = \"writ.sock\"\n",
        2,
        15,
        "workload_api.socket_path \"writ.sock\" must be an absolute path",
    );
    assert_single_error(
        "[admin_api]\nsocket_path = \"run/admin.sock\"\n",
        2,
        15,
        "admin_api.socket_path \"run/admin.sock\" must be an absolute path",
    );
    assert_single_error(
        "[ca]\nupstream = { cert = \"ca.pem\", key = \"/k\", bundle = \"/b\" }\n",
        2,
        21,
        "ca.upstream.cert \"ca.pem\" must be an absolute path",
    );
}

#[test]
fn socket_paths_must_fit_sun_path() {
    let long = format!("/{}", "a".repeat(120));
    assert_single_error(
        &format!("[workload_api]\nsocket_path = \"{long}\"\n"),
        2,
        15,
        "is 121 bytes long; a Unix socket path can be at most 107",
    );

    // Without XDG_RUNTIME_DIR the sockets live under data_dir, so a long
    // data_dir is where both errors point.
    let mut env = alice();
    env.xdg_runtime_dir = None;
    let text = format!("data_dir = \"/{}\"\n", "d".repeat(100));
    let errors = Config::from_toml_str_with_env(&text, Path::new(ORIGIN), &env).unwrap_err();
    assert_eq!(errors.len(), 2, "{errors:#?}");
    for (error, key) in errors.iter().zip(["workload_api", "admin_api"]) {
        assert_eq!(error.position(), Some((1, 12)));
        assert!(error.message().starts_with(key), "{error}");
        assert!(error.message().contains("derived from data_dir"), "{error}");
    }
}

#[test]
fn the_two_apis_need_different_sockets() {
    assert_single_error(
        "[workload_api]\nsocket_path = \"/run/x.sock\"\n[admin_api]\nsocket_path = \"/run/x.sock\"\n",
        4,
        15,
        "each API needs its own socket",
    );
}

#[test]
fn admin_authorized_sets() {
    assert_single_error(
        "[admin_api]\nauthorized = [[\"unix:uid:0\"], [\"unix:0\"]]\n",
        2,
        32,
        "admin_api.authorized[1][0]: selector \"unix:0\" must have the form type:key:value",
    );
    assert_single_error(
        "[admin_api]\nauthorized = [[\"unix:uid:0\"], [\"unix:usr:root\"]]\n",
        2,
        32,
        "admin_api.authorized[1][0]: selector \"unix:usr:root\": unix selectors have no key \"usr\"",
    );
    assert_single_error(
        &entry_with("").replace("unix:uid:1", "cgroup:path:system.slice/x.service"),
        3,
        14,
        "entry[0].selectors[0]: selector \"cgroup:path:system.slice/x.service\": a cgroup:path value is an absolute path without empty, '.' or '..' segments or a trailing '/', as attestors produce it",
    );
    // The kernel writes no path of these forms, so none could ever match.
    for path in ["/system.slice/", "/a//b", "/a/./b", "/a/../b"] {
        assert_single_error(
            &entry_with("").replace("unix:uid:1", &format!("cgroup:path:{path}")),
            3,
            14,
            "a cgroup:path value is an absolute path without empty",
        );
    }
    assert_single_error(
        &entry_with("").replace("unix:uid:1", "unix:uid:4294967296"),
        3,
        14,
        "4294967296 is out of range for a unix:uid value (ids are at most 4294967295)",
    );
    assert_single_error(
        &entry_with("").replace("unix:uid:1", "docker:label:x"),
        3,
        14,
        "entry[0].selectors[0]: selector \"docker:label:x\": no attestor produces type \"docker\"",
    );
    assert_single_error(
        "[admin_api]\nauthorized = [[\"unix:uid:0\"], []]\n",
        2,
        31,
        "admin_api.authorized[1] is an empty selector set, which every caller would match",
    );
    // An empty list is allowed: it locks the admin API.
    let config = parse_ok("[admin_api]\nauthorized = []\n");
    assert!(config.admin_api.authorized.is_empty());
}

/// `operators` is read and checked exactly like `authorized`, and
/// defaults to the uid writ runs as when an `[admin_api]` table leaves it
/// out.
#[test]
fn admin_operators_sets() {
    assert_single_error(
        "[admin_api]\noperators = [[\"unix:uid:0\"], [\"unix:0\"]]\n",
        2,
        31,
        "admin_api.operators[1][0]: selector \"unix:0\" must have the form type:key:value",
    );
    assert_single_error(
        "[admin_api]\noperators = [[\"unix:uid:0\"], []]\n",
        2,
        30,
        "admin_api.operators[1] is an empty selector set, which every caller would match",
    );
    let config = parse_ok("[admin_api]\noperators = []\n");
    assert!(config.admin_api.operators.is_empty());
    let config = parse_ok("[admin_api]\nauthorized = [[\"unix:uid:0\"], [\"unix:uid:1000\"]]\n");
    assert_eq!(
        config.admin_api.operators,
        Config::builtin_defaults(&alice()).admin_api.operators
    );
}

#[test]
fn upstream_needs_all_three_files() {
    assert_single_error(
        "[ca.upstream]\ncert = \"/c.pem\"\nbundle = \"/b.pem\"\n",
        1,
        1,
        "ca.upstream is missing `key`",
    );
}

#[test]
fn ca_ttls() {
    assert_single_error(
        "[ca]\nx509_svid_ttl = \"0s\"\n",
        2,
        17,
        "ca.x509_svid_ttl must be greater than zero",
    );
    assert_single_error(
        "[ca]\nca_ttl = \"1 day\"\n",
        2,
        10,
        "ca.ca_ttl: duration \"1 day\": unexpected character ' '",
    );
    assert_single_error(
        "[ca]\nca_ttl = \"2h\"\nx509_svid_ttl = \"3h\"\n",
        3,
        17,
        "ca.x509_svid_ttl (3h) is longer than ca.ca_ttl (2h)",
    );
    // Only ca_ttl is in the file, so the clash with the default SVID TTL is
    // reported there.
    assert_single_error(
        "[ca]\nca_ttl = \"30m\"\n",
        2,
        10,
        "ca.x509_svid_ttl (1h) is longer than ca.ca_ttl (30m)",
    );
    assert_single_error(
        "[ca]\nca_ttl = \"10m\"\nx509_svid_ttl = \"5m\"\njwt_svid_ttl = \"20m\"\n",
        4,
        16,
        "ca.jwt_svid_ttl (20m) is longer than ca.ca_ttl (10m)",
    );
}

#[test]
fn task_limits() {
    assert_single_error(
        "[tasks]\nmax_ttl = \"0s\"\n",
        2,
        11,
        "tasks.max_ttl must be greater than zero",
    );
    assert_single_error(
        "[tasks]\ndefault_ttl = \"2h\"\n",
        2,
        15,
        "tasks.default_ttl (2h) is longer than tasks.max_ttl (1h)",
    );
    assert_single_error(
        "[tasks]\nx509_svid_ttl = \"2h\"\n",
        2,
        17,
        "tasks.x509_svid_ttl (2h) is longer than tasks.max_ttl (1h)",
    );
    assert_single_error(
        "[tasks]\ndefault_ttl = \"1s\"\n",
        2,
        15,
        "tasks.default_ttl must be at least 2s",
    );
    assert_single_error(
        "[tasks]\nx509_svid_ttl = \"500ms\"\n",
        2,
        17,
        "tasks.x509_svid_ttl must be at least 1s",
    );
    assert_single_error(
        "[tasks]\nx509_svid_ttl = \"1s500ms\"\n",
        2,
        17,
        "tasks.x509_svid_ttl must be a whole number of seconds",
    );
    assert_single_error(
        "[ca]\nx509_svid_ttl = \"500ms\"\n",
        2,
        17,
        "ca.x509_svid_ttl must be at least 1s",
    );
    assert_single_error(
        "[ca]\njwt_svid_ttl = \"90s250ms\"\n",
        2,
        16,
        "ca.jwt_svid_ttl must be a whole number of seconds",
    );
    assert_single_error(
        "[workload_api]\nmax_connections_per_uid = 0\n",
        2,
        27,
        "workload_api.max_connections_per_uid must be a whole number from 1 to 1048576, not 0",
    );
    assert_single_error(
        "[workload_api]\nmax_streams_per_uid = -3\n",
        2,
        23,
        "workload_api.max_streams_per_uid must be a whole number from 1 to 1048576, not -3",
    );
    assert_single_error(
        "[workload_api]\nmax_streams_per_uid = 2000000\n",
        2,
        23,
        "workload_api.max_streams_per_uid must be a whole number from 1 to 1048576, not 2000000",
    );
    assert_single_error(
        "[tasks]\nmax_depth = 0\n",
        2,
        13,
        "tasks.max_depth must be at least 1",
    );
    assert_single_error(
        "[ca]\nca_ttl = \"20m\"\nx509_svid_ttl = \"15m\"\n[tasks]\nx509_svid_ttl = \"30m\"\n",
        5,
        17,
        "tasks.x509_svid_ttl (30m) is longer than ca.ca_ttl (20m)",
    );

    // Lowering max_ttl below both defaults breaks two rules, both at max_ttl.
    let errors = errors("[tasks]\nmax_ttl = \"5m\"\n");
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert!(errors.iter().all(|e| e.position() == Some((2, 11))));
    assert!(
        errors[0]
            .message()
            .contains("tasks.default_ttl (10m) is longer than tasks.max_ttl (5m)")
    );
    assert!(
        errors[1]
            .message()
            .contains("tasks.x509_svid_ttl (10m) is longer than tasks.max_ttl (5m)")
    );
}

#[test]
fn cgroup_trusted_roots_must_be_normalized() {
    for (root, problem) in [
        ("writ.slice", "must start with '/'"),
        ("/a/", "must not end with '/'"),
        ("/a/../b", "\"..\" segment"),
        ("/a/./b", "\"..\" segment"),
        ("/a//b", "empty segment"),
        ("", "it is empty"),
    ] {
        assert_single_error(
            &format!("[attestors.cgroup]\ntrusted_roots = [\"/system.slice\", \"{root}\"]\n"),
            2,
            35,
            &format!(
                "attestors.cgroup.trusted_roots[1] {root:?} is not an absolute, normalized cgroup path: "
            ),
        );
        let message = &errors(&format!(
            "[attestors.cgroup]\ntrusted_roots = [\"{root}\"]\n"
        ))[0];
        assert!(message.message().contains(problem), "{root}: {message}");
    }
}

#[test]
fn log_settings() {
    assert_single_error(
        "[log]\nformat = \"xml\"\n",
        2,
        10,
        "log.format \"xml\" is unknown; use \"text\" or \"json\"",
    );
    assert_single_error(
        "[log]\nlevel = \"info,writ=loud\"\n",
        2,
        9,
        "log.level \"info,writ=loud\" is not a valid tracing filter",
    );
    assert_single_error("[log]\nlevel = \"\"\n", 2, 9, "log.level is empty");
    assert_eq!(
        parse_ok("[log]\nlevel = \"warn,writ=trace\"\n").log.level,
        "warn,writ=trace"
    );
    // A misspelt level reads as a target, which would silence everything
    // else; levels in any case, and target=level directives, are fine.
    for typo in ["infoo", "warn,writ::tasks"] {
        let errors = errors(&format!("[log]\nlevel = \"{typo}\"\n"));
        assert_eq!(errors.len(), 1, "{typo}: {errors:#?}");
        assert!(
            errors[0].message().contains("is neither a level"),
            "{typo}: {}",
            errors[0].message()
        );
    }
    for fine in ["INFO", "off", "debug,hyper=warn", "writ[task]=debug"] {
        assert_eq!(
            parse_ok(&format!("[log]\nlevel = \"{fine}\"\n")).log.level,
            fine
        );
    }
}

/// An entry whose fourth line is `extra`.
fn entry_with(extra: &str) -> String {
    format!(
        "[[entry]]\nspiffe_id = \"spiffe://writ.test/a\"\nselectors = [\"unix:uid:1\"]\n{extra}\n"
    )
}

#[test]
fn entry_identity_errors() {
    assert_single_error(
        "[[entry]]\nspiffe_id = \"spiffe://writ.test/a//b\"\nselectors = [\"unix:uid:1\"]\n",
        2,
        13,
        "entry[0].spiffe_id \"spiffe://writ.test/a//b\": path has an empty segment",
    );
    assert_single_error(
        "[[entry]]\nspiffe_id = \"spiffe://other.org/a\"\nselectors = [\"unix:uid:1\"]\n",
        2,
        13,
        "entry[0].spiffe_id spiffe://other.org/a is in trust domain other.org, but writ's trust_domain is writ.test",
    );
    assert_single_error(
        "[[entry]]\nspiffe_id = \"spiffe://writ.test\"\nselectors = [\"unix:uid:1\"]\n",
        2,
        13,
        "has no path",
    );
    assert_single_error(
        "[[entry]]\nselectors = [\"unix:uid:1\"]\n",
        1,
        1,
        "entry[0] has no spiffe_id",
    );
}

#[test]
fn changing_the_trust_domain_rechecks_every_entry() {
    let text = "trust_domain = \"example.org\"\n\
                [[entry]]\nspiffe_id = \"spiffe://example.org/ok\"\nselectors = [\"unix:uid:1\"]\n\
                [[entry]]\nspiffe_id = \"spiffe://writ.test/stale\"\nselectors = [\"unix:uid:2\"]\n";
    assert_single_error(
        text,
        6,
        13,
        "is in trust domain writ.test, but writ's trust_domain is example.org",
    );
}

#[test]
fn entry_selector_errors() {
    assert_single_error(
        "[[entry]]\nspiffe_id = \"spiffe://writ.test/a\"\nselectors = [\"unix:uid:1\", \"Unix:uid:2\"]\n",
        3,
        28,
        "entry[0].selectors[1]: selector type \"Unix\" must be lowercase",
    );
    assert_single_error(
        "[[entry]]\nspiffe_id = \"spiffe://writ.test/a\"\nselectors = []\n",
        3,
        13,
        "entry[0].selectors is empty",
    );
    assert_single_error(
        "\n[[entry]]\nspiffe_id = \"spiffe://writ.test/a\"\n",
        2,
        1,
        "entry[0] has no selectors",
    );
}

#[test]
fn entry_field_errors() {
    assert_single_error(
        &entry_with("x509_svid_ttl = \"0s\""),
        4,
        17,
        "entry[0].x509_svid_ttl must be greater than zero",
    );
    assert_single_error(
        &entry_with("x509_svid_ttl = \"500ms\""),
        4,
        17,
        "entry[0].x509_svid_ttl must be at least 1s",
    );
    assert_single_error(
        &entry_with("x509_svid_ttl = \"1m30s500ms\""),
        4,
        17,
        "entry[0].x509_svid_ttl must be a whole number of seconds",
    );
    assert_single_error(
        &entry_with("x509_svid_ttl = \"2d\""),
        4,
        17,
        "entry[0].x509_svid_ttl (2d) is longer than ca.ca_ttl (1d)",
    );
    assert_single_error(
        &entry_with("x509_svid_ttl = \"10 m\""),
        4,
        17,
        "entry[0].x509_svid_ttl: duration \"10 m\"",
    );
    assert_single_error(
        &entry_with(&format!("hint = \"{}\"", "h".repeat(1025))),
        4,
        8,
        "entry[0].hint is 1025 bytes long; the Workload API allows at most 1024",
    );
    assert_eq!(
        parse_ok(&entry_with(&format!("hint = \"{}\"", "h".repeat(1024)))).entries[0]
            .hint
            .len(),
        1024
    );
    assert_single_error(
        &entry_with("dns_names = [\"ok.example\", \"bad_name.example\"]"),
        4,
        28,
        "entry[0].dns_names[1] \"bad_name.example\" is not a valid DNS name: it contains '_'",
    );
    assert_single_error(
        &entry_with("federates_with = [\"Partner.example\"]"),
        4,
        19,
        "entry[0].federates_with[0] \"Partner.example\": trust domain contains 'P'",
    );
    assert_single_error(
        &entry_with("federates_with = [\"spiffe://writ.test\"]"),
        4,
        19,
        "names writ's own trust domain writ.test",
    );
}

#[test]
fn duplicate_entries_are_rejected_but_same_id_with_other_selectors_is_fine() {
    let text = "[[entry]]\nspiffe_id = \"spiffe://writ.test/a\"\nselectors = [\"unix:uid:1\", \"unix:gid:2\"]\n\
                [[entry]]\nspiffe_id = \"spiffe://writ.test/a\"\nselectors = [\"unix:gid:2\", \"unix:uid:1\"]\n";
    assert_single_error(
        text,
        5,
        13,
        "entry[1] repeats entry[0] (line 1): same spiffe_id spiffe://writ.test/a and the same selectors",
    );
    let distinct = "[[entry]]\nspiffe_id = \"spiffe://writ.test/a\"\nselectors = [\"unix:uid:1\"]\n\
                    [[entry]]\nspiffe_id = \"spiffe://writ.test/a\"\nselectors = [\"unix:uid:1\", \"unix:gid:2\"]\n";
    assert_eq!(parse_ok(distinct).entries.len(), 2);
}

#[test]
fn all_errors_are_reported_in_file_order() {
    let text = "\
trust_domain = \"Bad\"
[ca]
ca_ttl = \"1y\"
[tasks]
max_depth = 0
[log]
format = \"yaml\"
[[entry]]
spiffe_id = \"spiffe://writ.test/a\"
selectors = [\"nope\"]
";
    let errors = errors(text);
    let found: Vec<_> = errors
        .iter()
        .map(|e| {
            (
                e.position().unwrap(),
                e.message().split(' ').next().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        found,
        vec![
            ((1, 16), "trust_domain".to_owned()),
            ((3, 10), "ca.ca_ttl:".to_owned()),
            ((5, 13), "tasks.max_depth".to_owned()),
            ((7, 10), "log.format".to_owned()),
            ((10, 14), "entry[0].selectors[0]:".to_owned()),
        ]
    );
}

#[test]
fn federation_defaults_and_the_default_endpoint_identity() {
    let config = parse_ok("");
    assert_eq!(config.federation, FederationConfig::default());
    assert_eq!(config.federation.min_refresh_interval, secs(30));

    let config = parse_ok(
        "trust_domain = \"example.org\"\n[federation.bundle_endpoint]\nlisten = \"127.0.0.1:8443\"\n",
    );
    let endpoint = config.federation.bundle_endpoint.unwrap();
    assert_eq!(endpoint.listen, "127.0.0.1:8443".parse().unwrap());
    assert_eq!(endpoint.refresh_hint, secs(300));
    assert_eq!(
        endpoint.profile,
        EndpointServerProfile::HttpsSpiffe {
            spiffe_id: "spiffe://example.org/writ/bundle-endpoint".parse().unwrap()
        }
    );
    // The example's endpoint and peers round-trip as well.
    let full = parse_ok(FULL);
    assert_eq!(
        parse_ok(&full.to_toml().unwrap()).federation,
        full.federation
    );
}

/// Both listeners on one port used to pass `writ validate`, and then
/// writ failed to start with "Address already in use".
#[test]
fn telemetry_and_the_bundle_endpoint_may_not_share_a_port() {
    let both = |telemetry: &str, endpoint: &str| {
        format!(
            "[telemetry]\nlisten = \"{telemetry}\"\n[federation.bundle_endpoint]\nlisten = \"{endpoint}\"\n"
        )
    };
    for (telemetry, endpoint) in [
        ("127.0.0.1:9600", "127.0.0.1:9600"),
        ("127.0.0.1:9600", "0.0.0.0:9600"),
    ] {
        assert_single_error(
            &both(telemetry, endpoint),
            2,
            10,
            "cannot both be bound; give them different ports",
        );
    }
    for (telemetry, endpoint) in [
        ("127.0.0.1:9600", "127.0.0.1:8443"),
        ("127.0.0.1:0", "127.0.0.1:0"),
        ("127.0.0.1:9600", "127.0.0.2:9600"),
    ] {
        parse_ok(&both(telemetry, endpoint));
    }
}

#[test]
fn bundle_endpoint_errors() {
    let endpoint = |body: &str| format!("[federation.bundle_endpoint]\n{body}\n");
    assert_single_error(
        &endpoint("profile = \"https_spiffe\""),
        1,
        1,
        "has no listen address",
    );
    assert_single_error(
        &endpoint("listen = \"localhost:8443\""),
        2,
        10,
        "is not an IP address and port",
    );
    assert_single_error(
        &endpoint("listen = \"127.0.0.1:1\"\nprofile = \"https\""),
        3,
        11,
        "\"https\" is unknown; use \"https_spiffe\" or \"https_web\"",
    );
    assert_single_error(
        &endpoint("listen = \"127.0.0.1:1\"\nprofile = \"https_web\"\ncert = \"/c.pem\""),
        1,
        1,
        "needs `key`",
    );
    assert_single_error(
        &endpoint("listen = \"127.0.0.1:1\"\ncert = \"/c.pem\""),
        3,
        8,
        "federation.bundle_endpoint.cert applies to profile https_web only",
    );
    assert_single_error(
        &endpoint(
            "listen = \"127.0.0.1:1\"\nprofile = \"https_web\"\ncert = \"/c\"\nkey = \"/k\"\nspiffe_id = \"spiffe://writ.test/x\"",
        ),
        6,
        13,
        "spiffe_id applies to profile https_spiffe only",
    );
    assert_single_error(
        &endpoint("listen = \"127.0.0.1:1\"\nspiffe_id = \"spiffe://other.test/x\""),
        3,
        13,
        "is in trust domain other.test, but writ's trust_domain is writ.test",
    );
    assert_single_error(
        &endpoint("listen = \"127.0.0.1:1\"\nrefresh_hint = \"1500ms\""),
        3,
        16,
        "whole number of seconds",
    );
    assert_single_error(
        "[federation]\nmin_refresh_interval = \"500ms\"\n",
        2,
        24,
        "is shorter than 1s",
    );
}

/// A port the URL parser leaves out of `port_u16` used to mean 443: the
/// fetch went to another port than the one written.
#[test]
fn a_federation_url_port_that_is_no_tcp_port_is_an_error() {
    let td = |url: &str| {
        format!(
            "[[federation.trust_domain]]\nname = \"b.test\"\nurl = \"{url}\"\nprofile = \"https_web\"\n"
        )
    };
    for (url, port) in [
        ("https://127.0.0.1:99998/", "\"99998\""),
        ("https://127.0.0.1:0/", "\"0\""),
        ("https://127.0.0.1:/", "\"\""),
    ] {
        assert_single_error(
            &td(url),
            3,
            7,
            &format!(
                "federation.trust_domain[0].url: \"{url}\" has port {port}; a port must be a number from 1 to 65535"
            ),
        );
    }
    let ok = parse_ok(&td("https://127.0.0.1:65535/"));
    assert_eq!(
        ok.federation.trust_domains[0].url,
        "https://127.0.0.1:65535/"
    );
}

#[test]
fn federated_trust_domain_errors() {
    let td = |body: &str| format!("[[federation.trust_domain]]\n{body}\n");
    let spiffe = "name = \"b.test\"\nurl = \"https://127.0.0.1:8443/\"\nprofile = \"https_spiffe\"\nendpoint_spiffe_id = \"spiffe://b.test/spire/server\"";
    // Self-serving https_spiffe needs its bootstrap bundle.
    assert_single_error(&td(spiffe), 1, 1, "needs `bundle`");
    let ok = parse_ok(&td(&format!("{spiffe}\nbundle = \"/b.json\"")));
    assert_eq!(ok.federation.trust_domains.len(), 1);
    assert!(ok.federation.trust_domains[0].follow_redirects);

    assert_single_error(
        &td("url = \"https://a/\"\nprofile = \"https_web\""),
        1,
        1,
        "has no name",
    );
    assert_single_error(
        &td("name = \"writ.test\"\nurl = \"https://a/\"\nprofile = \"https_web\""),
        2,
        8,
        "is writ's own trust domain",
    );
    assert_single_error(
        &td("name = \"b.test\"\nurl = \"http://a/\"\nprofile = \"https_web\""),
        3,
        7,
        "must use the https scheme",
    );
    assert_single_error(
        &td("name = \"b.test\"\nurl = \"https://u@a/\"\nprofile = \"https_web\""),
        3,
        7,
        "userinfo",
    );
    assert_single_error(
        &td("name = \"b.test\"\nurl = \"https://a/\""),
        1,
        1,
        "has no profile; set \"https_spiffe\" or \"https_web\" (it is never guessed",
    );
    assert_single_error(
        &td("name = \"b.test\"\nurl = \"https://a/\"\nprofile = \"https_spiffe\"\nbundle = \"/b\""),
        1,
        1,
        "needs endpoint_spiffe_id",
    );
    assert_single_error(
        &td(&format!(
            "{spiffe}\nbundle = \"/b\"\nca_bundle = \"/r.pem\""
        )),
        7,
        13,
        "ca_bundle applies to profile https_web only",
    );
    assert_single_error(
        &td(
            "name = \"b.test\"\nurl = \"https://a/\"\nprofile = \"https_web\"\nendpoint_spiffe_id = \"spiffe://b.test/x\"",
        ),
        5,
        22,
        "endpoint_spiffe_id applies to profile https_spiffe only",
    );
    assert_single_error(
        &td(
            "name = \"b.test\"\nurl = \"https://a/\"\nprofile = \"https_spiffe\"\nendpoint_spiffe_id = \"spiffe://b.test\"",
        ),
        5,
        22,
        "has no path",
    );
    assert_single_error(
        &td(
            "name = \"b.test\"\nurl = \"https://a/\"\nprofile = \"https_web\"\nbundle = \"b.json\"",
        ),
        5,
        10,
        "must be an absolute path",
    );
    // Repeating a trust domain is an error at the second one.
    let web = "name = \"b.test\"\nurl = \"https://a/\"\nprofile = \"https_web\"";
    assert_single_error(
        &format!("{}{}", td(web), td(web)),
        6,
        8,
        "repeats trust domain b.test of federation.trust_domain[0]",
    );
    // A non-self-serving endpoint needs a bundle source for its own trust
    // domain: writ's own, or another configured one.
    let via = |endpoint: &str| {
        td(&format!(
            "name = \"c.test\"\nurl = \"https://a/\"\nprofile = \"https_spiffe\"\nendpoint_spiffe_id = \"{endpoint}\""
        ))
    };
    parse_ok(&via("spiffe://writ.test/bundle-server"));
    parse_ok(&format!(
        "{}{}",
        td(web),
        via("spiffe://b.test/bundle-server")
    ));
    assert_single_error(
        &via("spiffe://d.test/bundle-server"),
        5,
        22,
        "which writ has no bundle source for",
    );
}

#[test]
fn telemetry_is_off_by_default_and_loopback_only_unless_allowed() {
    assert_eq!(parse_ok("").telemetry, TelemetryConfig::default());
    assert_eq!(parse_ok("").telemetry.listen, None);
    let local = parse_ok("[telemetry]\nlisten = \"127.0.0.1:9600\"\n");
    assert_eq!(
        local.telemetry.listen,
        Some("127.0.0.1:9600".parse().unwrap())
    );
    assert!(!local.telemetry.allow_remote);
    assert_single_error(
        "[telemetry]\nlisten = \"0.0.0.0:9600\"\n",
        2,
        10,
        "not a loopback address",
    );
    let remote = parse_ok("[telemetry]\nlisten = \"0.0.0.0:9600\"\nallow_remote = true\n");
    assert_eq!(
        remote.telemetry.listen,
        Some("0.0.0.0:9600".parse().unwrap())
    );
    assert_single_error(
        "[telemetry]\nlisten = \"localhost:9600\"\n",
        2,
        10,
        "not an IP address and port",
    );
    assert_single_error(
        "[telemetry]\nlisten = \"127.0.0.1:9600\"\nport = 1\n",
        3,
        1,
        "unknown field",
    );
}

/// Errors `text` has as a reload of a writ running `running`.
fn reload_errors(text: &str, running: &Config) -> Vec<String> {
    let origin = Path::new(ORIGIN);
    parse_ok(text);
    match build::build(text, origin, &alice(), Some(running)) {
        Ok(_) => Vec::new(),
        Err(errors) => errors.iter().map(ConfigError::to_string).collect(),
    }
}

#[test]
fn a_reload_checks_what_it_applies_against_the_running_restart_only_settings() {
    let running = parse_ok("trust_domain = \"probe.test\"\n[ca]\nca_ttl = \"2h\"\n");
    // Valid as written, but its entries and peers suit only the new trust
    // domain, which a reload would not put in force.
    let moved = "trust_domain = \"probe-x.test\"\n\
                 [[federation.trust_domain]]\nname = \"probe.test\"\nurl = \"https://p.example/\"\nprofile = \"https_web\"\n\
                 [[entry]]\nspiffe_id = \"spiffe://probe-x.test/root\"\nselectors = [\"unix:uid:0\"]\nfederates_with = [\"probe.test\"]\n";
    let errors = reload_errors(moved, &running);
    assert_eq!(errors.len(), 3, "{errors:#?}");
    assert!(
        errors[0].starts_with(&format!("{ORIGIN}:3:8: federation.trust_domain[0].name probe.test is the trust domain writ is running in")),
        "{errors:#?}"
    );
    assert!(
        errors[1].starts_with(&format!("{ORIGIN}:7:13: entry[0].spiffe_id spiffe://probe-x.test/root is in trust domain probe-x.test, but writ's running trust_domain is probe.test (a changed trust_domain takes effect only when writ restarts")),
        "{errors:#?}"
    );
    assert!(
        errors[2].contains(
            "entry[0].federates_with[0] names probe.test, the trust domain writ is running in"
        ),
        "{errors:#?}"
    );

    // An entry may not outlive the running CA, whatever the file's says.
    let longer = "trust_domain = \"probe.test\"\n[ca]\nca_ttl = \"4h\"\n\
                  [[entry]]\nspiffe_id = \"spiffe://probe.test/a\"\nselectors = [\"unix:uid:0\"]\nx509_svid_ttl = \"3h\"\n";
    let errors = reload_errors(longer, &running);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(
        errors[0].contains(
            ":7:17: entry[0].x509_svid_ttl (3h) is longer than the running ca.ca_ttl (2h)"
        ),
        "{errors:#?}"
    );

    // Restart-only changes that nothing reloadable depends on are no error.
    let telemetry = "trust_domain = \"probe.test\"\n[ca]\nca_ttl = \"4h\"\n[telemetry]\nlisten = \"127.0.0.1:9600\"\n\
                     [[entry]]\nspiffe_id = \"spiffe://probe.test/a\"\nselectors = [\"unix:uid:0\"]\n";
    assert_eq!(reload_errors(telemetry, &running), Vec::<String>::new());
}

#[test]
fn an_audit_path_on_one_of_writs_own_files_is_refused_naming_both() {
    let config = |path: &str| format!("data_dir = \"/srv/w\"\n[audit]\npath = \"{path}\"\n");
    for (path, names) in [
        ("/srv/w/writ.db", "is writ's store (/srv/w/writ.db"),
        ("/srv/w/writ.db-wal", "is writ's store (/srv/w/writ.db"),
        ("/srv/w/writ.db-shm", "is writ's store (/srv/w/writ.db"),
        ("/srv/w/./x/../writ.db", "is writ's store (/srv/w/writ.db"),
        (
            "/srv/w/ca/state.json",
            "inside writ's CA directory /srv/w/ca",
        ),
        (
            "/srv/w/ca/audit.jsonl",
            "inside writ's CA directory /srv/w/ca",
        ),
        (
            "/srv/w/writ.lock",
            "is the state directory's lock /srv/w/writ.lock",
        ),
        ("/srv/w/writ", "trail's lock file at /srv/w/writ.lock"),
        ("/srv/w", "is the data_dir /srv/w itself"),
    ] {
        assert_single_error(&config(path), 3, 8, names);
        assert_single_error(&config(path), 3, 8, path);
        assert_single_error(
            &config(path),
            3,
            8,
            "the audit trail needs a file of its own",
        );
    }
    for fine in [
        "/srv/w/audit/audit.jsonl",
        "/srv/w/writ.db.audit",
        "/srv/w/cafe/audit.jsonl",
        "/srv/other/writ.db",
    ] {
        assert_eq!(parse_ok(&config(fine)).audit.path, Path::new(fine));
    }
}

/// Federated peers accept writ's bundle from whoever presents the bundle
/// endpoint's SPIFFE ID, so no config entry may give it to a workload: the
/// configured one, and the default one whether or not the endpoint is on.
#[test]
fn no_entry_may_take_the_bundle_endpoint_identity() {
    let entry =
        |id: &str| format!("[[entry]]\nspiffe_id = \"{id}\"\nselectors = [\"unix:uid:0\"]\n");
    let reason = "is reserved for writ's federation bundle endpoint";
    let default_id = "spiffe://writ.test/writ/bundle-endpoint";
    // No endpoint configured: the default is reserved all the same.
    assert_single_error(
        &entry(default_id),
        2,
        13,
        &format!("entry[0].spiffe_id {default_id} {reason}"),
    );
    let endpoint = |id: &str| {
        format!("[federation.bundle_endpoint]\nlisten = \"127.0.0.1:8443\"\nspiffe_id = \"{id}\"\n")
    };
    let custom = "spiffe://writ.test/edge/bundles";
    let with_custom = endpoint(custom);
    assert_single_error(
        &format!("{}{with_custom}", entry(custom)),
        2,
        13,
        &format!("entry[0].spiffe_id {custom} {reason}"),
    );
    assert_single_error(
        &format!("{}{with_custom}", entry(default_id)),
        2,
        13,
        &format!("entry[0].spiffe_id {default_id} {reason}"),
    );
    // Exactly those IDs: below or beside them is anyone's.
    parse_ok(&format!(
        "{}{}{with_custom}",
        entry("spiffe://writ.test/writ/bundle-endpoint/x"),
        entry("spiffe://writ.test/edge/bundles-2")
    ));

    // A reload keeps the running endpoint (and its identity) until a
    // restart, so an entry may not take that one either.
    let running = parse_ok(&endpoint(custom));
    let errors = reload_errors(&entry(custom), &running);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(
        errors[0].starts_with(&format!(
            "{ORIGIN}:2:13: entry[0].spiffe_id {custom} {reason}"
        )),
        "{errors:#?}"
    );
}
