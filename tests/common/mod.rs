//! Shared harness for integration tests: starts the real `writ` binary on a
//! temporary data directory and socket, and stops it when dropped.
#![allow(dead_code)]

pub mod handoff;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const WRIT: &str = env!("CARGO_BIN_EXE_writ");

/// An unprivileged uid that exists on Debian-like systems ("nobody").
pub const NOBODY: u32 = 65534;

pub struct Writ {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub config_path: PathBuf,
    child: Option<Child>,
}

impl Writ {
    /// Starts writ with `config_body` appended to a config that points data
    /// and sockets into a fresh temp dir. The temp dir is world-traversable so
    /// tests can run clients under other uids.
    pub fn start(config_body: &str) -> Writ {
        Writ::start_in("writ.test", config_body)
    }

    /// `start` in another trust domain.
    pub fn start_in(trust_domain: &str, config_body: &str) -> Writ {
        let dir = traversable_tempdir("writ-test-");
        let socket = dir.path().join("run/workload.sock");
        let config_path = dir.path().join("writ.toml");
        // The socket paths go into the test's own [admin_api] table when it
        // has one (TOML forbids defining a table twice).
        let admin_line = format!(
            "socket_path = \"{}\"",
            dir.path().join("run/admin.sock").display()
        );
        let (admin_table, body) = if config_body.contains("[admin_api]\n") {
            (
                String::new(),
                config_body.replacen("[admin_api]\n", &format!("[admin_api]\n{admin_line}\n"), 1),
            )
        } else {
            (
                format!("[admin_api]\n{admin_line}\n"),
                config_body.to_owned(),
            )
        };
        // Likewise the workload socket goes into the test's [workload_api].
        let workload_line = format!("socket_path = \"{}\"", socket.display());
        let (workload_table, body) = if body.contains("[workload_api]\n") {
            (
                String::new(),
                body.replacen(
                    "[workload_api]\n",
                    &format!("[workload_api]\n{workload_line}\n"),
                    1,
                ),
            )
        } else {
            (format!("[workload_api]\n{workload_line}\n"), body)
        };
        let config = format!(
            "trust_domain = \"{trust_domain}\"\ndata_dir = \"{data}\"\n\n{workload_table}\n{admin_table}\n{body}\n",
            data = dir.path().join("state").display(),
        );
        std::fs::write(&config_path, config).unwrap();
        let mut writ = Writ {
            dir,
            socket,
            config_path,
            child: None,
        };
        writ.spawn();
        writ
    }

    /// (Re)starts the process on the same config and data.
    pub fn spawn(&mut self) {
        self.spawn_under(&[]);
    }

    /// `spawn`, with writ run by `wrapper` (a program and its arguments,
    /// such as `prlimit --nofile=256:`).
    pub fn spawn_under(&mut self, wrapper: &[&str]) {
        self.spawn_process(wrapper);
        self.wait_ready();
    }

    /// Starts the process on the same config and data without waiting for
    /// it to be ready (to kill it while it starts, say).
    pub fn spawn_without_waiting(&mut self) {
        self.spawn_process(&[]);
    }

    fn spawn_process(&mut self, wrapper: &[&str]) {
        let log = std::fs::File::create(self.dir.path().join("writ.log")).unwrap();
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(WRIT);
                c
            }
            None => Command::new(WRIT),
        };
        let child = command
            .args(["run", "--config"])
            .arg(&self.config_path)
            .env("WRIT_LOG", "writ=debug,info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("writ exited early with {status}:\n{}", self.log());
            }
            let ok = Command::new(WRIT)
                .args(["healthcheck", "--socket"])
                .arg(&self.socket)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "writ did not become ready:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(self.dir.path().join("writ.log")) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// SIGKILL, as a crash would; the data dir stays for a restart.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("writ is running");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("writ did not stop on SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Writ {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `writ run --config <config>` where it must fail to start: waits
/// for it to exit and returns its exit code and everything it wrote. A
/// writ still running after 30 s is killed and fails the test.
pub fn run_expecting_failure(config: &Path) -> (Option<i32>, String) {
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new(WRIT)
        .args(["run", "--config"])
        .arg(config)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .stdin(Stdio::null())
        .stdout(log.reopen().unwrap())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "writ started although it should have refused to:\n{}",
                read_to_string(log.path())
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status.code(), read_to_string(log.path()))
}

/// Runs `writ` as a CLI client and returns (success, stdout, stderr).
pub fn writ_cli(args: &[&str], uid: Option<u32>) -> (bool, String, String) {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(WRIT);
    cmd.args(args);
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Re-runs this test binary as a helper process: the ignored test named
/// `helper` executes with `WRIT_TEST_HELPER=<role>` and the given env.
pub fn helper_command(role: &str) -> Command {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    cmd.args([
        "--ignored",
        "--exact",
        "helper",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("WRIT_TEST_HELPER", role);
    cmd
}

/// `err` refuses a connection whose process, root when it connected, has
/// become nobody since.
#[track_caller]
pub fn assert_refused_for_dropping_to_nobody(err: &tonic::Status) {
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains(&format!(
            "connected as uid 0 gid 0 and now runs as uid {NOBODY}"
        )),
        "{}",
        err.message()
    );
}

/// A temporary directory (removed when dropped) that processes of other
/// uids may pass through, to reach sockets and binaries placed in it.
pub fn traversable_tempdir(prefix: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Copies the executable `from` to `to` so that it can be run at once.
///
/// The copy is written by cp(1), not by this process: while this process
/// holds the copy open for writing, any process another test thread forks
/// inherits that descriptor until it execs, and executing the copy in that
/// window fails with ETXTBSY ("Text file busy"). A loaded machine widens the
/// window enough for parallel tests to hit it. cp's descriptor is closed
/// when cp exits, and no process of ours ever holds it.
pub fn copy_executable(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg("--")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "cp {} {}: {status}",
        from.display(),
        to.display()
    );
}

/// The serials (hex) a set of DER CRLs lists as revoked.
pub fn revoked_serials(crls: &[bytes::Bytes]) -> Vec<String> {
    let mut out = Vec::new();
    for der in crls {
        use x509_parser::prelude::FromDer as _;
        let (_, crl) =
            x509_parser::revocation_list::CertificateRevocationList::from_der(der).unwrap();
        for r in crl.iter_revoked_certificates() {
            out.push(hex::encode(r.raw_serial()));
        }
    }
    out
}

/// The highest CRL number among a set of DER CRLs; 0 for none.
pub fn crl_number(crls: &[bytes::Bytes]) -> u64 {
    use x509_parser::prelude::FromDer as _;
    crls.iter()
        .map(|der| {
            let (_, crl) =
                x509_parser::revocation_list::CertificateRevocationList::from_der(der).unwrap();
            let digits = crl.crl_number().unwrap().to_u64_digits();
            assert!(digits.len() <= 1, "{digits:?}");
            digits.first().copied().unwrap_or(0)
        })
        .max()
        .unwrap_or(0)
}

/// Polls `f` until it returns Some, or panics after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn read_to_string(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// GET `path` from a writ telemetry listener; returns (status code, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}
