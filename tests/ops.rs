//! Running writ as a service: sd_notify messages on a fake NOTIFY_SOCKET,
//! socket activation with passed fds, the HTTP health and metrics listener
//! with live readiness, SIGHUP and admin-API reload (policies, entries, log
//! level, refused configs, `writ reload`) and SIGTERM drain, all against the
//! real binary. Plus `systemd-analyze verify` on the example units.

mod common;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{WRIT, Writ, http_get, wait_for};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A writ process on a temp dir, started however the test needs.
struct Service {
    dir: tempfile::TempDir,
    config_path: PathBuf,
    workload: PathBuf,
    admin: PathBuf,
    child: Option<Child>,
}

impl Service {
    fn new(extra_config: &str, log_level: &str) -> Service {
        let dir = common::traversable_tempdir("writ-ops-");
        let workload = dir.path().join("run/workload.sock");
        let admin = dir.path().join("run/admin.sock");
        let config_path = dir.path().join("writ.toml");
        let service = Service {
            dir,
            config_path,
            workload,
            admin,
            child: None,
        };
        service.write_config(extra_config, log_level);
        service
    }

    fn write_config(&self, extra: &str, log_level: &str) {
        self.write_config_with_admin("", extra, log_level);
    }

    /// `write_config` with `admin_extra` lines added to `[admin_api]`.
    fn write_config_with_admin(&self, admin_extra: &str, extra: &str, log_level: &str) {
        let uid = nix::unistd::getuid().as_raw();
        let config = format!(
            "trust_domain = \"writ.test\"\ndata_dir = \"{data}\"\n\n[workload_api]\nsocket_path = \"{workload}\"\n\n[admin_api]\nsocket_path = \"{admin}\"\n{admin_extra}\n\n[log]\nlevel = \"{log_level}\"\n\n[telemetry]\nlisten = \"127.0.0.1:0\"\n\n{extra}\n\n[[entry]]\nspiffe_id = \"spiffe://writ.test/ops\"\nselectors = [\"unix:uid:{uid}\"]\n",
            data = self.dir.path().join("state").display(),
            workload = self.workload.display(),
            admin = self.admin.display(),
        );
        std::fs::write(&self.config_path, config).unwrap();
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("writ.log")
    }

    fn log(&self) -> String {
        common::read_to_string(&self.log_path())
    }

    /// Starts `writ run` directly, with `env` added.
    fn spawn(&mut self, env: &[(&str, &str)]) {
        self.spawn_without_waiting(env);
        self.wait_ready();
    }

    /// `spawn`, returning as soon as the process is started.
    fn spawn_without_waiting(&mut self, env: &[(&str, &str)]) {
        let log = std::fs::File::create(self.log_path()).unwrap();
        let mut cmd = Command::new(WRIT);
        cmd.args(["run", "--config"])
            .arg(&self.config_path)
            .env_remove("WRIT_LOG")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .env_remove("WATCHDOG_USEC")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().unwrap());
    }

    /// Starts writ as systemd would with two passed sockets: fd 3 named
    /// "workload", fd 4 named "admin", LISTEN_PID = writ's own pid. std
    /// only places fds 0-2 in a child, so the listeners go in as the
    /// shell's stdin/stdout; the shell moves them to 3 and 4, sets
    /// LISTEN_PID to its own pid and execs writ, which keeps that pid.
    fn spawn_socket_activated(&mut self, workload: UnixListener, admin: UnixListener) {
        let script = r#"exec 3<&0 4>&1 0</dev/null 1>>"$2" 2>&1
LISTEN_PID=$$ LISTEN_FDS=2 LISTEN_FDNAMES=workload:admin exec "$1" run --config "$3""#;
        std::fs::File::create(self.log_path()).unwrap();
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .arg(WRIT)
            .arg(self.log_path())
            .arg(&self.config_path)
            .env_remove("WRIT_LOG")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(workload)))
            .stdout(Stdio::from(std::os::fd::OwnedFd::from(admin)))
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("writ exited early with {status}:\n{}", self.log());
            }
            if self.log().contains("health and metrics on http://") {
                let ok = Command::new(WRIT)
                    .args(["healthcheck", "--socket"])
                    .arg(&self.workload)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if ok {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "writ did not become ready:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().unwrap().id() as i32)
    }

    fn signal(&self, signal: Signal) {
        kill(self.pid(), signal).unwrap();
    }

    /// The telemetry address writ printed.
    fn http_addr(&self) -> String {
        let log = self.log();
        let start = log.find("health and metrics on http://").unwrap() + 29;
        log[start..].split('/').next().unwrap().to_owned()
    }

    fn stop(&mut self) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        self.wait_exit()
    }

    fn wait_exit(&mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("writ did not stop on SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The value of one series in an OpenMetrics page (0 when absent: a
/// labelled counter appears only once it has been incremented).
fn metric(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

fn fetch_x509(socket: &Path) {
    let out = Command::new(WRIT)
        .args(["api", "fetch", "x509", "--socket"])
        .arg(socket)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Receives notify datagrams until `done` says the list is complete.
fn receive_until(
    socket: &UnixDatagram,
    got: &mut Vec<String>,
    what: &str,
    done: impl Fn(&[String]) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut buf = vec![0u8; 4096];
    while !done(got) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {got:#?}"
        );
        match socket.recv(&mut buf) {
            Ok(n) => got.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("recv: {e}"),
        }
    }
}

/// The non-watchdog messages, each reduced to its first line's key.
fn states(messages: &[String]) -> Vec<String> {
    messages
        .iter()
        .filter(|m| !m.starts_with("WATCHDOG=1"))
        .map(|m| m.lines().next().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn notify_messages_come_in_order_with_watchdog_reload_and_stop() {
    let mut service = Service::new("", "warn");
    let notify_path = service.dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    service.spawn(&[
        ("NOTIFY_SOCKET", notify_path.to_str().unwrap()),
        // 200 ms: writ pets at half of it.
        ("WATCHDOG_USEC", "200000"),
    ]);
    let mut got = Vec::new();
    receive_until(&notify, &mut got, "READY and two WATCHDOG pets", |m| {
        m.iter().filter(|m| m.starts_with("WATCHDOG=1")).count() >= 2
    });
    assert!(got[0].starts_with("READY=1\n"), "{got:#?}");
    assert!(
        got[0].contains("STATUS=serving trust domain writ.test"),
        "{got:#?}"
    );
    // At warn, the info-level start message was filtered out.
    assert!(!service.log().contains("writ started"), "{}", service.log());

    // A good reload at a new log level: RELOADING (with its monotonic
    // time), then READY; the new level is in force for the reload's own
    // info message.
    service.write_config("", "info");
    service.signal(Signal::SIGHUP);
    receive_until(&notify, &mut got, "RELOADING then READY", |m| {
        states(m).len() >= 3
    });
    let reloading = got.iter().find(|m| m.starts_with("RELOADING=1")).unwrap();
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    wait_for(Duration::from_secs(10), "the reload log line", || {
        service
            .log()
            .contains("configuration reloaded")
            .then_some(())
    });

    // A bad file: refused, says why, old config keeps running.
    std::fs::write(&service.config_path, "trust_domain = 42\n").unwrap();
    service.signal(Signal::SIGHUP);
    receive_until(&notify, &mut got, "RELOADING then READY again", |m| {
        states(m).len() >= 5
    });
    let last_ready = got.iter().rev().find(|m| m.starts_with("READY=1")).unwrap();
    assert!(last_ready.contains("last reload refused"), "{last_ready}");
    let addr = service.http_addr();
    let (status, body) = http_get(&addr, "/ready");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("last reload refused"), "{body}");
    let (_, page) = http_get(&addr, "/metrics");
    assert_eq!(
        metric(&page, "writ_reloads_total{outcome=\"success\"}"),
        1.0
    );
    assert_eq!(
        metric(&page, "writ_reloads_total{outcome=\"failure\"}"),
        1.0
    );
    assert_eq!(metric(&page, "writ_last_reload_success"), 0.0);
    // Still serving on the old config.
    fetch_x509(&service.workload);

    let status = service.stop();
    assert_eq!(status.code(), Some(0), "{}", service.log());
    receive_until(&notify, &mut got, "STOPPING", |m| {
        m.iter().any(|m| m.starts_with("STOPPING=1"))
    });
    assert_eq!(
        states(&got),
        [
            "READY=1",
            "RELOADING=1",
            "READY=1",
            "RELOADING=1",
            "READY=1",
            "STOPPING=1"
        ],
        "{got:#?}"
    );
}

#[test]
fn no_watchdog_pets_without_watchdog_usec() {
    let mut service = Service::new("", "info");
    let notify_path = service.dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    service.spawn(&[("NOTIFY_SOCKET", notify_path.to_str().unwrap())]);
    let mut got = Vec::new();
    receive_until(&notify, &mut got, "READY", |m| !m.is_empty());
    assert_eq!(service.stop().code(), Some(0));
    receive_until(&notify, &mut got, "STOPPING", |m| {
        m.iter().any(|m| m.starts_with("STOPPING=1"))
    });
    assert!(!got.iter().any(|m| m.starts_with("WATCHDOG=1")), "{got:#?}");
}

#[test]
fn socket_activation_serves_on_passed_fds_and_leaves_them_in_place() {
    let mut service = Service::new("", "info");
    std::fs::create_dir_all(service.workload.parent().unwrap()).unwrap();
    let workload = UnixListener::bind(&service.workload).unwrap();
    let admin = UnixListener::bind(&service.admin).unwrap();
    // Modes writ would never choose: it must not touch sockets it was given.
    std::fs::set_permissions(&service.workload, std::fs::Permissions::from_mode(0o766)).unwrap();
    std::fs::set_permissions(&service.admin, std::fs::Permissions::from_mode(0o700)).unwrap();
    service.spawn_socket_activated(workload, admin);
    // Had writ ignored the fds, binding would have failed: a live socket
    // is already at both paths.
    let log = service.log();
    assert!(log.contains("using the socket passed by systemd"), "{log}");
    fetch_x509(&service.workload);
    let (ok, out, err) = common::writ_cli(
        &[
            "entry",
            "list",
            "--admin-socket",
            service.admin.to_str().unwrap(),
        ],
        None,
    );
    assert!(ok, "{out}{err}");

    assert_eq!(service.stop().code(), Some(0), "{}", service.log());
    for (path, mode) in [(&service.workload, 0o766), (&service.admin, 0o700)] {
        let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(
            meta.permissions().mode() & 0o777,
            mode,
            "{}",
            path.display()
        );
    }
}

/// Every caller holds descriptors (socket, pidfd, the /proc files its
/// attestations re-read): writ lifts a low soft limit to the hard one.
#[test]
fn the_open_file_soft_limit_is_raised_to_the_hard_limit() {
    let mut writ = Writ::start("");
    writ.kill9();
    writ.spawn_under(&["prlimit", "--nofile=256:"]);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", writ.pid())).unwrap();
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let numbers: Vec<&str> = open_files.split_whitespace().skip(3).take(2).collect();
    assert_eq!(numbers.len(), 2, "{open_files}");
    assert_eq!(
        numbers[0], numbers[1],
        "soft limit not raised: {open_files}"
    );
    assert_ne!(numbers[0], "256", "{open_files}");
}

/// The scheduling policy of every thread of `pid` (field 41 of its `stat`),
/// by thread name.
fn thread_policies(pid: u32) -> Vec<(String, u32)> {
    let mut policies = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = entry.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap();
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap();
        // Fields after the parenthesised name, which may hold spaces.
        let after_name = &stat[stat.rfind(')').unwrap() + 2..];
        let policy = after_name.split(' ').nth(41 - 3).unwrap().parse().unwrap();
        policies.push((comm.trim().to_owned(), policy));
    }
    policies
}

const SCHED_OTHER: u32 = 0;
const SCHED_BATCH: u32 = 3;
const SCHED_IDLE: u32 = 5;

/// By default writ moves every thread, the store's and the audit trail's
/// among them, to SCHED_BATCH; `inherit` leaves the policy it was started
/// with; a policy other than the default set by whoever started it is kept.
#[test]
fn threads_run_under_the_configured_cpu_scheduling_policy() {
    let assert_all = |writ: &Writ, want: u32| {
        let policies = thread_policies(writ.pid());
        assert!(
            policies.iter().any(|(name, _)| name == "writ-store")
                && policies.iter().any(|(name, _)| name == "writ-audit"),
            "{policies:?}"
        );
        assert!(
            policies.iter().all(|(_, p)| *p == want),
            "want {want}: {policies:?}"
        );
    };
    let mut writ = Writ::start("");
    assert_all(&writ, SCHED_BATCH);
    writ.kill9();
    writ.spawn_under(&["chrt", "--idle", "0"]);
    assert_all(&writ, SCHED_IDLE);
    assert!(
        writ.log()
            .contains("keeping the CPU scheduling policy writ was started with")
            && writ.log().contains("SCHED_IDLE"),
        "{}",
        writ.log()
    );

    // Reset-on-fork under the default policy: the threads move to batch,
    // and the main thread (the one the flag was set on: the kernel clears
    // it in each thread it starts) keeps the flag, which only a privileged
    // caller could clear.
    writ.kill9();
    writ.spawn_under(&["chrt", "--reset-on-fork", "--other", "0"]);
    assert_all(&writ, SCHED_BATCH);
    let shown = Command::new("chrt")
        .args(["-p", &writ.pid().to_string()])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.contains("policy: SCHED_BATCH|SCHED_RESET_ON_FORK"),
        "{shown}"
    );

    // A top-level key: before the tables `Writ::start` writes.
    writ.kill9();
    let config = std::fs::read_to_string(&writ.config_path).unwrap();
    std::fs::write(
        &writ.config_path,
        format!("cpu_scheduling = \"inherit\"\n{config}"),
    )
    .unwrap();
    writ.spawn();
    assert_all(&writ, SCHED_OTHER);
}

#[test]
fn sockets_writ_binds_itself_are_removed_on_stop() {
    let mut service = Service::new("", "info");
    service.spawn(&[]);
    assert!(service.workload.exists() && service.admin.exists());
    assert_eq!(service.stop().code(), Some(0), "{}", service.log());
    assert!(!service.workload.exists(), "workload socket left behind");
    assert!(!service.admin.exists(), "admin socket left behind");
}

#[test]
fn health_and_metrics_over_http() {
    let mut service = Service::new("", "info");
    service.spawn(&[]);
    let addr = service.http_addr();
    assert_eq!(http_get(&addr, "/live"), (200, "live\n".to_owned()));
    assert_eq!(http_get(&addr, "/ready"), (200, "ready\n".to_owned()));
    assert_eq!(http_get(&addr, "/nothing-here").0, 404);
    let (ok, out, err) = common::writ_cli(&["healthcheck", "--http", &addr], None);
    assert!(ok, "{out}{err}");

    let (status, before) = http_get(&addr, "/metrics");
    assert_eq!(status, 200);
    for name in [
        "writ_attestation_seconds",
        "writ_svids_issued",
        "writ_tasks_active",
        "writ_tasks_completed",
        "writ_revocations",
        "writ_open_streams",
        "writ_policy_denials",
        "writ_ca_expiry_seconds",
        "writ_svid_expiry_seconds",
        "writ_audit_write_seconds",
        "writ_reloads",
    ] {
        assert!(
            before.contains(&format!("# TYPE {name} ")),
            "{name} missing:\n{before}"
        );
    }
    assert!(metric(&before, "writ_ca_expiry_seconds") > 0.0, "{before}");
    for reason in [
        "end_task",
        "process_exited",
        "cgroup_empty",
        "ttl_expired",
        "parent_completed",
    ] {
        let series = format!("writ_tasks_completed_total{{reason=\"{reason}\"}} 0");
        assert!(before.contains(&series), "{series} missing:\n{before}");
    }

    // A fresh SVID is minted on this first fetch: the counter moves, and
    // the attestation and audit histograms saw it.
    fetch_x509(&service.workload);
    let (_, after) = http_get(&addr, "/metrics");
    let issued = |page: &str| metric(page, "writ_svids_issued_total{kind=\"x509\"}");
    assert_eq!(issued(&after), issued(&before) + 1.0, "{after}");
    assert!(
        metric(&after, "writ_attestation_seconds_count")
            > metric(&before, "writ_attestation_seconds_count")
    );
    assert!(
        metric(&after, "writ_audit_write_seconds_count")
            > metric(&before, "writ_audit_write_seconds_count")
    );
    assert!(metric(&after, "writ_svid_expiry_seconds") > 0.0, "{after}");

    let out = Command::new(WRIT)
        .args(["api", "fetch", "jwt", "--audience", "ops-test", "--socket"])
        .arg(&service.workload)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, page) = http_get(&addr, "/metrics");
    assert_eq!(metric(&page, "writ_svids_issued_total{kind=\"jwt\"}"), 1.0);

    // An open stream shows, and the gauge falls back when it closes.
    let mut watch = Command::new(WRIT)
        .args(["api", "watch", "--socket"])
        .arg(&service.workload)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut first = [0u8; 1];
    watch
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut first)
        .unwrap();
    let (_, page) = http_get(&addr, "/metrics");
    assert_eq!(metric(&page, "writ_open_streams"), 1.0, "{page}");
    let _ = watch.kill();
    let _ = watch.wait();
    wait_for(Duration::from_secs(20), "the stream gauge to drop", || {
        let (_, page) = http_get(&addr, "/metrics");
        (metric(&page, "writ_open_streams") == 0.0).then_some(())
    });

    // While stopping, /ready would answer 503; after exit, nothing listens.
    assert_eq!(service.stop().code(), Some(0), "{}", service.log());
    assert!(std::net::TcpStream::connect(&addr).is_err());
    let (ok, _, _) = common::writ_cli(&["healthcheck", "--http", &addr], None);
    assert!(!ok, "healthcheck passed with writ stopped");
}

#[test]
fn sigterm_ends_open_streams_and_exits_zero() {
    let mut service = Service::new("", "info");
    service.spawn(&[]);
    let mut watch = Command::new(WRIT)
        .args(["api", "watch", "--socket"])
        .arg(&service.workload)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 1];
    watch
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut first)
        .unwrap();

    let status = service.stop();
    assert_eq!(status.code(), Some(0), "{}", service.log());
    // The stream was ended by writ (not cut off at the deadline), so the
    // drain never needed to give up.
    let log = service.log();
    assert!(!log.contains("drain deadline"), "{log}");
    assert!(log.contains("writ stopped"), "{log}");
    let watch_exit = wait_for(Duration::from_secs(20), "the watch client to end", || {
        watch.try_wait().unwrap()
    });
    let _ = watch_exit;
    // The audit trail was closed with its final checkpoint.
    let (ok, out, err) = common::writ_cli(
        &[
            "audit",
            "verify",
            "--config",
            service.config_path.to_str().unwrap(),
        ],
        None,
    );
    assert!(ok, "{out}{err}");
}

#[test]
fn json_logs_go_to_stderr_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut service = Service::new("", "info");
    let stdout_path = dir.path().join("stdout");
    let stderr_path = dir.path().join("stderr");
    let child = Command::new(WRIT)
        .args(["run", "--log-format", "json", "--config"])
        .arg(&service.config_path)
        .env_remove("WRIT_LOG")
        .stdout(std::fs::File::create(&stdout_path).unwrap())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    service.child = Some(child);
    wait_for(Duration::from_secs(30), "the start log line", || {
        common::read_to_string(&stderr_path)
            .contains("writ started")
            .then_some(())
    });
    assert_eq!(service.stop().code(), Some(0));
    let stderr = common::read_to_string(&stderr_path);
    let mut started = None;
    for line in stderr.lines() {
        let event: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        if event["message"] == "writ started" {
            started = Some(event);
        }
    }
    let started = started.expect("a writ started event");
    assert_eq!(started["level"], "INFO");
    assert_eq!(started["trust_domain"], "writ.test");
    assert!(!common::read_to_string(&stdout_path).contains("\"level\""));
}

#[test]
fn systemd_units_verify() {
    let Ok(analyze) = which("systemd-analyze") else {
        eprintln!("SKIPPED: systemd-analyze is not installed; the units were not verified");
        return;
    };
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/systemd");
    let dir = tempfile::tempdir().unwrap();
    for name in ["writ.service", "writ.socket", "writ-admin.socket"] {
        let text = std::fs::read_to_string(units.join(name)).unwrap();
        // verify checks that ExecStart= names an executable; use the one
        // under test instead of the installed path.
        std::fs::write(dir.path().join(name), text.replace("/usr/bin/writ", WRIT)).unwrap();
    }
    let out = Command::new(analyze)
        .args(["verify", "--man=no"])
        .args(["writ.service", "writ.socket", "writ-admin.socket"])
        .current_dir(dir.path())
        .env("SYSTEMD_LOG_LEVEL", "notice")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.trim().is_empty(),
        "systemd-analyze complained:\n{stderr}"
    );
}

fn which(name: &str) -> Result<PathBuf, ()> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or(())
}

/// The SPIFFE IDs a fresh X.509 fetch by this process receives.
fn fetched_ids(socket: &Path) -> Vec<String> {
    let out = Command::new(WRIT)
        .args(["api", "fetch", "x509", "--output", "json", "--socket"])
        .arg(socket)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let svids: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let mut ids: Vec<String> = svids
        .iter()
        .map(|s| s["spiffe_id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

/// Issues every X.509-SVID except the one for `withheld`.
fn policy_withholding(withheld: &str) -> String {
    format!(
        r#"
@id("issue-entries")
permit (principal, action == Writ::Action::"IssueX509SVID", resource);

@id("withhold-{withheld}")
forbid (principal, action == Writ::Action::"IssueX509SVID", resource)
when {{ resource.spiffe_id == "spiffe://writ.test/{withheld}" }};
"#
    )
}

async fn agent_client(
    admin: &Path,
) -> writ::proto::admin::agent_client::AgentClient<tonic::transport::Channel> {
    let channel = writ::cli::client::connect(admin).await.unwrap();
    writ::proto::admin::agent_client::AgentClient::new(channel)
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_reload_applies_policies_and_entries_and_refuses_bad_files() {
    let uid = nix::unistd::getuid().as_raw();
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("agents.cedar");
    std::fs::write(&policy, policy_withholding("second")).unwrap();
    let extra = |entries: &[&str]| {
        let mut text = format!("[policy]\nfiles = [\"{}\"]\n", policy.display());
        for name in entries {
            text.push_str(&format!(
                "\n[[entry]]\nspiffe_id = \"spiffe://writ.test/{name}\"\nselectors = [\"unix:uid:{uid}\"]\n"
            ));
        }
        text
    };
    let mut service = Service::new(&extra(&["second"]), "info");
    let notify_path = service.dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    service.spawn(&[("NOTIFY_SOCKET", notify_path.to_str().unwrap())]);
    let mut got = Vec::new();
    receive_until(&notify, &mut got, "READY", |m| !states(m).is_empty());
    assert_eq!(
        fetched_ids(&service.workload),
        ["spiffe://writ.test/ops"],
        "the policy withholds the second identity"
    );

    // The policy turns around and a third entry appears: one Reload call
    // applies both. What was issued is now withheld, and the other way round.
    std::fs::write(&policy, policy_withholding("ops")).unwrap();
    service.write_config(
        &format!("{}\n[tasks]\nmax_depth = 3\n", extra(&["second", "third"])),
        "debug",
    );
    let mut client = agent_client(&service.admin).await;
    let reloaded = client
        .reload(writ::proto::admin::ReloadRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        reloaded.config_path,
        service.config_path.display().to_string()
    );
    assert_eq!(reloaded.entries, 3);
    assert!(reloaded.entries_changed);
    assert_eq!(reloaded.policy_ids, ["issue-entries", "withhold-ops"]);
    assert_eq!(reloaded.policy_source, policy.display().to_string());
    assert_eq!(reloaded.log_level, "debug");
    assert!(reloaded.log_level_changed);
    assert_eq!(reloaded.restart_required, ["tasks"]);
    assert_eq!(
        fetched_ids(&service.workload),
        ["spiffe://writ.test/second", "spiffe://writ.test/third"]
    );
    // systemd heard about it, as for SIGHUP.
    receive_until(&notify, &mut got, "RELOADING then READY", |m| {
        states(m).len() >= 3
    });
    assert_eq!(states(&got), ["READY=1", "RELOADING=1", "READY=1"]);

    // A broken policy is refused with its file and line; nothing changes,
    // not even the entries edited alongside it.
    std::fs::write(
        &policy,
        "permit (principal, action, resource) when { nonsense",
    )
    .unwrap();
    service.write_config(&extra(&["second"]), "debug");
    let refused = client
        .reload(writ::proto::admin::ReloadRequest {})
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(
        refused
            .message()
            .contains(&format!("{}:1:", policy.display())),
        "{}",
        refused.message()
    );
    assert_eq!(
        fetched_ids(&service.workload),
        ["spiffe://writ.test/second", "spiffe://writ.test/third"],
        "the old policy and entries are still in force"
    );
    let (status, body) = http_get(&service.http_addr(), "/ready");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("last reload refused"), "{body}");
    let (_, page) = http_get(&service.http_addr(), "/metrics");
    assert_eq!(
        metric(&page, "writ_reloads_total{outcome=\"success\"}"),
        1.0
    );
    assert_eq!(
        metric(&page, "writ_reloads_total{outcome=\"failure\"}"),
        1.0
    );

    // A config file error comes back with file:line:column.
    std::fs::write(&policy, policy_withholding("ops")).unwrap();
    std::fs::write(&service.config_path, "trust_domain = 42\n").unwrap();
    let refused = client
        .reload(writ::proto::admin::ReloadRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused
            .message()
            .contains(&format!("{}:1:", service.config_path.display())),
        "{}",
        refused.message()
    );

    // Every applied reload is in the audit trail, with who asked.
    assert_eq!(service.stop().code(), Some(0), "{}", service.log());
    let trail =
        std::fs::read_to_string(service.dir.path().join("state/audit/audit.jsonl")).unwrap();
    let reloads: Vec<serde_json::Value> = trail
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["event"] == "policy_reloaded")
        .collect();
    assert_eq!(reloads.len(), 1, "{reloads:?}");
    let record = reloads[0].to_string();
    assert!(record.contains("admin_api"), "{record}");
    assert!(record.contains("withhold-ops"), "{record}");
}

#[test]
fn reload_cli_prints_what_changed_and_fails_on_a_refusal() {
    let mut service = Service::new("", "info");
    service.spawn(&[]);
    let admin = service.admin.to_str().unwrap().to_owned();
    let uid = nix::unistd::getuid().as_raw();
    service.write_config(
        &format!(
            "[[entry]]\nspiffe_id = \"spiffe://writ.test/more\"\nselectors = [\"unix:uid:{uid}\"]\n"
        ),
        "warn",
    );
    let (ok, out, err) = common::writ_cli(&["reload", "--admin-socket", &admin], None);
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!("reloaded {}", service.config_path.display())),
        "{out}"
    );
    assert!(out.contains("Entries:     2 (changed)"), "{out}");
    assert!(out.contains("Log level:   warn (changed)"), "{out}");

    let (ok, out, err) = common::writ_cli(
        &["reload", "--admin-socket", &admin, "--output", "json"],
        None,
    );
    assert!(ok, "{err}");
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["reloaded"], true);
    assert_eq!(summary["entries"], 2);
    assert_eq!(summary["entries_changed"], false, "nothing changed since");
    assert_eq!(summary["policy_source"], "built-in");
    // The trail has both reloads, with whether the entries changed.
    let trail =
        std::fs::read_to_string(service.dir.path().join("state/audit/audit.jsonl")).unwrap();
    let reloads: Vec<(serde_json::Value, serde_json::Value)> = trail
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["event"] == "policy_reloaded")
        .map(|r| {
            (
                r["detail"]["entries"].clone(),
                r["detail"]["entries_changed"].clone(),
            )
        })
        .collect();
    assert_eq!(
        reloads,
        [
            (serde_json::json!(2), serde_json::json!(true)),
            (serde_json::json!(2), serde_json::json!(false))
        ]
    );

    std::fs::write(
        &service.config_path,
        "trust_domain = \"writ.test\"\nbogus = 1\n",
    )
    .unwrap();
    let (ok, _, err) = common::writ_cli(&["reload", "--admin-socket", &admin], None);
    assert!(!ok);
    assert!(err.contains("FailedPrecondition"), "{err}");
    assert!(
        err.contains(&format!("{}:2:", service.config_path.display())),
        "{err}"
    );
    // With --output json the refusal is JSON on stdout as well.
    let (ok, out, err) = common::writ_cli(
        &["reload", "--admin-socket", &admin, "--output", "json"],
        None,
    );
    assert!(!ok && err.contains("FailedPrecondition"), "{err}");
    let refusal: serde_json::Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("a refused reload printed no JSON ({e}): {out:?}"));
    assert_eq!(refusal["reloaded"], false, "{refusal}");
    assert_eq!(refusal["refused"], true, "{refusal}");
    assert_eq!(refusal["code"], "FailedPrecondition", "{refusal}");
    let reason = refusal["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&format!("{}:2:", service.config_path.display())),
        "{refusal}"
    );
    // A closed stdout changes nothing of that: the refusal is on stderr
    // and the exit status 1. The JSON copy on stdout failing to be written
    // (EPIPE) used to replace the refusal and pass for a reader that had
    // left early: exit 0, nothing said.
    for output in ["text", "json"] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let closed = Command::new(WRIT)
            .args(["reload", "--admin-socket", &admin, "--output", output])
            .stdout(writer)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&closed.stderr);
        assert_eq!(closed.status.code(), Some(1), "--output {output}: {err}");
        assert!(
            err.contains("FailedPrecondition"),
            "--output {output}: {err}"
        );
        if output == "json" {
            let failure: serde_json::Value = serde_json::from_str(&err).unwrap();
            assert_eq!(failure["error"]["code"], "FailedPrecondition", "{failure}");
        }
    }
    // Still serving both identities from before.
    assert_eq!(
        fetched_ids(&service.workload),
        ["spiffe://writ.test/more", "spiffe://writ.test/ops"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_is_refused_to_callers_the_admin_api_does_not_authorize() {
    let service = Service::new("", "info");
    service.write_config_with_admin("authorized = [[\"unix:uid:4242424\"]]", "", "info");
    let mut service = service;
    service.spawn(&[]);
    service.write_config_with_admin("authorized = [[\"unix:uid:4242424\"]]", "", "debug");
    let err = agent_client(&service.admin)
        .await
        .reload(writ::proto::admin::ReloadRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let (ok, _, stderr) = common::writ_cli(
        &["reload", "--admin-socket", service.admin.to_str().unwrap()],
        None,
    );
    assert!(!ok && stderr.contains("PermissionDenied"), "{stderr}");
    let (_, page) = http_get(&service.http_addr(), "/metrics");
    assert_eq!(
        metric(&page, "writ_reloads_total{outcome=\"success\"}")
            + metric(&page, "writ_reloads_total{outcome=\"failure\"}"),
        0.0,
        "no reload was attempted"
    );
}

#[test]
fn ready_turns_503_naming_a_deleted_socket() {
    let mut service = Service::new("", "info");
    service.spawn(&[]);
    let addr = service.http_addr();
    assert_eq!(http_get(&addr, "/ready"), (200, "ready\n".to_owned()));
    std::fs::remove_file(&service.workload).unwrap();
    let (status, body) = http_get(&addr, "/ready");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains(&format!(
            "Workload API socket {} was removed",
            service.workload.display()
        )),
        "{body}"
    );
    assert!(!body.contains("admin API"), "{body}");
    let (ok, _, err) = common::writ_cli(&["healthcheck", "--http", &addr], None);
    assert!(!ok && err.contains("was removed"), "{err}");

    // A stranger's socket at the same path is not writ's either.
    let _impostor = UnixListener::bind(&service.workload).unwrap();
    let (status, body) = http_get(&addr, "/ready");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("it was replaced"), "{body}");
}

/// A trail file moved away (or removed) while writ appends to it would
/// otherwise lose records from the path without a word: writ goes on
/// writing into the file it holds. /ready says so.
#[test]
fn ready_turns_503_when_the_audit_file_is_moved_away() {
    let mut service = Service::new("", "info");
    service.spawn(&[]);
    let addr = service.http_addr();
    assert_eq!(http_get(&addr, "/ready"), (200, "ready\n".to_owned()));
    let trail = service.dir.path().join("state/audit/audit.jsonl");
    std::fs::rename(&trail, trail.with_extension("moved")).unwrap();
    let (status, body) = http_get(&addr, "/ready");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no longer the one writ appends to"), "{body}");
    // Put back, it is the same file again.
    std::fs::rename(trail.with_extension("moved"), &trail).unwrap();
    assert_eq!(http_get(&addr, "/ready"), (200, "ready\n".to_owned()));
}

#[test]
fn grpc_health_follows_readiness() {
    let mut service = Service::new("", "info");
    service.spawn(&[]);
    let socket = service.workload.to_str().unwrap().to_owned();
    let (ok, out, err) = common::writ_cli(&["healthcheck", "--socket", &socket], None);
    assert!(ok, "{out}{err}");
    // The admin socket gone, writ is not ready, and gRPC health on the
    // Workload API socket says so as /ready does.
    std::fs::remove_file(&service.admin).unwrap();
    let err = common::wait_for(Duration::from_secs(10), "gRPC health NOT_SERVING", || {
        let (ok, _, err) = common::writ_cli(&["healthcheck", "--socket", &socket], None);
        (!ok).then_some(err)
    });
    assert!(err.contains("not serving"), "{err}");
    let (status, body) = http_get(&service.http_addr(), "/ready");
    assert_eq!(status, 503, "{body}");
}

/// `writ reload --output json` against `service`: the summary, or the error.
fn reload_json(service: &Service) -> Result<serde_json::Value, String> {
    let admin = service.admin.to_str().unwrap();
    let (ok, out, err) = common::writ_cli(
        &["reload", "--admin-socket", admin, "--output", "json"],
        None,
    );
    if ok {
        Ok(serde_json::from_str(&out).unwrap())
    } else {
        Err(err)
    }
}

#[test]
fn a_reload_that_moves_the_trust_domain_is_refused_and_writ_keeps_serving() {
    let mut service = Service::new("", "info");
    service.spawn(&[]);
    assert_eq!(fetched_ids(&service.workload), ["spiffe://writ.test/ops"]);

    // The trust domain and the entry move together, as an operator would
    // write them; writ cannot issue in a trust domain it does not run in.
    let original = std::fs::read_to_string(&service.config_path).unwrap();
    std::fs::write(
        &service.config_path,
        original.replace("writ.test", "probe-x.test"),
    )
    .unwrap();
    let err = reload_json(&service).unwrap_err();
    assert!(err.contains("FailedPrecondition"), "{err}");
    assert!(
        err.contains(&format!("{}:", service.config_path.display()))
            && err.contains("spiffe://probe-x.test/ops is in trust domain probe-x.test, but writ's running trust_domain is writ.test")
            && err.contains("a changed trust_domain takes effect only when writ restarts"),
        "{err}"
    );
    assert_eq!(
        fetched_ids(&service.workload),
        ["spiffe://writ.test/ops"],
        "the running configuration still serves"
    );

    // The file itself is fine: a restart puts it in force.
    assert_eq!(service.stop().code(), Some(0), "{}", service.log());
    let (ok, _, err) = common::writ_cli(
        &[
            "validate",
            "--config",
            service.config_path.to_str().unwrap(),
        ],
        None,
    );
    assert!(ok, "{err}");
}

/// `writ entry list --output json` on the admin socket at `admin`.
fn entry_list(admin: &str) -> Vec<serde_json::Value> {
    let (ok, out, err) = common::writ_cli(
        &["entry", "list", "--admin-socket", admin, "--output", "json"],
        None,
    );
    assert!(ok, "{err}");
    serde_json::from_str(&out).unwrap()
}

#[test]
fn restart_only_settings_stay_pending_until_a_restart() {
    let mut service = Service::new("", "info");
    service.spawn(&[]);
    let admin = service.admin.to_str().unwrap().to_owned();
    let config_entry_ttl = || {
        let entries = entry_list(&admin);
        assert_eq!(entries.len(), 1, "{entries:?}");
        entries[0]["x509_svid_ttl"].as_str().unwrap().to_owned()
    };
    assert_eq!(config_entry_ttl(), "1h");

    // A new default SVID lifetime and telemetry listener need a restart:
    // until then the running ones stay, entries keep the running default,
    // and every reload says so while the file differs.
    let original = std::fs::read_to_string(&service.config_path).unwrap();
    let changed =
        original.replace("127.0.0.1:0", "127.0.0.2:0") + "\n[ca]\nx509_svid_ttl = \"2h\"\n";
    std::fs::write(&service.config_path, &changed).unwrap();
    for _ in 0..2 {
        let summary = reload_json(&service).unwrap();
        assert_eq!(
            summary["restart_required"],
            serde_json::json!(["ca", "telemetry"]),
            "{summary}"
        );
        assert_eq!(config_entry_ttl(), "1h", "{summary}");
    }
    assert_eq!(http_get(&service.http_addr(), "/live").0, 200);

    // Put back, the file matches what runs: nothing is pending.
    std::fs::write(&service.config_path, &original).unwrap();
    let summary = reload_json(&service).unwrap();
    assert_eq!(
        summary["restart_required"],
        serde_json::json!([]),
        "{summary}"
    );
    assert_eq!(config_entry_ttl(), "1h");
}

#[test]
fn a_config_entry_may_not_hide_an_entry_created_through_the_admin_api() {
    let uid = nix::unistd::getuid().as_raw();
    let mut service = Service::new("", "info");
    service.spawn(&[]);
    let admin = service.admin.to_str().unwrap().to_owned();
    let selector = format!("unix:uid:{uid}");
    let (ok, id, err) = common::writ_cli(
        &[
            "entry",
            "create",
            "--admin-socket",
            &admin,
            "--spiffe-id",
            "spiffe://writ.test/made",
            "--selector",
            &selector,
            "--hint",
            "stored",
        ],
        None,
    );
    assert!(ok, "{err}");
    let id = id.trim().to_owned();
    let listed = || {
        entry_list(&admin)
            .iter()
            .map(|e| format!("{} {}", e["id"].as_str().unwrap(), e["source"]))
            .collect::<Vec<_>>()
    };
    let before = listed();
    assert_eq!(before.len(), 2, "{before:?}");
    assert!(before.contains(&format!("{id} \"admin\"")), "{before:?}");

    // The same SPIFFE ID and selectors in the file: the same entry id.
    let same = format!(
        "[[entry]]\nspiffe_id = \"spiffe://writ.test/made\"\nselectors = [\"{selector}\"]\n"
    );
    service.write_config(&same, "info");
    let err = reload_json(&service).unwrap_err();
    assert!(err.contains("FailedPrecondition"), "{err}");
    assert!(
        err.contains(&format!("{id} (spiffe://writ.test/made)"))
            && err.contains("created through the admin API")
            && err.contains(&format!("`writ entry delete {id}`")),
        "{err}"
    );
    assert_eq!(listed(), before, "nothing changed");

    // Nor can writ start with such a file; the stored entry stays.
    assert_eq!(service.stop().code(), Some(0), "{}", service.log());
    let (code, output) = common::run_expecting_failure(&service.config_path);
    assert_eq!(code, Some(1), "{output}");
    assert!(
        output.contains(&format!("{id} (spiffe://writ.test/made)")),
        "{output}"
    );
    service.write_config("", "info");
    service.spawn(&[]);
    assert_eq!(listed(), before, "the stored entry is kept");

    // Deleted through the admin API, it may come from the file.
    let (ok, _, err) = common::writ_cli(&["entry", "delete", "--admin-socket", &admin, &id], None);
    assert!(ok, "{err}");
    service.write_config(&same, "info");
    let summary = reload_json(&service).unwrap();
    assert_eq!(summary["entries"], 2, "{summary}");
    assert!(listed().contains(&format!("{id} \"config\"")));
}

/// `writ audit verify` on `service`'s trail: it must pass, the last run
/// must have closed it, and no run may have ended without closing it.
fn assert_trail_closed_cleanly(service: &Service, after: &str) {
    let (ok, out, err) = common::writ_cli(
        &[
            "audit",
            "verify",
            "--config",
            service.config_path.to_str().unwrap(),
        ],
        None,
    );
    assert!(
        ok && out.contains("closed cleanly") && !err.contains("without a close checkpoint"),
        "after {after}: {out}{err}"
    );
}

#[test]
fn a_start_that_fails_closes_the_audit_trail_and_removes_its_sockets() {
    let mut service = Service::new("", "info");
    service.spawn(&[]);
    assert_eq!(service.stop().code(), Some(0), "{}", service.log());
    assert_trail_closed_cleanly(&service, "a clean stop");
    let original = std::fs::read_to_string(&service.config_path).unwrap();
    let fail_to_start = |config: &str, reason: &str| {
        std::fs::write(&service.config_path, config).unwrap();
        let (code, output) = common::run_expecting_failure(&service.config_path);
        assert_eq!(code, Some(1), "{output}");
        assert!(output.contains(reason), "{output}");
        assert!(!output.contains("closing audit checkpoint"), "{output}");
        assert_trail_closed_cleanly(&service, reason);
        assert!(!service.workload.exists(), "{reason}: workload socket left");
        assert!(!service.admin.exists(), "{reason}: admin socket left");
    };

    // A policy file that is missing.
    let missing = service.dir.path().join("missing.cedar");
    fail_to_start(
        &format!(
            "{original}\n[policy]\nfiles = [\"{}\"]\n",
            missing.display()
        ),
        &format!("{}: cannot read policy file", missing.display()),
    );

    // The telemetry port in use: both sockets were bound by then.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    fail_to_start(
        &original.replace("127.0.0.1:0", &taken_addr),
        &format!("binding the telemetry listener on {taken_addr}"),
    );
    drop(taken);

    // The admin socket served by another writ: the workload socket was
    // bound by then, and the other writ's socket is left alone.
    let other = Writ::start("");
    let others_admin = other.dir.path().join("run/admin.sock");
    fail_to_start(
        &original.replace(
            service.admin.to_str().unwrap(),
            others_admin.to_str().unwrap(),
        ),
        "already has a server listening",
    );
    let (ok, _, err) = common::writ_cli(
        &[
            "task",
            "list",
            "--admin-socket",
            others_admin.to_str().unwrap(),
        ],
        None,
    );
    assert!(ok, "the other writ's admin socket still serves: {err}");

    // And the next start finds a trail that ended cleanly.
    std::fs::write(&service.config_path, &original).unwrap();
    service.spawn(&[]);
    assert_eq!(service.stop().code(), Some(0), "{}", service.log());
    assert_trail_closed_cleanly(&service, "starting again");
}

/// Writes, in a new directory `dir`, the config of a second writ with
/// these state directory and sockets (and `extra` tables); returns its path.
fn second_writ_config(
    dir: &Path,
    data_dir: &Path,
    workload: &Path,
    admin: &Path,
    extra: &str,
) -> PathBuf {
    std::fs::create_dir(dir).unwrap();
    let config = dir.join("writ.toml");
    std::fs::write(
        &config,
        format!(
            "trust_domain = \"writ.test\"\ndata_dir = \"{}\"\n\
             [workload_api]\nsocket_path = \"{}\"\n\
             [admin_api]\nsocket_path = \"{}\"\n{extra}",
            data_dir.display(),
            workload.display(),
            admin.display(),
        ),
    )
    .unwrap();
    config
}

/// A writ whose socket files were removed while it ran, and then bound by
/// another writ on the same paths, must leave them be when it stops: it
/// used to remove them, leaving the other writ serving but unreachable.
#[test]
fn a_stopping_writ_leaves_socket_paths_another_writ_has_bound_since() {
    let mut first = Writ::start("");
    let admin = first.dir.path().join("run/admin.sock");
    std::fs::remove_file(&first.socket).unwrap();
    std::fs::remove_file(&admin).unwrap();
    let second = first.dir.path().join("second");
    let config = second_writ_config(&second, &second.join("state"), &first.socket, &admin, "");
    let mut other = Command::new(WRIT)
        .args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let endpoint = first.endpoint();
    let other_serves = || common::writ_cli(&["healthcheck", "--socket", &endpoint], None).0;
    wait_for(Duration::from_secs(30), "the second writ to serve", || {
        other_serves().then_some(())
    });

    assert_eq!(first.stop().code(), Some(0), "{}", first.log());
    let (still_serving, both_there) = (other_serves(), first.socket.exists() && admin.exists());
    let _ = kill(Pid::from_raw(other.id() as i32), Signal::SIGTERM);
    let _ = other.wait();
    assert!(both_there, "the stopping writ removed the other's sockets");
    assert!(still_serving, "the other writ is no longer reachable");
}

/// One writ per state directory: a second on the same data_dir (its own
/// sockets and audit trail) would share the CA and the store while keeping
/// its own view of active tasks, and answer for tasks it does not run. It
/// is refused before it changes anything, naming the running writ.
#[test]
fn a_second_writ_on_the_same_state_directory_is_refused() {
    let first = Writ::start("");
    let second = first.dir.path().join("second");
    let config = second_writ_config(
        &second,
        &first.dir.path().join("state"),
        &second.join("w.sock"),
        &second.join("a.sock"),
        &format!(
            "[audit]\npath = \"{}\"\n",
            second.join("audit/audit.jsonl").display()
        ),
    );
    let (code, log) = common::run_expecting_failure(&config);
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains("is in use by another writ")
            && log.contains(&format!("(pid {})", first.pid())),
        "{log}"
    );
    assert!(!second.join("audit").exists(), "the second opened a trail");
    assert!(!second.join("w.sock").exists());
    // With writ.lock deleted by hand, the directory's own lock still holds.
    let lock = first.dir.path().join("state/writ.lock");
    std::fs::remove_file(&lock).unwrap();
    let (code, log) = common::run_expecting_failure(&config);
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("is in use by another writ"), "{log}");
    assert!(!lock.exists(), "the second writ took a new writ.lock");
    assert!(!second.join("audit").exists(), "the second opened a trail");
}

/// Whether process `pid` catches `signal` (its `SigCgt` mask in /proc).
fn catches(pid: Pid, signal: Signal) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (signal as i32 - 1)) != 0)
}

/// A SIGHUP while writ starts is not fatal: it is caught from the moment
/// writ catches any signal (before that the process is still loading, and
/// nothing can catch one), and taken as one reload once writ is ready.
#[test]
fn a_sighup_while_writ_starts_is_a_reload_once_it_is_ready() {
    let mut service = Service::new("", "info");
    service.spawn_without_waiting(&[]);
    let pid = service.pid();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !catches(pid, Signal::SIGTERM) {
        assert!(Instant::now() < deadline, "writ never caught SIGTERM");
        std::thread::sleep(Duration::from_micros(200));
    }
    let until = Instant::now() + Duration::from_millis(200);
    while Instant::now() < until && kill(pid, Signal::SIGHUP).is_ok() {
        std::thread::sleep(Duration::from_millis(2));
    }
    service.wait_ready();
    wait_for(
        Duration::from_secs(10),
        "the reload the SIGHUP asked for",
        || {
            service
                .log()
                .contains("configuration reloaded")
                .then_some(())
        },
    );
    let status = service.stop();
    assert_eq!(status.code(), Some(0), "{status:?}\n{}", service.log());
    assert_trail_closed_cleanly(&service, "a SIGHUP while starting");
}

/// A store deleted or emptied beside a CA that has state: starting would
/// begin a new store and drop every revocation from the CRLs, so writ
/// refuses, says why and what to do, and creates nothing; the store put
/// back, it starts with its revocations.
#[test]
fn a_lost_store_beside_an_existing_ca_refuses_the_start() {
    let mut service = Service::new("", "info");
    service.spawn(&[]);
    let admin = service.admin.to_str().unwrap().to_owned();
    let mut sleeper = Command::new("sleep").arg("60").spawn().unwrap();
    let task = |args: &[&str]| {
        let (ok, _, err) = common::writ_cli(
            &[&["task"], args, &["--admin-socket", &admin]].concat(),
            None,
        );
        assert!(ok, "{err}");
    };
    task(&[
        "begin",
        "--pid",
        &sleeper.id().to_string(),
        "--id",
        "revoked",
    ]);
    task(&["end", "revoked"]);
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    let crl_entries = |service: &Service| {
        let (_, page) = http_get(&service.http_addr(), "/metrics");
        metric(&page, "writ_crl_entries")
    };
    let revoked = wait_for(Duration::from_secs(10), "a CRL entry", || {
        Some(crl_entries(&service)).filter(|&n| n > 0.0)
    });
    assert!(service.stop().success());

    let state = service.dir.path().join("state");
    let store = state.join("writ.db");
    let backup = service.dir.path().join("writ.db.backup");
    std::fs::copy(&store, &backup).unwrap();
    for gone in ["writ.db", "writ.db-wal", "writ.db-shm"] {
        let _ = std::fs::remove_file(state.join(gone));
    }
    let refused = |what: &str| {
        let (code, output) = common::run_expecting_failure(&service.config_path);
        assert_eq!(code, Some(1), "{what}: {output}");
        for needed in [
            format!("the store {} is missing or empty", store.display()),
            "would lose every revocation".to_owned(),
            "Restore".to_owned(),
            format!("remove {}", state.join("ca").display()),
        ] {
            assert!(output.contains(&needed), "{what}: {needed:?} in {output}");
        }
    };
    refused("deleted");
    assert!(!store.exists(), "the refused start created a store");
    std::fs::write(&store, b"").unwrap();
    refused("emptied");
    assert_eq!(std::fs::metadata(&store).unwrap().len(), 0);

    std::fs::copy(&backup, &store).unwrap();
    service.spawn(&[]);
    assert_eq!(
        crl_entries(&service),
        revoked,
        "the revocation is back in the CRL"
    );
}

/// Writs before the state directory's locks take only their audit trail's
/// writer lock. A newer writ started beside one must refuse before it opens
/// the store: it used to migrate the schema first and fail on the trail's
/// lock after, leaving a store the running (older) writ refuses at its next
/// start. The older writ is stood in for by this test holding that lock.
#[test]
fn a_trail_locked_by_another_process_refuses_the_start_before_the_store_is_opened() {
    let mut service = Service::new("", "info");
    service.spawn(&[]);
    assert!(service.stop().success());
    let state = service.dir.path().join("state");
    let trail = state.join("audit/audit.jsonl");
    let lock = state.join("audit/audit.jsonl.lock");
    let store_files = || {
        let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&state)
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_name().to_string_lossy().starts_with("writ.db"))
            .map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                (name, std::fs::read(e.path()).unwrap())
            })
            .collect();
        files.sort();
        files
    };
    let before = store_files();
    let held = std::fs::OpenOptions::new().write(true).open(&lock).unwrap();
    rustix::fs::flock(&held, rustix::fs::FlockOperation::NonBlockingLockExclusive).unwrap();
    let (code, log) = common::run_expecting_failure(&service.config_path);
    drop(held);
    assert_eq!(code, Some(1), "{log}");
    assert_eq!(store_files(), before, "the refused start changed the store");
    assert!(
        log.contains(&format!(
            "audit trail {} is in use by another writ",
            trail.display()
        )) && log.contains("perhaps an older version"),
        "{log}"
    );
    service.spawn(&[]);
}
