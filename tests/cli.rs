//! The `writ` command line against a real agent: quick start on built-in
//! defaults, config validation, fetching and writing SVIDs, bundles, entries.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{NOBODY, WRIT, Writ, is_root, writ_cli};
use writ::bundle::TrustBundle;
use writ::proto::admin as apb;
use writ::spiffe_id::TrustDomain;

/// Runs the writ CLI with `args`: its exit status, stdout and stderr.
fn writ_output(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(WRIT).args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

fn entry_for_us() -> String {
    format!(
        "[[entry]]\nspiffe_id = \"spiffe://writ.test/cli\"\nselectors = [\"unix:uid:{}\"]\nhint = \"cli\"\n",
        uid()
    )
}

fn admin(writ: &Writ) -> String {
    writ.dir.path().join("run/admin.sock").display().to_string()
}

#[test]
fn quick_start_runs_on_built_in_defaults_without_root() {
    if !is_root() {
        eprintln!("SKIPPED: needs root to switch to an unprivileged user for this test");
        return;
    }
    // A fresh unprivileged user environment: no config file, nothing set up.
    let home = tempfile::Builder::new()
        .prefix("writ-home-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(home.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let runtime = home.path().join("run");
    std::fs::create_dir(&runtime).unwrap();
    std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o700)).unwrap();
    nix::unistd::chown(&runtime, Some(NOBODY.into()), Some(NOBODY.into())).unwrap();
    let env = |cmd: &mut Command| {
        cmd.env_clear()
            .env("HOME", home.path())
            .env("XDG_RUNTIME_DIR", &runtime)
            .env("PATH", "/usr/bin:/bin")
            .uid(NOBODY)
            .gid(NOBODY);
    };
    let mut run = Command::new(WRIT);
    run.arg("run").stdout(Stdio::piped()).stderr(Stdio::null());
    env(&mut run);
    let mut agent = run.spawn().unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut stdout = agent.stdout.take().unwrap();
    let _agent = Kill(agent);
    let socket = runtime.join("writ/workload.sock");
    let fetched = common::wait_for(Duration::from_secs(20), "quick-start agent", || {
        let mut fetch = Command::new(WRIT);
        fetch.args(["api", "fetch", "x509", "--output", "json"]);
        env(&mut fetch);
        let out = fetch.output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    });
    let svids: serde_json::Value = serde_json::from_str(&fetched).unwrap();
    assert_eq!(svids[0]["spiffe_id"], "spiffe://writ.test/user/nobody");
    // It said where it listens, and keeps its state in the user's XDG dir.
    let mut banner = [0u8; 512];
    let n = std::io::Read::read(&mut stdout, &mut banner).unwrap();
    let banner = String::from_utf8_lossy(&banner[..n]);
    assert!(banner.contains(&socket.display().to_string()), "{banner}");
    assert!(home.path().join(".local/state/writ/ca").is_dir());

    // With no config file there is nothing to reload, and that is no error.
    let mut reload = Command::new(WRIT);
    reload.args(["reload", "--output", "json"]);
    env(&mut reload);
    let out = reload.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["reloaded"], false, "{summary}");
    assert!(
        summary["notes"][0]
            .as_str()
            .is_some_and(|n| n.contains("built-in defaults")),
        "{summary}"
    );
}

#[test]
fn validate_reports_errors_with_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "trust_domain = \"example.org\"\n\n[[entry]]\nspiffe_id = \"spiffe://other.org/x\"\nselectors = [\"unix:1000\"]\n",
    )
    .unwrap();
    let (ok, _, stderr) = writ_cli(&["validate", "--config", bad.to_str().unwrap()], None);
    assert!(!ok);
    let path = bad.display().to_string();
    assert!(stderr.contains(&format!("{path}:4:13:")), "{stderr}");
    assert!(stderr.contains(&format!("{path}:5:14:")), "{stderr}");
    assert!(stderr.contains("2 error(s)"), "{stderr}");

    // The example is valid, and names policy and federation files that
    // must exist where it is deployed: here, under a temp dir.
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let example = std::fs::read_to_string(repo.join("examples/writ.toml")).unwrap();
    let etc = dir.path().join("etc/writ");
    let deployed = dir.path().join("writ.toml");
    std::fs::write(
        &deployed,
        example.replace("/etc/writ/", &format!("{}/", etc.display())),
    )
    .unwrap();
    let deployed = deployed.to_str().unwrap();
    let (ok, _, stderr) = writ_cli(&["validate", "--config", deployed], None);
    assert!(!ok);
    assert!(stderr.contains("3 error(s) in the files"), "{stderr}");
    assert!(
        stderr.contains(&format!("{}/policies/agents.cedar", etc.display())),
        "{stderr}"
    );
    for (from, to) in [
        ("policy/examples/baseline.cedar", "policies/agents.cedar"),
        (
            "src/bundle/testdata/spire-cli-test-bundle.json",
            "federation/partner.example.json",
        ),
        (
            "src/bundle/testdata/rsa2048-ca.pem",
            "federation/web-roots.pem",
        ),
    ] {
        std::fs::create_dir_all(etc.join(to).parent().unwrap()).unwrap();
        std::fs::copy(repo.join(from), etc.join(to)).unwrap();
    }
    let (ok, stdout, stderr) = writ_cli(&["validate", "--config", deployed], None);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("OK"));
}

/// What `writ run` would refuse in the files a config names, `writ
/// validate` refuses too, without starting anything.
#[test]
fn validate_checks_the_files_a_config_names() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("writ.toml");
    let state = dir.path().join("state");
    let validate = |body: &str| {
        std::fs::write(
            &config,
            format!("data_dir = \"{}\"\n{body}", state.display()),
        )
        .unwrap();
        writ_cli(&["validate", "--config", config.to_str().unwrap()], None)
    };

    let missing = dir.path().join("missing.cedar");
    let (ok, _, stderr) = validate(&format!("[policy]\nfiles = [\"{}\"]\n", missing.display()));
    assert!(!ok);
    assert!(
        stderr.contains(&format!("{}: cannot read policy file", missing.display())),
        "{stderr}"
    );

    let bad = dir.path().join("bad.cedar");
    std::fs::write(
        &bad,
        "@id(\"x\")\npermit (principal, action, resource) when { principal.foo == \"a\" };\n",
    )
    .unwrap();
    let (ok, _, stderr) = validate(&format!("[policy]\nfiles = [\"{}\"]\n", bad.display()));
    assert!(!ok);
    assert!(
        stderr.contains(&format!("{}:2:", bad.display())) && stderr.contains("`foo`"),
        "{stderr}"
    );

    let (ok, _, stderr) = validate(&format!(
        "[ca.upstream]\ncert = \"{0}/cert.pem\"\nkey = \"{0}/key.pem\"\nbundle = \"{0}/roots.pem\"\n",
        dir.path().display()
    ));
    assert!(!ok);
    assert!(
        stderr.contains(&format!("{}/cert.pem", dir.path().display())),
        "{stderr}"
    );
    assert!(stderr.contains("1 error(s)"), "{stderr}");
    // A certificate file anyone may write is refused before it is parsed:
    // whoever can write it chooses what writ trusts and publishes.
    let cert = dir.path().join("cert.pem");
    std::fs::write(&cert, "not even PEM").unwrap();
    std::fs::set_permissions(&cert, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (ok, _, stderr) = validate(&format!(
        "[ca.upstream]\ncert = \"{0}/cert.pem\"\nkey = \"{0}/key.pem\"\nbundle = \"{0}/roots.pem\"\n",
        dir.path().display()
    ));
    assert!(!ok);
    assert!(
        stderr.contains(&format!(
            "{} has mode 0666, writable by group or others",
            cert.display()
        )),
        "{stderr}"
    );

    // A good policy passes, and nothing was created along the way.
    std::fs::write(&bad, "permit (principal, action, resource);\n").unwrap();
    let (ok, stdout, stderr) = validate(&format!("[policy]\nfiles = [\"{}\"]\n", bad.display()));
    assert!(ok && stdout.contains("OK"), "{stderr}");
    assert!(!state.exists());
}

#[test]
fn fetch_writes_svid_key_and_bundle_files() {
    let writ = Writ::start(&entry_for_us());
    let out = writ.dir.path().join("out");
    let endpoint = writ.endpoint();
    let fetch_into_out = [
        "api",
        "fetch",
        "x509",
        "--socket",
        &endpoint,
        "--write",
        out.to_str().unwrap(),
    ];
    let (ok, stdout, stderr) =
        writ_cli(&[&fetch_into_out[..], &["--output", "json"]].concat(), None);
    assert!(ok, "{stderr}");
    let svids: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(svids[0]["spiffe_id"], "spiffe://writ.test/cli");
    assert_eq!(svids[0]["hint"], "cli");
    let key_mode = std::fs::metadata(out.join("svid.0.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(key_mode, 0o600);
    let chain = pem::parse_many(std::fs::read(out.join("svid.0.pem")).unwrap()).unwrap();
    assert_eq!(chain[0].tag(), "CERTIFICATE");
    let key = pem::parse(std::fs::read(out.join("svid.0.key")).unwrap()).unwrap();
    assert_eq!(key.tag(), "PRIVATE KEY");
    let bundle = pem::parse_many(std::fs::read(out.join("bundle.0.pem")).unwrap()).unwrap();
    assert!(!bundle.is_empty());
    // The files hold a usable identity: the spiffe crate accepts them.
    spiffe::X509Svid::parse_from_der(chain[0].contents(), key.contents()).unwrap();

    // Whatever was at the files' paths is replaced, never written through:
    // a key file left readable by all, a symlink to another file, a named
    // pipe (which no reader ever opens) all give way to new files.
    std::fs::set_permissions(
        out.join("svid.0.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let elsewhere = writ.dir.path().join("elsewhere");
    std::fs::write(&elsewhere, "untouched").unwrap();
    std::fs::remove_file(out.join("bundle.0.pem")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, out.join("bundle.0.pem")).unwrap();
    std::fs::remove_file(out.join("svid.0.pem")).unwrap();
    nix::unistd::mkfifo(
        &out.join("svid.0.pem"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    let mut again = Command::new(WRIT)
        .args(fetch_into_out)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let finished = loop {
        if let Some(status) = again.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            again.kill().unwrap();
            again.wait().unwrap();
            panic!("the fetch hangs (writing into the named pipe?)");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(finished.success());
    let mode = |name: &str| {
        let meta = std::fs::symlink_metadata(out.join(name)).unwrap();
        (
            meta.file_type().is_file(),
            meta.permissions().mode() & 0o777,
        )
    };
    assert_eq!(mode("svid.0.key"), (true, 0o600));
    assert_eq!(mode("svid.0.pem"), (true, 0o644));
    assert_eq!(mode("bundle.0.pem"), (true, 0o644));
    assert_eq!(std::fs::read_to_string(&elsewhere).unwrap(), "untouched");
    pem::parse_many(std::fs::read(out.join("svid.0.pem")).unwrap()).unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|name| name.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // SPIFFE_ENDPOINT_SOCKET is honoured when --socket is absent.
    let out = Command::new(WRIT)
        .args(["api", "fetch", "x509"])
        .env("SPIFFE_ENDPOINT_SOCKET", writ.endpoint())
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("spiffe://writ.test/cli"));
    // An empty one is unset: writ's default socket, where no writ listens
    // here (unless one runs on this machine).
    let out = Command::new(WRIT)
        .args(["api", "fetch", "x509"])
        .env("SPIFFE_ENDPOINT_SOCKET", "")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let default = writ::config::Config::builtin_defaults(&writ::config::Environment::current())
        .workload_api
        .socket_path;
    assert!(
        out.status.success() || stderr.contains(&default.display().to_string()),
        "{stderr}"
    );
    // The unix URI is a path and nothing more (SPIFFE Workload Endpoint).
    let out = Command::new(WRIT)
        .args(["api", "fetch", "x509"])
        .env("SPIFFE_ENDPOINT_SOCKET", format!("{}?x=1", writ.endpoint()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.starts_with("writ: SPIFFE_ENDPOINT_SOCKET: socket address")
            && stderr.contains("has a query (\"x=1\")"),
        "{stderr}"
    );

    // A refusal names the call, the status code and writ's reason, as the
    // admin commands do.
    let (ok, _, stderr) = writ_cli(
        &[
            "api",
            "fetch",
            "jwt",
            "--audience",
            "",
            "--socket",
            &writ.endpoint(),
        ],
        None,
    );
    assert!(!ok);
    assert_eq!(
        stderr.trim(),
        "writ: FetchJWTSVID: InvalidArgument: audience values must not be empty"
    );

    // A huge value is shown shortened: copied whole into the status, it
    // passed the client's header limit and came back as a protocol error.
    let huge = format!("spiffe://writ.test/{}", "q".repeat(20_000));
    let socket = writ.endpoint();
    let (ok, _, stderr) = writ_cli(
        &[
            "api",
            "fetch",
            "jwt",
            "--audience",
            "x",
            "--spiffe-id",
            &huge,
            "--socket",
            &socket,
        ],
        None,
    );
    assert!(!ok);
    assert!(
        stderr.contains("FetchJWTSVID: InvalidArgument: spiffe_id") && stderr.len() < 1024,
        "{}",
        &stderr[..stderr.len().min(300)]
    );
}

#[test]
fn healthcheck_tells_serving_from_absent() {
    let mut writ = Writ::start(&entry_for_us());
    let (ok, stdout, _) = writ_cli(&["healthcheck", "--socket", &writ.endpoint()], None);
    assert!(ok && stdout.contains("serving"));
    assert!(writ.stop().success(), "SIGTERM must stop writ cleanly");
    assert!(!writ.socket.exists(), "writ must remove its socket on stop");
    let (ok, _, _) = writ_cli(&["healthcheck", "--socket", &writ.endpoint()], None);
    assert!(!ok);
}

/// A stopped (or wedged) agent accepts connections but answers nothing: the
/// socket-mode health check used to wait forever, stalling whatever probed.
#[test]
fn healthcheck_gives_up_on_an_agent_that_does_not_answer() {
    let writ = Writ::start(&entry_for_us());
    let pid = nix::unistd::Pid::from_raw(writ.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let started = std::time::Instant::now();
    let (ok, _, stderr) = writ_cli(
        &[
            "healthcheck",
            "--socket",
            &writ.endpoint(),
            "--timeout",
            "1s",
        ],
        None,
    );
    let waited = started.elapsed();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert!(!ok, "a stopped agent passed the health check");
    assert!(stderr.contains("did not answer within 1s"), "{stderr}");
    assert!(waited < Duration::from_secs(30), "waited {waited:?}");
    let (ok, _, stderr) = writ_cli(&["healthcheck", "--timeout", "0s"], None);
    assert!(!ok && stderr.contains("more than zero"), "{stderr}");
}

/// `writ healthcheck --output json` prints one object naming the socket (or
/// the HTTP listener) and its status; a failure is the JSON error object
/// on stderr. The exit statuses are those of text output: 0 serving, 1
/// not, 2 for a usage mistake.
#[test]
fn healthcheck_json_output_names_the_socket_and_its_status() {
    use std::io::{Read, Write};
    let run = writ_output;
    let mut writ = Writ::start(&entry_for_us());
    let socket = writ.socket.display().to_string();
    let probe = ["healthcheck", "--socket", &socket, "--output", "json"];
    let (code, stdout, stderr) = run(&probe);
    assert_eq!(code, Some(0), "{stderr}");
    let status: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        status,
        serde_json::json!({"socket": socket, "serving": true, "status": "SERVING"})
    );
    assert!(writ.stop().success());
    let (code, stdout, stderr) = run(&probe);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(stdout, "");
    let failure: serde_json::Value = serde_json::from_str(&stderr).unwrap();
    assert!(
        failure["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(&socket)),
        "{failure}"
    );
    assert_eq!(failure["error"].get("code"), None, "{failure}");
    let (code, _, stderr) = run(&probe[..3]);
    assert_eq!(code, Some(1), "{stderr}");
    let (code, _, stderr) = run(&["healthcheck", "--timeout", "0s", "--output", "json"]);
    assert_eq!(code, Some(2), "{stderr}");

    // With --http, against a listener that answers once as /ready would.
    let answer_once = |response: &'static str| {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request);
            stream.write_all(response.as_bytes()).unwrap();
        });
        (addr, server)
    };
    let (addr, server) = answer_once("HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nready\n");
    let (code, stdout, stderr) = run(&["healthcheck", "--http", &addr, "--output", "json"]);
    server.join().unwrap();
    assert_eq!(code, Some(0), "{stderr}");
    let ready: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        ready,
        serde_json::json!({"http": format!("http://{addr}"), "ready": true, "status": 200})
    );
    let (addr, server) = answer_once(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 22\r\n\r\nnot ready:\n- stopping\n",
    );
    let (code, stdout, stderr) = run(&["healthcheck", "--http", &addr, "--output", "json"]);
    server.join().unwrap();
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(stdout, "");
    let failure: serde_json::Value = serde_json::from_str(&stderr).unwrap();
    assert!(
        failure["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("is not ready (HTTP 503)")),
        "{failure}"
    );
}

/// A health check answered with anything but SERVING names the status as
/// the health protocol does, in the message and, with `--output json`, as
/// members of the error object; it used to say only `(status 2)`.
#[tokio::test(flavor = "multi_thread")]
async fn a_healthcheck_that_is_not_serving_names_its_status() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("health.sock");
    let (reporter, service) = tonic_health::server::health_reporter();
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );
    let path = socket.display().to_string();
    for (status, name) in [
        (tonic_health::ServingStatus::NotServing, "NOT_SERVING"),
        (tonic_health::ServingStatus::Unknown, "UNKNOWN"),
    ] {
        reporter.set_service_status("", status).await;
        let probe = |output: &'static str| {
            tokio::process::Command::new(WRIT)
                .args(["healthcheck", "--socket", &path, "--output", output])
                .output()
        };
        let message = format!("writ at {path} is not serving ({name})");
        let text = probe("text").await.unwrap();
        assert_eq!(text.status.code(), Some(1), "{text:?}");
        assert_eq!(
            String::from_utf8_lossy(&text.stderr),
            format!("writ: {message}\n")
        );
        let json = probe("json").await.unwrap();
        assert_eq!(json.status.code(), Some(1), "{json:?}");
        assert!(json.stdout.is_empty(), "{json:?}");
        let failure: serde_json::Value = serde_json::from_slice(&json.stderr).unwrap();
        assert_eq!(
            failure,
            serde_json::json!({"error": {
                "message": message,
                "serving": false,
                "status": name,
            }})
        );
    }
    server.abort();
}

/// A usage error is plain text with exit status 2, or, when the command
/// line asks for `--output json`, one JSON error object on stderr (still
/// status 2, nothing on stdout); help is help either way.
#[test]
fn usage_errors_follow_output_json() {
    let run = writ_output;
    let (code, stdout, stderr) = run(&["task", "get", "--output", "json"]);
    assert_eq!((code, stdout.as_str()), (Some(2), ""), "{stderr}");
    let failure: serde_json::Value = serde_json::from_str(&stderr).unwrap();
    assert_eq!(
        failure["error"]["message"], "the following required arguments were not provided: <ID>",
        "{failure}"
    );
    assert!(
        failure["error"]["usage"]
            .as_str()
            .is_some_and(|u| u.starts_with("writ task get ")),
        "{failure}"
    );
    let (code, _, stderr) = run(&["entry", "list", "--output=json", "--bogus"]);
    assert_eq!(code, Some(2), "{stderr}");
    let failure: serde_json::Value = serde_json::from_str(&stderr).unwrap();
    assert_eq!(
        failure["error"]["message"],
        "unexpected argument '--bogus' found"
    );

    let (code, stdout, stderr) = run(&["task", "get"]);
    assert_eq!((code, stdout.as_str()), (Some(2), ""));
    assert!(
        stderr.starts_with("error: the following required arguments"),
        "{stderr}"
    );
    let (code, stdout, stderr) = run(&["task", "get", "--help", "--output", "json"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("Usage: writ task get"), "{stdout}");
}

/// A closed stderr (`2>&-`, or `2>&1 >/dev/null | true`) changes no exit
/// status: what the CLI would have said there (a warning, the failure) is
/// dropped. `eprintln!` used to panic on it, exiting 101 even after a
/// health check that passed.
#[test]
fn a_closed_stderr_changes_no_exit_status() {
    let writ = Writ::start(&entry_for_us());
    let absent = writ.dir.path().join("run/absent.sock");
    for output in ["text", "json"] {
        let probe = |socket: &Path| {
            // A plain path in the variable, so that writ warns before it
            // answers; a relative one, as in the report.
            let (reader, writer) = std::io::pipe().unwrap();
            drop(reader);
            Command::new(WRIT)
                .args(["healthcheck", "--output", output])
                .current_dir(writ.dir.path())
                .env(
                    "SPIFFE_ENDPOINT_SOCKET",
                    socket.strip_prefix(writ.dir.path()).unwrap(),
                )
                .stdout(Stdio::null())
                .stderr(writer)
                .status()
                .unwrap()
        };
        assert_eq!(probe(&writ.socket).code(), Some(0), "--output {output}");
        assert_eq!(probe(&absent).code(), Some(1), "--output {output}");
    }
}

/// Watch follows the health-checking protocol: a served service streams
/// its status; one writ does not serve gets SERVICE_UNKNOWN and the call
/// stays open (grpc-go's client-side health checking watches), while Check
/// answers NotFound for it.
#[tokio::test(flavor = "multi_thread")]
async fn health_watch_of_an_unknown_service_says_so_and_stays_open() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let writ = Writ::start(&entry_for_us());
    let channel = writ::cli::client::connect(&writ.socket).await.unwrap();
    let mut health = HealthClient::new(channel);
    let watch = |service: &str| HealthCheckRequest {
        service: service.to_owned(),
    };
    let mut served = health
        .watch(watch("SpiffeWorkloadAPI"))
        .await
        .unwrap()
        .into_inner();
    let first = served.message().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);

    let mut unknown = health
        .watch(watch("spiffe.workload.SpiffeWorkloadAPI"))
        .await
        .unwrap()
        .into_inner();
    let first = unknown.message().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::ServiceUnknown as i32);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), unknown.message())
            .await
            .is_err(),
        "the watch stays open after SERVICE_UNKNOWN"
    );
    let checked = health
        .check(watch("spiffe.workload.SpiffeWorkloadAPI"))
        .await
        .unwrap_err();
    assert_eq!(checked.code(), tonic::Code::NotFound);

    // Neither watch holds writ's shutdown to its drain deadline: both end
    // as it begins to stop.
    let mut writ = writ;
    let stopped = tokio::task::spawn_blocking(move || {
        let status = writ.stop();
        (status, writ.log())
    });
    for stream in [&mut served, &mut unknown] {
        while let Ok(Some(_)) = stream.message().await {}
    }
    let (status, log) = stopped.await.unwrap();
    assert!(status.success(), "{log}");
    assert!(!log.contains("connections still open"), "{log}");
}

/// ListBundles answers in pages bounded in bytes, as ListTasks and
/// ListEntries do: foreign bundles are as large as their peers make them
/// (up to 1 MiB each), and a handful of large ones made `writ bundle list`
/// fail for everyone past the 4 MiB clients accept.
#[tokio::test(flavor = "multi_thread")]
async fn bundle_listings_come_in_pages_clients_accept() {
    use apb::bundles_client::BundlesClient;
    let writ = Writ::start(&entry_for_us());
    let a = admin(&writ);
    let dir = tempfile::tempdir().unwrap();
    let ca_pem = || {
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().pem()
    };
    let names: Vec<String> = (0..6).map(|n| format!("big{n}.test")).collect();
    for name in &names {
        let pem: String = (0..600).map(|_| ca_pem()).collect();
        let file = dir.path().join(name);
        std::fs::write(&file, pem).unwrap();
        let (ok, _, stderr) = writ_cli(
            &[
                "bundle",
                "set",
                "--trust-domain",
                name,
                "--file",
                file.to_str().unwrap(),
                "--admin-socket",
                &a,
            ],
            None,
        );
        assert!(ok, "{stderr}");
    }
    let channel = writ::cli::client::connect(Path::new(&a)).await.unwrap();
    let mut client = BundlesClient::new(channel);
    let (mut listed, mut pages, mut token) = (Vec::new(), 0, String::new());
    loop {
        let page = client
            .list_bundles(apb::ListBundlesRequest {
                page_size: 0,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(
            prost::Message::encoded_len(&page) < 4 << 20,
            "page {pages} is {} bytes",
            prost::Message::encoded_len(&page)
        );
        listed.extend(page.bundles.into_iter().map(|b| b.trust_domain));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert!(pages > 1, "{pages} page(s)");
    let mut expected = vec!["writ.test".to_owned()];
    expected.extend(names.iter().cloned());
    assert_eq!(listed, expected);
    // `writ bundle list` follows the pages.
    let (ok, out, stderr) = writ_cli(&["bundle", "list", "--admin-socket", &a], None);
    assert!(ok, "{stderr}");
    assert!(names.iter().all(|n| out.contains(n.as_str())), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bundle_show_matches_what_workloads_receive() {
    let writ = Writ::start(&entry_for_us());
    let (ok, json, stderr) = writ_cli(
        &[
            "bundle",
            "show",
            "--format",
            "spiffe",
            "--admin-socket",
            &admin(&writ),
        ],
        None,
    );
    assert!(ok, "{stderr}");
    let doc =
        TrustBundle::from_spiffe_json(TrustDomain::new("writ.test").unwrap(), json.as_bytes())
            .unwrap();
    assert!(doc.sequence >= 1);
    let (ok, pem_text, _) = writ_cli(&["bundle", "show", "--admin-socket", &admin(&writ)], None);
    assert!(ok);
    let from_pem =
        TrustBundle::from_pem(TrustDomain::new("writ.test").unwrap(), &pem_text).unwrap();
    assert_eq!(from_pem.x509_authorities, doc.x509_authorities);
    // `--output json` prints JSON (it used to print the PEM text).
    let (ok, out, stderr) = writ_cli(
        &[
            "bundle",
            "show",
            "--admin-socket",
            &admin(&writ),
            "--output",
            "json",
        ],
        None,
    );
    assert!(ok, "{stderr}");
    let shown: serde_json::Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("bundle show --output json is not JSON ({e}): {out}"));
    assert_eq!(shown["trust_domain"], "writ.test");
    assert_eq!(shown["pem"], pem_text.as_str());
    assert_eq!(
        serde_json::to_vec(&shown["bundle"]).unwrap(),
        serde_json::to_vec(&serde_json::from_str::<serde_json::Value>(&json).unwrap()).unwrap()
    );

    let source = spiffe::X509Source::builder()
        .endpoint(writ.endpoint())
        .build()
        .await
        .unwrap();
    let served = source.bundle_set().unwrap();
    let td = spiffe::TrustDomain::new("writ.test").unwrap();
    let served: Vec<Vec<u8>> = served
        .get(&td)
        .unwrap()
        .authorities()
        .iter()
        .map(|c| c.as_ref().to_vec())
        .collect();
    let shown: Vec<Vec<u8>> = doc.x509_authorities.iter().map(|c| c.to_vec()).collect();
    assert_eq!(served, shown);
    source.shutdown().await;
}

#[test]
fn entries_created_at_run_time_issue_identities_and_survive_restart() {
    let mut writ = Writ::start(&entry_for_us());
    let a = admin(&writ);
    let (ok, id, stderr) = writ_cli(
        &[
            "entry",
            "create",
            "--admin-socket",
            &a,
            "--spiffe-id",
            "spiffe://writ.test/extra",
            "--selector",
            &format!("unix:uid:{}", uid()),
            "--hint",
            "extra",
        ],
        None,
    );
    assert!(ok, "{stderr}");
    let id = id.trim().to_string();
    let fetch = |w: &Writ| {
        let (ok, out, err) = writ_cli(
            &[
                "api",
                "fetch",
                "x509",
                "--socket",
                &w.endpoint(),
                "--output",
                "json",
            ],
            None,
        );
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s["spiffe_id"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        fetch(&writ),
        vec!["spiffe://writ.test/cli", "spiffe://writ.test/extra"]
    );

    // Bad input is refused with the field named, and nothing is stored.
    let our_uid = format!("unix:uid:{}", uid());
    let our_entry_with_ttl = |ttl| {
        vec![
            "--spiffe-id",
            "spiffe://writ.test/y",
            "--selector",
            our_uid.as_str(),
            "--x509-svid-ttl",
            ttl,
        ]
    };
    for (args, field) in [
        (
            vec![
                "--spiffe-id",
                "spiffe://other.test/x",
                "--selector",
                "unix:uid:1",
            ],
            "spiffe_id",
        ),
        (
            vec![
                "--spiffe-id",
                "spiffe://writ.test/y",
                "--selector",
                "unix:1",
            ],
            "selectors",
        ),
        (
            vec![
                "--spiffe-id",
                "spiffe://writ.test/y",
                "--selector",
                "unix:uid:1",
                "--x509-svid-ttl",
                "0s",
            ],
            "x509_svid_ttl",
        ),
        (
            vec![
                "--spiffe-id",
                "spiffe://writ.test/y",
                "--selector",
                "unix:uid:1",
                "--dns-name",
                "a_b",
            ],
            "dns_names",
        ),
        // Certificates live whole seconds: under a second no SVID could be
        // minted for any workload the entry matches, and a fraction would
        // be lost when the entry is stored.
        (our_entry_with_ttl("500ms"), "x509_svid_ttl"),
        (our_entry_with_ttl("1s500ms"), "x509_svid_ttl"),
        // A selector no attestor produces could match no process at all.
        (
            vec![
                "--spiffe-id",
                "spiffe://writ.test/y",
                "--selector",
                "unix:usr:root",
            ],
            "no key \"usr\"",
        ),
        (
            vec![
                "--spiffe-id",
                "spiffe://writ.test/y",
                "--selector",
                "k8s:ns:default",
            ],
            "no attestor produces type \"k8s\"",
        ),
        // Writ's own trust domain is no federation, as in the config.
        (
            vec![
                "--spiffe-id",
                "spiffe://writ.test/y",
                "--selector",
                our_uid.as_str(),
                "--federates-with",
                "spiffe://writ.test",
            ],
            "federates_with: names writ's own trust domain writ.test",
        ),
        // Nor a value of a form no attestor writes (uids are numbers).
        (
            vec![
                "--spiffe-id",
                "spiffe://writ.test/y",
                "--selector",
                "unix:uid:root",
            ],
            "a unix:uid value is a decimal number",
        ),
        (
            vec![
                "--spiffe-id",
                "spiffe://writ.test/y",
                "--selector",
                "unix:uid:4294967296",
            ],
            "4294967296 is out of range for a unix:uid value (ids are at most 4294967295)",
        ),
        // Nor a path in a form the kernel never writes.
        (
            vec![
                "--spiffe-id",
                "spiffe://writ.test/y",
                "--selector",
                "unix:path:/a/../b",
            ],
            "a unix:path value is an absolute path without empty, '.' or '..' segments",
        ),
        (
            vec![
                "--spiffe-id",
                "spiffe://writ.test/y",
                "--selector",
                "cgroup:path:/system.slice/",
            ],
            "or a trailing '/'",
        ),
    ] {
        let mut full = vec!["entry", "create", "--admin-socket", a.as_str()];
        full.extend(args);
        let (ok, _, stderr) = writ_cli(&full, None);
        assert!(!ok);
        assert!(
            stderr.contains("InvalidArgument") && stderr.contains(field),
            "{field}: {stderr}"
        );
    }
    let (_, list, _) = writ_cli(
        &["entry", "list", "--admin-socket", &a, "--output", "json"],
        None,
    );
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert_eq!(
        fetch(&writ),
        vec!["spiffe://writ.test/cli", "spiffe://writ.test/extra"]
    );
    let config_entry = list[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(list[0]["source"], "config");
    let (ok, _, stderr) = writ_cli(
        &["entry", "delete", "--admin-socket", &a, &config_entry],
        None,
    );
    assert!(!ok && stderr.contains("FailedPrecondition"), "{stderr}");

    // Persisted: still there after a restart, then deleted for good.
    writ.kill9();
    writ.spawn();
    assert_eq!(
        fetch(&writ),
        vec!["spiffe://writ.test/cli", "spiffe://writ.test/extra"]
    );
    let (ok, _, stderr) = writ_cli(&["entry", "delete", "--admin-socket", &a, &id], None);
    assert!(ok, "{stderr}");
    assert_eq!(fetch(&writ), vec!["spiffe://writ.test/cli"]);
    writ.kill9();
    writ.spawn();
    assert_eq!(fetch(&writ), vec!["spiffe://writ.test/cli"]);

    // The trail says who created and who deleted the entry, and what it
    // granted to whom; the refused attempts left no such record.
    let trail = common::read_to_string(&writ.dir.path().join("state/audit/audit.jsonl"));
    let records: Vec<serde_json::Value> = trail
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|r: &serde_json::Value| {
            r["event"] == "entry_created" || r["event"] == "entry_deleted"
        })
        .collect();
    assert_eq!(records.len(), 2, "{records:?}");
    let me = nix::unistd::geteuid().as_raw();
    for (record, event) in records.iter().zip(["entry_created", "entry_deleted"]) {
        assert_eq!(record["event"], event);
        assert_eq!(record["caller"]["uid"], me, "{record}");
        assert!(record["caller"]["pid"].as_i64().unwrap() > 0, "{record}");
        // With the identities the operator holds.
        assert!(
            record["caller"]["spiffe_ids"]
                .as_array()
                .is_some_and(|ids| ids.iter().any(|id| id == "spiffe://writ.test/cli")),
            "{record}"
        );
        assert_eq!(record["spiffe_id"], "spiffe://writ.test/extra");
        assert_eq!(record["detail"]["entry_id"], id.as_str());
        assert!(
            record["detail"]["selectors"]
                .as_array()
                .is_some_and(|s| !s.is_empty()),
            "{record}"
        );
    }
}

/// Every page of ListEntries, each as the SPIFFE IDs it holds.
async fn entry_pages(
    client: &mut EntriesClient,
    page_size: i32,
) -> Result<Vec<Vec<String>>, tonic::Status> {
    let mut pages = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_entries(apb::ListEntriesRequest {
                page_size,
                page_token,
            })
            .await?
            .into_inner();
        pages.push(page.entries.into_iter().map(|e| e.spiffe_id).collect());
        if page.next_page_token.is_empty() {
            return Ok(pages);
        }
        page_token = page.next_page_token;
    }
}

type EntriesClient = apb::entries_client::EntriesClient<tonic::transport::Channel>;

#[tokio::test(flavor = "multi_thread")]
async fn entries_are_listed_a_page_at_a_time_in_the_order_they_match() {
    let writ = Writ::start(&entry_for_us());
    let a = admin(&writ);
    let mut client = EntriesClient::new(
        writ::cli::client::connect(std::path::Path::new(&a))
            .await
            .unwrap(),
    );
    let ids: Vec<String> = (0..6).map(|n| format!("spiffe://writ.test/e{n}")).collect();
    let mut entry_ids = Vec::new();
    for id in &ids {
        let entry = client
            .create_entry(apb::CreateEntryRequest {
                spiffe_id: id.clone(),
                selectors: vec!["unix:uid:4242".into()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        entry_ids.push(entry.id);
    }
    // The config's entry first, then the created ones as they were created.
    let mut all = vec!["spiffe://writ.test/cli".to_owned()];
    all.extend(ids.iter().cloned());
    assert_eq!(
        entry_pages(&mut client, 3).await.unwrap(),
        [&all[0..3], &all[3..6], &all[6..7]]
    );
    // 0 is the default page (500), and more than 1000 is taken as 1000.
    for page_size in [0, 5000] {
        assert_eq!(
            entry_pages(&mut client, page_size).await.unwrap(),
            [&all[..]]
        );
    }

    // Deleting an entry the listing has not reached yet, or one it has
    // passed, leaves the next page where it was.
    let first = client
        .list_entries(apb::ListEntriesRequest {
            page_size: 3,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.next_page_token, entry_ids[1]);
    let delete = |id: &str| apb::DeleteEntryRequest { id: id.into() };
    client.delete_entry(delete(&entry_ids[0])).await.unwrap();
    client.delete_entry(delete(&entry_ids[3])).await.unwrap();
    let next = client
        .list_entries(apb::ListEntriesRequest {
            page_size: 3,
            page_token: first.next_page_token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let listed: Vec<&str> = next.entries.iter().map(|e| e.spiffe_id.as_str()).collect();
    assert_eq!(listed, [&ids[2], &ids[4], &ids[5]]);
    // Deleting the entry a page ended on loses the place: ABORTED, never a
    // page that skips entries.
    client.delete_entry(delete(&entry_ids[1])).await.unwrap();
    let err = client
        .list_entries(apb::ListEntriesRequest {
            page_size: 3,
            page_token: first.next_page_token,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Aborted, "{err:?}");
    assert!(err.message().contains("list them again"), "{err:?}");

    for (page_size, page_token, field) in [
        (-1, String::new(), "page_size"),
        (0, "abc".to_owned(), "page_token"),
        (0, entry_ids[2].to_uppercase(), "page_token"),
    ] {
        let err = client
            .list_entries(apb::ListEntriesRequest {
                page_size,
                page_token,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().starts_with(field), "{err:?}");
    }

    // The CLI goes through every page, in both outputs.
    let left = [all[0].as_str(), &ids[2], &ids[4], &ids[5]];
    let list = |extra: &[&str]| {
        let mut args = vec!["entry", "list", "--page-size", "2", "--admin-socket", &a];
        args.extend_from_slice(extra);
        let (ok, stdout, stderr) = writ_cli(&args, None);
        assert!(ok, "{stderr}");
        stdout
    };
    let human: Vec<String> = list(&[])
        .lines()
        .map(|l| l.split_whitespace().nth(1).unwrap().to_owned())
        .collect();
    assert_eq!(human, left);
    let json: serde_json::Value = serde_json::from_str(&list(&["--output", "json"])).unwrap();
    let listed: Vec<&str> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["spiffe_id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, left);
}

#[test]
fn task_commands_begin_inspect_and_end_a_task() {
    let writ = Writ::start(&entry_for_us());
    let a = admin(&writ);
    let mut child = Command::new("sleep").arg("60").spawn().unwrap();
    let pid = child.id().to_string();
    let mut watch = Command::new(WRIT)
        .args(["task", "watch", "--admin-socket", &a, "--output", "json"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let watch_out = watch.stdout.take().unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(watch_out)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines_tx.send(line);
        }
    });
    // The watcher subscribes asynchronously: probe until it reports a task.
    let mut live = false;
    for i in 0..50 {
        let probe = format!("probe-{i}");
        let (ok, _, e) = writ_cli(
            &[
                "task",
                "begin",
                "--admin-socket",
                &a,
                "--pid",
                &pid,
                "--id",
                &probe,
            ],
            None,
        );
        assert!(ok, "{e}");
        assert!(writ_cli(&["task", "end", &probe, "--admin-socket", &a], None).0);
        if lines
            .recv_timeout(Duration::from_millis(300))
            .is_ok_and(|l| l.contains("probe-"))
        {
            live = true;
            break;
        }
    }
    assert!(live, "task watch never reported a task");
    let (ok, out, stderr) = writ_cli(
        &[
            "task",
            "begin",
            "--admin-socket",
            &a,
            "--pid",
            &pid,
            "--id",
            "t-cli",
            "--purpose",
            "triage",
            "--tool",
            "jira",
            "--target",
            "tickets",
            "--data-class",
            "internal",
            "--attr",
            "ticket=42",
            "--ttl",
            "5m",
            "--output",
            "json",
        ],
        None,
    );
    assert!(ok, "{stderr}");
    let task: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(task["task_id"], "t-cli");
    assert_eq!(task["spiffe_id"], "spiffe://writ.test/cli/task/t-cli");
    assert_eq!(task["intent"]["attributes"]["ticket"], "42");
    let (ok, out, _) = writ_cli(&["task", "list", "--admin-socket", &a], None);
    assert!(
        ok && out.contains("t-cli") && out.contains("active"),
        "{out}"
    );
    let (ok, out, _) = writ_cli(&["task", "get", "t-cli", "--admin-socket", &a], None);
    assert!(ok && out.contains("Tools:      jira"), "{out}");
    let (ok, out, stderr) = writ_cli(
        &[
            "task",
            "end",
            "t-cli",
            "--admin-socket",
            &a,
            "--reason",
            "done",
        ],
        None,
    );
    assert!(
        ok && out.contains("ended t-cli (end_task)"),
        "{out}{stderr}"
    );
    // Asked again, it says the task had already ended rather than that
    // this call ended it.
    let (ok, out, stderr) = writ_cli(&["task", "end", "t-cli", "--admin-socket", &a], None);
    assert!(
        ok && out.contains("t-cli had already completed (end_task)"),
        "{out}{stderr}"
    );
    let (ok, _, stderr) = writ_cli(
        &[
            "task",
            "begin",
            "--admin-socket",
            &a,
            "--pid",
            &pid,
            "--id",
            "bad id",
        ],
        None,
    );
    assert!(
        !ok && stderr.contains("InvalidArgument") && stderr.contains("task_id"),
        "{stderr}"
    );
    // An attribute key given twice, or empty, is refused: no value is
    // dropped without a word, and no task begins.
    for (attrs, says) in [
        (
            &["--attr", "a=b=c", "--attr", "a=d"][..],
            "key \"a\" is given twice (a=b=c and a=d)",
        ),
        (&["--attr", "=v"][..], "\"=v\" has an empty key"),
    ] {
        let mut args = vec![
            "task",
            "begin",
            "--admin-socket",
            &a,
            "--pid",
            &pid,
            "--id",
            "t-attr",
        ];
        args.extend_from_slice(attrs);
        let (ok, _, stderr) = writ_cli(&args, None);
        assert!(!ok && stderr.contains(says), "{attrs:?}: {stderr}");
    }
    let (ok, _, stderr) = writ_cli(&["task", "get", "t-attr", "--admin-socket", &a], None);
    assert!(!ok && stderr.contains("NotFound"), "{stderr}");

    // The watcher saw the task begin and complete, once each.
    let mut events: Vec<serde_json::Value> = Vec::new();
    while let Ok(line) = lines.recv_timeout(Duration::from_secs(2)) {
        let event: serde_json::Value = serde_json::from_str(&line).unwrap();
        if event["task"]["task_id"] == "t-cli" {
            events.push(event);
        }
        if events.len() == 2 {
            break;
        }
    }
    let _ = watch.kill();
    let _ = watch.wait();
    let kinds: Vec<_> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(kinds, vec!["begun", "completed"]);
    assert_eq!(events[1]["task"]["completion_detail"], "done");
    let _ = child.kill();
    let _ = child.wait();
}

/// The services the reflection service on `$socket` lists, sorted, asked
/// with reflection protocol `$version`: v1, or v1alpha (the same messages
/// in another package, which older clients speak).
macro_rules! reflected_services {
    ($version:ident, $socket:expr) => {{
        use tonic_reflection::pb::$version::ServerReflectionRequest;
        use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;
        let channel = writ::cli::client::connect($socket).await.unwrap();
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses = ServerReflectionClient::new(channel)
            .server_reflection_info(futures::stream::iter(vec![request]))
            .await
            .unwrap()
            .into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) =
            responses.message().await.unwrap().unwrap().message_response
        else {
            panic!("unexpected reflection response");
        };
        let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        names.sort();
        names
    }};
}

#[tokio::test(flavor = "multi_thread")]
async fn sockets_have_their_modes_and_offer_reflection() {
    let writ = Writ::start(&entry_for_us());
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode(&writ.socket),
        0o777,
        "authority comes from attestation, not file modes"
    );
    assert_eq!(mode(writ.socket.parent().unwrap()), 0o755);
    assert_eq!(mode(std::path::Path::new(&admin(&writ))), 0o770);
    assert_eq!(mode(&writ.dir.path().join("state")), 0o700);

    // Each socket lists what it serves, and nothing it would answer only
    // with Unimplemented.
    let workload_services = [
        "SpiffeWorkloadAPI",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ];
    assert_eq!(reflected_services!(v1, &writ.socket), workload_services);
    let admin_services = [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
        "writ.admin.v1.Agent",
        "writ.admin.v1.Bundles",
        "writ.admin.v1.Entries",
        "writ.admin.v1.Tasks",
    ];
    let admin_socket = std::path::Path::new(&admin(&writ)).to_path_buf();
    assert_eq!(reflected_services!(v1, &admin_socket), admin_services);
    // Clients that still speak only v1alpha (older grpcurl, grpcio's
    // reflection client) get the same answer.
    assert_eq!(
        reflected_services!(v1alpha, &writ.socket),
        workload_services
    );
    assert_eq!(reflected_services!(v1alpha, &admin_socket), admin_services);
    // Nor does it describe the other socket's services asked by name.
    let admin = std::path::Path::new(&admin(&writ)).to_path_buf();
    for (socket, served, not_served) in [
        (&writ.socket, "SpiffeWorkloadAPI", "writ.admin.v1.Tasks"),
        (&admin, "writ.admin.v1.Tasks", "SpiffeWorkloadAPI"),
    ] {
        assert!(describes(socket, served).await, "{served}");
        assert!(!describes(socket, not_served).await, "{not_served}");
    }
}

/// Whether the reflection service on `socket` describes `symbol`.
async fn describes(socket: &std::path::Path, symbol: &str) -> bool {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let channel = writ::cli::client::connect(socket).await.unwrap();
    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(symbol.into())),
    };
    let mut responses = client
        .server_reflection_info(futures::stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    match responses.message().await {
        Ok(Some(response)) => match response.message_response {
            Some(MessageResponse::FileDescriptorResponse(files)) => {
                !files.file_descriptor_proto.is_empty()
            }
            Some(MessageResponse::ErrorResponse(_)) => false,
            other => panic!("unexpected reflection response {other:?}"),
        },
        Err(status) if status.code() == tonic::Code::NotFound => false,
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

#[test]
fn the_ca_root_is_kept_across_restarts() {
    let mut writ = Writ::start(&entry_for_us());
    let a = admin(&writ);
    let show = || {
        let (ok, json, stderr) = writ_cli(
            &["bundle", "show", "--format", "spiffe", "--admin-socket", &a],
            None,
        );
        assert!(ok, "{stderr}");
        TrustBundle::from_spiffe_json(TrustDomain::new("writ.test").unwrap(), json.as_bytes())
            .unwrap()
    };
    let before = show();
    writ.kill9();
    writ.spawn();
    let after = show();
    assert_eq!(before.x509_authorities, after.x509_authorities);
    assert!(
        after.sequence > before.sequence,
        "bundle sequence must only grow"
    );
    let key_files: Vec<_> = std::fs::read_dir(writ.dir.path().join("state/ca"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".key.pem"))
        .collect();
    assert!(!key_files.is_empty());
    for k in key_files {
        assert_eq!(
            std::fs::metadata(&k).unwrap().permissions().mode() & 0o777,
            0o600,
            "{}",
            k.display()
        );
    }
}

#[test]
fn sighup_reloads_entries_and_a_bad_file_changes_nothing() {
    let writ = Writ::start(&entry_for_us());
    let ids = || {
        let (ok, out, err) = writ_cli(
            &[
                "api",
                "fetch",
                "x509",
                "--socket",
                &writ.endpoint(),
                "--output",
                "json",
            ],
            None,
        );
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s["spiffe_id"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    let hup = || {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(writ.pid() as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap();
    };
    assert_eq!(ids(), vec!["spiffe://writ.test/cli"]);
    let original = std::fs::read_to_string(&writ.config_path).unwrap();
    let added = format!(
        "{original}\n[[entry]]\nspiffe_id = \"spiffe://writ.test/reloaded\"\nselectors = [\"unix:uid:{}\"]\n",
        uid()
    );
    std::fs::write(&writ.config_path, &added).unwrap();
    hup();
    common::wait_for(Duration::from_secs(10), "reloaded entry", || {
        (ids().len() == 2).then_some(())
    });
    assert_eq!(
        ids(),
        vec!["spiffe://writ.test/cli", "spiffe://writ.test/reloaded"]
    );

    // A broken file is refused: the running entries stay, writ keeps serving.
    std::fs::write(
        &writ.config_path,
        format!("{added}\n[[entry]]\nspiffe_id = \"nonsense\"\n"),
    )
    .unwrap();
    hup();
    // Each line of the error is a log line of its own, so the one naming
    // the file and position may come a moment after the first.
    common::wait_for(
        Duration::from_secs(10),
        "a refusal in the log naming writ.toml and the position",
        || {
            writ.log()
                .lines()
                .any(|l| l.contains("reload refused") && l.contains("writ.toml:"))
                .then_some(())
        },
    );
    assert_eq!(
        ids(),
        vec!["spiffe://writ.test/cli", "spiffe://writ.test/reloaded"]
    );
}

#[test]
fn api_watch_with_json_output_prints_only_json_on_stdout_when_writ_stops() {
    use std::io::{BufRead, BufReader};
    let mut writ = Writ::start(&entry_for_us());
    let mut watch = Command::new(WRIT)
        .args([
            "api",
            "watch",
            "--socket",
            &writ.endpoint(),
            "--output",
            "json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(watch.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert!(writ.stop().success());
    // writ ends the stream on SIGTERM; everything on stdout is JSON.
    let mut lines = vec![first];
    lines.extend(stdout.lines().map_while(Result::ok));
    let status = watch.wait().unwrap();
    assert!(status.success(), "{status:?}");
    for line in &lines {
        let parsed: Result<serde_json::Value, _> = serde_json::from_str(line);
        assert!(parsed.is_ok(), "not JSON on stdout: {line:?} in {lines:?}");
    }
    // And on stderr, where the end of the stream is said as a warning
    // object (it is no failure: the exit status is 0).
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut watch.stderr.take().unwrap(), &mut stderr).unwrap();
    let said: Vec<serde_json::Value> = stderr
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}")))
        .collect();
    assert_eq!(
        said,
        [serde_json::json!({"warning": {"message": "stream ended by the server"}})],
        "{stderr}"
    );
}

#[test]
fn the_admin_socket_comes_from_the_flag_then_the_environment() {
    let writ = Writ::start(&entry_for_us());
    let good = admin(&writ);
    let bad = writ
        .dir
        .path()
        .join("run/absent.sock")
        .display()
        .to_string();
    let run = |env: Option<&str>, args: &[&str]| {
        let mut cmd = Command::new(WRIT);
        cmd.args(["task", "list"]).args(args);
        match env {
            Some(v) => cmd.env("WRIT_ADMIN_SOCKET", v),
            None => cmd.env_remove("WRIT_ADMIN_SOCKET"),
        };
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // The flag wins over the environment, both ways.
    let (ok, stderr) = run(Some(&good), &["--admin-socket", &bad]);
    assert!(!ok && stderr.contains(&bad), "{stderr}");
    let (ok, stderr) = run(Some(&bad), &["--admin-socket", &good]);
    assert!(ok, "{stderr}");
    let (ok, stderr) = run(Some(&good), &[]);
    assert!(ok, "{stderr}");
    // A missing socket is named, with the reason said once.
    let (ok, stderr) = run(Some(&bad), &[]);
    assert!(!ok && stderr.contains(&bad), "{stderr}");
    assert_eq!(
        stderr.matches("No such file or directory").count(),
        1,
        "{stderr}"
    );
    // unix: addresses work as they do for --socket.
    let (ok, stderr) = run(None, &["--admin-socket", &format!("unix://{good}")]);
    assert!(ok, "{stderr}");
    // An empty WRIT_ADMIN_SOCKET is unset (the default socket), not an
    // error about a flag that was never given.
    let (_, stderr) = run(Some(""), &[]);
    assert!(!stderr.contains("a value is required"), "{stderr}");
}

/// A socket's directory that another user owns, or that group or others
/// may write to without the sticky bit, is refused: whoever can rename
/// entries there can put their own server at writ's socket path (a tester
/// had root's workloads served by another user's writ that way).
#[test]
fn a_socket_directory_others_may_write_to_is_refused() {
    if !is_root() {
        eprintln!("SKIPPED: needs root to hand the socket directory to another user");
        return;
    }
    let mut writ = Writ::start(&entry_for_us());
    writ.stop();
    let run = writ.socket.parent().unwrap().to_path_buf();
    let set_mode =
        |mode: u32| std::fs::set_permissions(&run, std::fs::Permissions::from_mode(mode)).unwrap();
    std::os::unix::fs::chown(&run, Some(NOBODY), Some(NOBODY)).unwrap();
    let (code, output) = common::run_expecting_failure(&writ.config_path);
    assert_eq!(code, Some(1), "{output}");
    assert!(
        output.contains(&format!("refusing socket directory {}", run.display()))
            && output.contains(&format!("owned by uid {NOBODY}")),
        "{output}"
    );
    std::os::unix::fs::chown(&run, Some(0), Some(0)).unwrap();
    set_mode(0o777);
    let (code, output) = common::run_expecting_failure(&writ.config_path);
    assert_eq!(code, Some(1), "{output}");
    assert!(
        output.contains("mode 0777 lets group or others"),
        "{output}"
    );
    // Sticky, as /tmp is: others may write there but not replace our socket.
    set_mode(0o1777);
    writ.spawn();
    set_mode(0o755);
}

/// The agent's own stdout closing (`writ run | head -1`, a logger gone)
/// does not stop it: its start-up lines used to be printed with
/// `println!`, which panics on a closed pipe.
#[test]
fn the_agent_keeps_serving_when_its_stdout_is_closed() {
    let mut writ = Writ::start(&entry_for_us());
    writ.stop();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let log = std::fs::File::create(writ.dir.path().join("closed-stdout.log")).unwrap();
    let mut agent = Command::new(WRIT)
        .args(["run", "--config"])
        .arg(&writ.config_path)
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(log)
        .spawn()
        .unwrap();
    let endpoint = writ.endpoint();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let fetched = loop {
        let (ok, out, _) = writ_cli(&["api", "fetch", "x509", "--socket", &endpoint], None);
        if ok || std::time::Instant::now() > deadline {
            break out;
        }
        assert!(
            agent.try_wait().unwrap().is_none(),
            "writ exited: {}",
            std::fs::read_to_string(writ.dir.path().join("closed-stdout.log")).unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(fetched.contains("spiffe://writ.test/cli"), "{fetched}");
    assert!(agent.try_wait().unwrap().is_none(), "writ exited");
    agent.kill().unwrap();
    agent.wait().unwrap();
}

#[test]
fn a_closed_stdout_ends_the_cli_quietly() {
    let writ = Writ::start(&entry_for_us());
    let a = admin(&writ);
    let endpoint = writ.endpoint();
    let config = writ.config_path.display().to_string();
    let request = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/policy/examples/delegate-task.json"
    );
    for args in [
        vec!["entry", "list", "--admin-socket", &a],
        vec!["entry", "list", "--admin-socket", &a, "--output", "json"],
        vec!["task", "list", "--admin-socket", &a],
        vec!["bundle", "show", "--admin-socket", &a],
        vec!["api", "fetch", "x509", "--socket", &endpoint],
        vec!["validate", "--config", &config],
        vec!["policy", "check", "--request", request],
    ] {
        let open = Command::new(WRIT).args(&args).output().unwrap();
        assert!(!open.stdout.is_empty(), "{args:?} printed nothing");
        // The reader is gone before writ prints anything (as `| head -4`
        // is once it has read its lines): every write fails with EPIPE.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let closed = Command::new(WRIT)
            .args(&args)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&closed.stderr);
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
        // The same exit status as with a reader: 0, or the policy decision.
        assert_eq!(
            closed.status.code(),
            open.status.code(),
            "{args:?}: {stderr}"
        );
    }
}

/// Text logs written to a file (or journald, or a pipe) carry no terminal
/// colour codes: a tester found ESC[2m... throughout `writ run 2> file`.
#[test]
fn logs_to_a_file_have_no_colour_codes() {
    let mut writ = Writ::start(&entry_for_us());
    writ.stop();
    let log_path = writ.dir.path().join("stderr.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut agent = Command::new(WRIT)
        .args(["run", "--log-format", "text", "--config"])
        .arg(&writ.config_path)
        // With NO_COLOR set, colour would be off whatever writ decides.
        .env_remove("NO_COLOR")
        .env("WRIT_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let endpoint = writ.endpoint();
    common::wait_for(Duration::from_secs(30), "writ to serve", || {
        assert!(agent.try_wait().unwrap().is_none(), "writ exited");
        writ_cli(&["healthcheck", "--socket", &endpoint], None)
            .0
            .then_some(())
    });
    agent.kill().unwrap();
    agent.wait().unwrap();
    let text = std::fs::read_to_string(&log_path).unwrap();
    assert!(text.contains("INFO"), "nothing logged: {text}");
    assert!(
        !text.contains('\u{1b}'),
        "escape codes in the log: {text:?}"
    );
}

/// A client given the other writ socket used to print only
/// "writ: FetchX509SVID: Unimplemented: " (and `task list` its table
/// header over nothing): it now says which socket it was probably given.
#[test]
fn a_client_on_the_other_socket_says_which_it_probably_is() {
    let writ = Writ::start(&entry_for_us());
    let admin_socket = admin(&writ);
    let workload_socket = writ.socket.display().to_string();

    let (ok, stdout, stderr) = writ_cli(&["api", "fetch", "x509", "--socket", &admin_socket], None);
    assert!(!ok, "{stdout}");
    assert!(
        stderr.contains(&format!(
            "{admin_socket} is not a Workload API socket (is it writ's admin socket?)"
        )),
        "{stderr}"
    );

    for args in [["task", "list"], ["entry", "list"]] {
        let (ok, stdout, stderr) = writ_cli(
            &[args[0], args[1], "--admin-socket", &workload_socket],
            None,
        );
        assert!(!ok, "{args:?}: {stdout}");
        assert!(
            stderr.contains(&format!(
                "{workload_socket} is not writ's admin API socket (is it the Workload API socket?)"
            )),
            "{args:?}: {stderr}"
        );
        // A refused listing prints no table header on stdout.
        assert_eq!(stdout, "", "{args:?}");
    }
    // With an answer, the header is there.
    let (ok, stdout, stderr) = writ_cli(&["task", "list", "--admin-socket", &admin_socket], None);
    assert!(ok, "{stderr}");
    assert!(stdout.starts_with("TASK "), "{stdout}");
}

/// A socket with no writ behind it says how to point the CLI at the right
/// one, for each API its own flag and variable.
#[test]
fn a_missing_socket_says_how_to_point_the_cli_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let absent = dir.path().join("absent.sock").display().to_string();
    let (ok, _, stderr) = writ_cli(&["task", "list", "--admin-socket", &absent], None);
    assert!(!ok);
    for said in [
        absent.as_str(),
        "writ may not be running",
        "--admin-socket",
        "WRIT_ADMIN_SOCKET",
        "XDG_RUNTIME_DIR",
    ] {
        assert!(stderr.contains(said), "lacks {said:?}: {stderr}");
    }
    let (ok, _, stderr) = writ_cli(&["api", "fetch", "x509", "--socket", &absent], None);
    assert!(!ok);
    for said in [
        absent.as_str(),
        "writ may not be running",
        "--socket",
        "SPIFFE_ENDPOINT_SOCKET",
        "XDG_RUNTIME_DIR",
    ] {
        assert!(stderr.contains(said), "lacks {said:?}: {stderr}");
    }
}

/// A user refused by the admin socket's mode learns the mode and the
/// group that would let them in.
#[test]
fn a_refused_admin_socket_names_its_mode_and_group() {
    if !is_root() {
        eprintln!("SKIPPED: needs root to run the client as another user");
        return;
    }
    let writ = Writ::start(&entry_for_us());
    let socket = admin(&writ);
    let group = nix::unistd::Group::from_gid(
        std::os::unix::fs::MetadataExt::gid(&std::fs::metadata(&socket).unwrap()).into(),
    )
    .unwrap()
    .unwrap()
    .name;
    let (ok, _, stderr) = writ_cli(&["task", "list", "--admin-socket", &socket], Some(NOBODY));
    assert!(!ok);
    assert!(
        stderr.contains("Permission denied")
            && stderr.contains("the socket is mode 0770")
            && stderr.contains(&format!("a member of group {group}")),
        "{stderr}"
    );
}

/// BeginTask refusing a process the caller may not bind says which
/// setting would allow it.
#[test]
fn binding_someone_elses_process_names_bind_any_pid() {
    if !is_root() {
        eprintln!("SKIPPED: needs root to start a process as another user");
        return;
    }
    let writ = Writ::start(&entry_for_us());
    let mut other = Command::new("sleep");
    other.arg("60").uid(NOBODY).gid(NOBODY);
    let mut other = other.spawn().unwrap();
    let pid = other.id().to_string();
    let (ok, _, stderr) = writ_cli(
        &[
            "task",
            "begin",
            "--pid",
            &pid,
            "--admin-socket",
            &admin(&writ),
        ],
        None,
    );
    other.kill().unwrap();
    other.wait().unwrap();
    assert!(!ok);
    assert!(
        stderr.contains("PermissionDenied") && stderr.contains("[admin_api] bind_any_pid"),
        "{stderr}"
    );
}

/// A plain path in SPIFFE_ENDPOINT_SOCKET still works for writ, with a
/// warning: the SPIFFE SDKs refuse it, so the workloads it was set for
/// would fail.
#[test]
fn a_plain_path_in_spiffe_endpoint_socket_works_with_a_warning() {
    let writ = Writ::start(&entry_for_us());
    let path = writ.socket.display().to_string();
    let fetch = |value: &str| {
        let out = Command::new(WRIT)
            .args(["api", "fetch", "x509"])
            .env("SPIFFE_ENDPOINT_SOCKET", value)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, stderr) = fetch(&path);
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("warning") && stderr.contains(&format!("unix://{path}")),
        "{stderr}"
    );
    let (ok, stderr) = fetch(&writ.endpoint());
    assert!(ok, "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
}

/// A plain socket path may be relative to the current directory, for
/// either API and from the flag or the variable (`--socket` and
/// `SPIFFE_ENDPOINT_SOCKET` used to refuse one while `--admin-socket`
/// took it); a unix URI still names an absolute path only, as the SPIFFE
/// Workload Endpoint standard requires.
#[test]
fn relative_socket_paths_are_resolved_against_the_current_directory() {
    let writ = Writ::start(&entry_for_us());
    // getcwd names the directory without symlinks, so the resolved paths
    // do too.
    let data_dir = std::fs::canonicalize(writ.dir.path()).unwrap();
    let in_data_dir = |args: &[&str], env: &[(&str, &str)]| {
        let out = Command::new(WRIT)
            .args(args)
            .current_dir(&data_dir)
            .env_remove("SPIFFE_ENDPOINT_SOCKET")
            .env_remove("WRIT_ADMIN_SOCKET")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let fetch = ["api", "fetch", "x509"];
    let (code, stdout, stderr) = in_data_dir(
        &[&fetch[..], &["--socket", "run/workload.sock"]].concat(),
        &[],
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("spiffe://writ.test/cli"), "{stdout}");
    // The variable's warning suggests a URI that works from anywhere.
    let (code, stdout, stderr) =
        in_data_dir(&fetch, &[("SPIFFE_ENDPOINT_SOCKET", "run/workload.sock")]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("spiffe://writ.test/cli"), "{stdout}");
    let absolute = data_dir.join("run/workload.sock");
    assert!(
        stderr.contains(&format!(
            "SPIFFE_ENDPOINT_SOCKET=unix://{}",
            absolute.display()
        )),
        "{stderr}"
    );
    let list = ["task", "list"];
    let (code, _, stderr) = in_data_dir(
        &[&list[..], &["--admin-socket", "run/admin.sock"]].concat(),
        &[],
    );
    assert_eq!(code, Some(0), "{stderr}");
    let (code, _, stderr) = in_data_dir(&list, &[("WRIT_ADMIN_SOCKET", "./run/admin.sock")]);
    assert_eq!(code, Some(0), "{stderr}");
    // A failure names the socket by its absolute path.
    let (code, _, stderr) = in_data_dir(
        &[&list[..], &["--admin-socket", "run/absent.sock"]].concat(),
        &[],
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "admin API at {}:",
            data_dir.join("run/absent.sock").display()
        )),
        "{stderr}"
    );
    // From a directory so deep that the absolute path is too long for a
    // socket address, and from one removed since, the relative path is
    // used as given: the kernel resolves it.
    let long_name = "d".repeat(50);
    let deep = data_dir.join([long_name.as_str(); 3].join("/"));
    std::fs::create_dir_all(&deep).unwrap();
    let back = "../../../run/workload.sock";
    assert!(deep.join(back).as_os_str().len() > 107);
    let fetched = |command: &mut Command| {
        let out = command
            .env_remove("SPIFFE_ENDPOINT_SOCKET")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("spiffe://writ.test/cli"));
    };
    fetched(
        Command::new(WRIT)
            .args(fetch)
            .args(["--socket", back])
            .current_dir(&deep),
    );
    // The shell enters the directory and removes it before writ starts.
    std::fs::create_dir(data_dir.join("removed")).unwrap();
    fetched(
        Command::new("sh")
            .args([
                "-c",
                r#"cd removed && rmdir ../removed && exec "$0" api fetch x509 --socket ../run/workload.sock"#,
                WRIT,
            ])
            .current_dir(&data_dir),
    );
    // A relative path in a unix URI is refused, with the error it had.
    for (args, env) in [
        (
            &[&fetch[..], &["--socket", "unix:run/workload.sock"]].concat(),
            &[][..],
        ),
        (
            &fetch.to_vec(),
            &[("SPIFFE_ENDPOINT_SOCKET", "unix:run/workload.sock")][..],
        ),
        (
            &[&list[..], &["--admin-socket", "unix:run/admin.sock"]].concat(),
            &[][..],
        ),
        (
            &list.to_vec(),
            &[("WRIT_ADMIN_SOCKET", "unix:run/admin.sock")][..],
        ),
    ] {
        let (code, stdout, stderr) = in_data_dir(args, env);
        assert_eq!(code, Some(1), "{args:?} {env:?}: {stdout}");
        assert!(
            stderr.contains("socket address \"unix:run/")
                && stderr.trim_end().ends_with("must name an absolute path"),
            "{args:?} {env:?}: {stderr}"
        );
    }
}

/// With `--output json`, a failure is one JSON object on stderr, not the
/// `writ: ...` line (a script asked for JSON, failures included): the
/// message the line would say, and the gRPC status code when writ answered
/// the call with one. Exit status 1 and an empty stdout, as in text.
#[test]
fn json_output_reports_a_failure_as_a_json_object_on_stderr() {
    let writ = Writ::start(&entry_for_us());
    let admin_socket = admin(&writ);
    let workload_socket = writ.socket.display().to_string();
    let absent = writ
        .dir
        .path()
        .join("run/absent.sock")
        .display()
        .to_string();
    let missing_file = writ.dir.path().join("absent.pem").display().to_string();
    let run = |args: &[&str]| {
        let out = Command::new(WRIT)
            .args(args)
            .env_remove("SPIFFE_ENDPOINT_SOCKET")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for (args, code) in [
        (
            vec![
                "task",
                "get",
                "no-such-task",
                "--admin-socket",
                &admin_socket,
            ],
            Some("NotFound"),
        ),
        (
            vec![
                "api",
                "fetch",
                "jwt",
                "--audience",
                "",
                "--socket",
                &workload_socket,
            ],
            Some("InvalidArgument"),
        ),
        (
            vec![
                "api",
                "validate",
                "jwt",
                "--audience",
                "a",
                "--svid",
                "x.y.z",
                "--socket",
                &workload_socket,
            ],
            Some("InvalidArgument"),
        ),
        (
            vec!["entry", "list", "--admin-socket", &workload_socket],
            Some("Unimplemented"),
        ),
        // Failures that are no answer from writ have no code.
        (vec!["api", "fetch", "x509", "--socket", &absent], None),
        (
            vec![
                "bundle",
                "set",
                "--trust-domain",
                "other.test",
                "--file",
                &missing_file,
                "--admin-socket",
                &admin_socket,
            ],
            None,
        ),
    ] {
        let (text_exit, text_stdout, text_stderr) = run(&args);
        assert_eq!(text_exit, Some(1), "{args:?}: {text_stderr}");
        assert_eq!(text_stdout, "", "{args:?}");
        let text_message = text_stderr
            .strip_prefix("writ: ")
            .and_then(|m| m.strip_suffix('\n'))
            .unwrap_or_else(|| panic!("{args:?}: {text_stderr:?}"));

        let (exit, stdout, stderr) = run(&[&args[..], &["--output", "json"]].concat());
        assert_eq!(exit, Some(1), "{args:?}: {stderr}");
        assert_eq!(stdout, "", "{args:?}");
        // from_str refuses anything after the one object.
        let failure: serde_json::Value = serde_json::from_str(&stderr)
            .unwrap_or_else(|e| panic!("{args:?}: not one JSON object ({e}): {stderr:?}"));
        let mut expected = serde_json::json!({ "error": { "message": text_message } });
        if let Some(code) = code {
            expected["error"]["code"] = code.into();
        }
        assert_eq!(failure, expected, "{args:?}");
    }

    // A warning that comes before a failure is JSON too, on its own line,
    // so that every line a script reads on stderr is JSON.
    let out = Command::new(WRIT)
        .args(["api", "fetch", "x509", "--output", "json"])
        .env("SPIFFE_ENDPOINT_SOCKET", &absent)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}")))
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(
        lines[0]["warning"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("is a plain path")),
        "{lines:?}"
    );
    assert!(
        lines[1]["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(&absent)),
        "{lines:?}"
    );
}

/// Argument mistakes caught before anything is sent, each naming the
/// flags it is about.
#[test]
fn argument_mistakes_name_their_flags() {
    // Neither binding: both are named, not only --pid.
    let (ok, _, stderr) = writ_cli(&["task", "begin"], None);
    assert!(!ok);
    assert!(
        stderr.contains("--pid") && stderr.contains("--cgroup"),
        "{stderr}"
    );
    // Both: refused as well.
    let (ok, _, stderr) = writ_cli(&["task", "begin", "--pid", "1", "--cgroup", "/x"], None);
    assert!(!ok && stderr.contains("cannot be used with"), "{stderr}");
    // An empty socket flag is an error naming the flag, for both flags (an
    // empty --admin-socket used to mean the default socket).
    let (ok, _, stderr) = writ_cli(&["task", "list", "--admin-socket", ""], None);
    assert!(!ok && stderr.contains("'--admin-socket"), "{stderr}");
    let (ok, _, stderr) = writ_cli(&["api", "fetch", "x509", "--socket", ""], None);
    assert!(!ok && stderr.contains("'--socket"), "{stderr}");
    // Nor does an empty --trust-domain show writ's own bundle.
    let (ok, _, stderr) = writ_cli(&["bundle", "show", "--trust-domain", ""], None);
    assert!(!ok && stderr.contains("'--trust-domain"), "{stderr}");
    // An empty --parent, --id, --ttl or --spiffe-id (an unset shell
    // variable, say) is refused: the request cannot tell empty from not
    // given, and `--parent ''` used to begin a top-level task with the
    // orchestrator's whole scope instead of a sub-task.
    for flag in ["--parent", "--id", "--ttl", "--spiffe-id"] {
        let (ok, _, stderr) = writ_cli(
            &[
                "task",
                "begin",
                "--pid",
                "1",
                flag,
                "",
                "--admin-socket",
                "/nonexistent/admin.sock",
            ],
            None,
        );
        assert!(
            !ok && stderr.contains(&format!("'{flag}")),
            "{flag}: {stderr}"
        );
        assert!(!stderr.contains("admin.sock"), "{flag}: {stderr}");
    }
    let (ok, _, stderr) = writ_cli(
        &[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://writ.test/x",
            "--selector",
            "unix:uid:1",
            "--x509-svid-ttl",
            "",
            "--admin-socket",
            "/nonexistent/admin.sock",
        ],
        None,
    );
    assert!(!ok && stderr.contains("'--x509-svid-ttl"), "{stderr}");
}

/// `--output json` carries what the text output says: a task's
/// `federates_with`, and whether `task end` ended the task or found it
/// already completed.
#[test]
fn task_json_output_has_federates_with_and_whether_end_ended_it() {
    let writ = Writ::start(&entry_for_us());
    let a = admin(&writ);
    let mut child = Command::new("sleep").arg("60").spawn().unwrap();
    let pid = child.id().to_string();
    let json = |args: &[&str]| -> serde_json::Value {
        let mut args = args.to_vec();
        args.extend(["--admin-socket", &a, "--output", "json"]);
        let (ok, out, stderr) = writ_cli(&args, None);
        assert!(ok, "{args:?}: {stderr}");
        serde_json::from_str(&out).unwrap()
    };
    let begun = json(&[
        "task",
        "begin",
        "--pid",
        &pid,
        "--id",
        "fw1",
        "--federates-with",
        "partner.example",
    ]);
    assert_eq!(
        begun["federates_with"],
        serde_json::json!(["partner.example"])
    );
    let got = json(&["task", "get", "fw1"]);
    assert_eq!(
        got["federates_with"],
        serde_json::json!(["partner.example"])
    );
    let listed = json(&["task", "list"]);
    assert_eq!(
        listed[0]["federates_with"],
        serde_json::json!(["partner.example"])
    );
    let (ok, out, _) = writ_cli(&["task", "get", "fw1", "--admin-socket", &a], None);
    assert!(ok && out.contains("Federates:  partner.example"), "{out}");
    let ended = json(&["task", "end", "fw1"]);
    assert_eq!(ended["already_completed"], false);
    assert_eq!(ended["completion_reason"], "end_task");
    let again = json(&["task", "end", "fw1"]);
    assert_eq!(again["already_completed"], true);
    assert_eq!(again["completion_reason"], "end_task");
    let _ = child.kill();
    let _ = child.wait();
}

/// CreateEntry bounds an entry's selectors, DNS names and trust domains,
/// so that every entry fits in a ListEntries page: one near the 4 MiB
/// request limit made `writ entry list` fail for every operator.
#[tokio::test(flavor = "multi_thread")]
async fn an_entry_is_bounded_so_that_it_always_fits_in_a_listing() {
    let writ = Writ::start(&entry_for_us());
    let a = admin(&writ);
    let mut client = EntriesClient::new(
        writ::cli::client::connect(std::path::Path::new(&a))
            .await
            .unwrap(),
    );
    let request = |selectors: Vec<String>, dns_names: Vec<String>, federates: Vec<String>| {
        apb::CreateEntryRequest {
            spiffe_id: "spiffe://writ.test/big".into(),
            selectors,
            dns_names,
            federates_with: federates,
            ..Default::default()
        }
    };
    let uids = |n: usize| (0..n).map(|u| format!("unix:uid:{u}")).collect::<Vec<_>>();
    let names = |n: usize| (0..n).map(|i| format!("n{i}.example.org")).collect();
    let domains = |n: usize| (0..n).map(|i| format!("td{i}.example")).collect();
    let long_path = format!("unix:path:/{}", "a/".repeat(2100).trim_end_matches('/'));
    for (field, req) in [
        ("selectors", request(uids(65), vec![], vec![])),
        (
            "selectors",
            request(vec![long_path.clone()], vec![], vec![]),
        ),
        ("dns_names", request(uids(1), names(65), vec![])),
        ("federates_with", request(uids(1), vec![], domains(65))),
        (
            "hint",
            apb::CreateEntryRequest {
                hint: "h".repeat(1025),
                ..request(uids(1), vec![], vec![])
            },
        ),
        // Nor a hint that would drive a workload operator's terminal.
        (
            "hint",
            apb::CreateEntryRequest {
                hint: "x\u{1b}]0;pwned\u{7}\rFAKE".into(),
                ..request(uids(1), vec![], vec![])
            },
        ),
    ] {
        let err = client.create_entry(req).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().starts_with(field),
            "{field}: {}",
            err.message()
        );
    }
    // The largest entry allowed is listed, by the CLI too.
    let largest_path = format!("unix:path:/{}", "b/".repeat(2040).trim_end_matches('/'));
    let mut selectors = uids(63);
    selectors.push(largest_path);
    client
        .create_entry(request(selectors, names(64), domains(64)))
        .await
        .unwrap();
    let (ok, out, stderr) = writ_cli(
        &["entry", "list", "--admin-socket", &a, "--output", "json"],
        None,
    );
    assert!(ok, "{stderr}");
    let listed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");
}

/// `writ validate` takes the config from WRIT_CONFIG as `writ run` does.
#[test]
fn validate_reads_writ_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("writ.toml");
    std::fs::write(&config, "trust_domain = \"example.org\"\n").unwrap();
    let out = Command::new(WRIT)
        .arg("validate")
        .env("WRIT_CONFIG", &config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout, format!("{}: OK\n", config.display()));
}

/// Every command and option a newcomer met without help text now has a
/// line of it.
#[test]
fn commands_and_options_have_help() {
    let help = |args: &[&str]| {
        let out = Command::new(WRIT).args(args).arg("-h").output().unwrap();
        assert!(out.status.success(), "{args:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // The text after a command or flag name on its help line, or (where
    // clap puts it when the names are long) on the line below.
    let described = |text: &str, item: &str| {
        let lines: Vec<&str> = text.lines().collect();
        lines.iter().enumerate().any(|(i, line)| {
            let Some(rest) = line.trim_start().strip_prefix(item) else {
                return false;
            };
            if !rest.is_empty() && !rest.starts_with(' ') {
                return false;
            }
            let indent = |l: &str| l.len() - l.trim_start().len();
            match rest.trim() {
                "" => lines
                    .get(i + 1)
                    .is_some_and(|next| !next.trim().is_empty() && indent(next) > indent(line)),
                _ => true,
            }
        })
    };
    for (command, items) in [
        (&["task"][..], &["get", "list"][..]),
        (&["entry"][..], &["create", "delete", "list"][..]),
        (
            &["task", "begin"][..],
            &[
                "--pid <PID>",
                "--id <ID>",
                "--spiffe-id <SPIFFE_ID>",
                "--parent <PARENT>",
            ][..],
        ),
        (&["run"][..], &["--config <CONFIG>"][..]),
        (&["validate"][..], &["--config <CONFIG>"][..]),
    ] {
        let text = help(command);
        for item in items {
            assert!(described(&text, item), "{command:?} {item}: {text}");
        }
    }
}
