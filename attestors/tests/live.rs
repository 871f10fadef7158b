//! Attesting real processes on this host: children with other credentials,
//! children moved into cgroups the test creates, dead and reaped children.
//! Needs root and a cgroup v2 mount (found via mountinfo, never assumed).

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use rustix::event::{PollFd, PollFlags, poll};
use rustix::process::{Pid, PidfdFlags, Signal, pidfd_open, pidfd_send_signal};
use sha2::{Digest, Sha256};
use writ_attestors::{
    AttestError, AttestorConfig, AttestorSet, CgroupConfig, PinnedProcess, Selector,
    find_cgroup2_mount, is_descendant_of, parent_of,
};

const SLEEP: &str = "/usr/bin/sleep";
const CONTAINER_ID: &str = "5e0c9a4b3d2f1e0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a";

/// Kills and reaps the child however the test ends.
struct Kid(Child);

impl Kid {
    fn sleep() -> Self {
        Self(Command::new(SLEEP).arg("30").spawn().unwrap())
    }

    fn pid(&self) -> i32 {
        self.0.id() as i32
    }
}

impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Cgroup directories created for one test and the children placed in them.
/// On drop the children are killed and reaped first (a populated cgroup
/// cannot be removed), then the directories, innermost first.
struct TestCgroups {
    mount: PathBuf,
    created: Vec<PathBuf>,
    kids: Vec<Kid>,
}

impl TestCgroups {
    fn new() -> Self {
        let mount = find_cgroup2_mount()
            .unwrap()
            .expect("these tests need a cgroup2 mount");
        Self {
            mount,
            created: Vec::new(),
            kids: Vec::new(),
        }
    }

    /// Creates `path` (absolute within the hierarchy) and any missing parents.
    fn create(&mut self, path: &str) {
        let mut dir = self.mount.clone();
        for component in path.trim_start_matches('/').split('/') {
            dir.push(component);
            if !dir.exists() {
                fs::create_dir(&dir).unwrap();
                self.created.push(dir.clone());
            }
        }
    }

    /// A `sleep` child moved into `path`, which is created first.
    fn sleeper_in(&mut self, path: &str) -> i32 {
        self.create(path);
        let kid = Kid::sleep();
        let pid = kid.pid();
        self.kids.push(kid);
        let procs = self
            .mount
            .join(path.trim_start_matches('/'))
            .join("cgroup.procs");
        fs::write(&procs, pid.to_string()).unwrap();
        pid
    }
}

impl Drop for TestCgroups {
    fn drop(&mut self) {
        self.kids.clear();
        for dir in self.created.iter().rev() {
            // The kernel may need a moment to drop a just-reaped task from
            // the cgroup; retrying keeps the host clean.
            for _ in 0..50 {
                if fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
}

fn unique(tag: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "writ-test-{tag}-{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn set_with_roots(roots: &[&str]) -> AttestorSet {
    AttestorSet::new(AttestorConfig {
        cgroup: CgroupConfig {
            trusted_roots: roots.iter().map(|r| (*r).to_owned()).collect(),
            mount: None,
        },
        ..AttestorConfig::default()
    })
    .unwrap()
}

fn strings(selectors: &[Selector]) -> Vec<String> {
    selectors.iter().map(ToString::to_string).collect()
}

fn of_kinds(selectors: &[Selector], kinds: &[&str]) -> Vec<String> {
    selectors
        .iter()
        .filter(|s| kinds.contains(&s.kind()))
        .map(ToString::to_string)
        .collect()
}

/// Name for an id from an /etc/passwd-format file, read independently of NSS.
fn name_in(file: &str, id: u32) -> Option<String> {
    fs::read_to_string(file).ok()?.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.get(2)? == &id.to_string().as_str()).then(|| fields[0].to_owned())
    })
}

fn sha256_hex(path: &Path) -> String {
    hex::encode(Sha256::digest(fs::read(path).unwrap()))
}

/// Blocks until the pinned process has exited (the pidfd turns readable).
fn wait_for_exit(process: &PinnedProcess) {
    let mut fds = [PollFd::from_borrowed_fd(process.pidfd(), PollFlags::IN)];
    poll(&mut fds, None).unwrap();
}

#[test]
fn a_sleeping_child_has_its_credentials_path_and_digest() {
    let kid = Kid::sleep();
    let process = PinnedProcess::open(kid.pid()).unwrap();
    let set = AttestorSet::new(AttestorConfig::default()).unwrap();
    let attestation = set.attest(&process).unwrap();
    let got = strings(&attestation.selectors);

    let uid = nix::unistd::geteuid().as_raw();
    let gid = nix::unistd::getegid().as_raw();
    let real_binary = fs::canonicalize(SLEEP).unwrap();
    let mut expected = vec![
        format!("unix:uid:{uid}"),
        format!("unix:gid:{gid}"),
        format!("unix:path:{}", real_binary.display()),
        format!("unix:sha256:{}", sha256_hex(&real_binary)),
    ];
    expected.extend(name_in("/etc/passwd", uid).map(|n| format!("unix:user:{n}")));
    expected.extend(name_in("/etc/group", gid).map(|n| format!("unix:group:{n}")));
    for selector in &expected {
        assert!(got.contains(selector), "missing {selector} in {got:?}");
    }

    let snapshot = &attestation.snapshot;
    assert_eq!(snapshot.pid, kid.pid());
    assert_eq!(snapshot.ppid, std::process::id() as i32);
    assert_eq!(snapshot.start_time, process.start_time());
    assert_eq!(snapshot.exe_path.as_deref(), Some(real_binary.as_path()));

    let mut sorted = attestation.selectors.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted, attestation.selectors);

    // Second attestation hits the caches and must say the same.
    assert_eq!(
        set.attest(&process).unwrap().selectors,
        attestation.selectors
    );
}

#[test]
fn a_child_running_as_nobody_shows_that_uid_gid_and_names() {
    let kid = Kid(Command::new(SLEEP)
        .arg("30")
        .uid(65534)
        .gid(65534)
        .spawn()
        .unwrap());
    let process = PinnedProcess::open(kid.pid()).unwrap();
    let set = AttestorSet::new(AttestorConfig::default()).unwrap();
    let attestation = set.attest(&process).unwrap();
    let got = strings(&attestation.selectors);

    assert_eq!(attestation.snapshot.uid, 65534);
    assert_eq!(attestation.snapshot.gid, 65534);
    assert!(got.contains(&"unix:uid:65534".to_owned()), "{got:?}");
    assert!(got.contains(&"unix:gid:65534".to_owned()), "{got:?}");
    let user = name_in("/etc/passwd", 65534).expect("uid 65534 has a name on the test host");
    assert!(got.contains(&format!("unix:user:{user}")), "{got:?}");
    if let Some(group) = name_in("/etc/group", 65534) {
        assert!(got.contains(&format!("unix:group:{group}")), "{got:?}");
    }
    assert!(!got.contains(&"unix:uid:0".to_owned()));

    // Supplementary groups as the kernel reports them, read independently.
    let status = fs::read_to_string(format!("/proc/{}/status", kid.pid())).unwrap();
    let groups: Vec<String> = status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .unwrap()
        .split_whitespace()
        .map(|g| format!("unix:supplementary_gid:{g}"))
        .collect();
    let got_groups: Vec<String> = got
        .iter()
        .filter(|s| s.starts_with("unix:supplementary_gid:"))
        .cloned()
        .collect();
    assert_eq!(got_groups, groups);
}

#[test]
fn a_child_in_a_trusted_cgroup_gets_path_ancestors_and_systemd_unit() {
    let mut cgroups = TestCgroups::new();
    let name = unique("cg");
    let root = format!("/{name}.slice");
    let slice = format!("{root}/{name}-app.slice");
    let scope = format!("{slice}/{name}.scope");
    let leaf = format!("{scope}/worker");
    let pid = cgroups.sleeper_in(&leaf);

    let set = set_with_roots(&[&root]);
    assert_eq!(set.cgroup_mount(), Some(cgroups.mount.as_path()));
    let process = PinnedProcess::open(pid).unwrap();
    let attestation = set.attest(&process).unwrap();
    assert_eq!(
        attestation.snapshot.cgroup_path.as_deref(),
        Some(leaf.as_str())
    );

    let mut expected = vec![
        format!("cgroup:path:{leaf}"),
        format!("cgroup:path:{scope}"),
        format!("cgroup:path:{slice}"),
        format!("cgroup:path:{root}"),
        format!("systemd:slice:{name}-app.slice"),
        format!("systemd:unit:{name}.scope"),
    ];
    expected.sort();
    assert_eq!(
        of_kinds(&attestation.selectors, &["cgroup", "systemd", "container"]),
        expected
    );

    // The same process with the test root untrusted: no cgroup facts at all.
    let untrusted = AttestorSet::new(AttestorConfig::default()).unwrap();
    let attestation = untrusted.attest(&process).unwrap();
    assert!(of_kinds(&attestation.selectors, &["cgroup", "systemd", "container"]).is_empty());
    assert!(!of_kinds(&attestation.selectors, &["unix"]).is_empty());
}

#[test]
fn a_child_in_a_docker_style_scope_gets_container_selectors() {
    let mut cgroups = TestCgroups::new();
    let name = unique("ctr");
    let root = format!("/{name}.slice");
    let scope = format!("{root}/docker-{CONTAINER_ID}.scope");
    // A sub-cgroup named like a unit, as a container could create: it must
    // not rename the unit.
    let leaf = format!("{scope}/system.slice/sshd.service");
    let pid = cgroups.sleeper_in(&leaf);

    let set = set_with_roots(&[&root]);
    let attestation = set.attest(&PinnedProcess::open(pid).unwrap()).unwrap();
    let got = of_kinds(&attestation.selectors, &["systemd", "container"]);
    let mut expected = vec![
        format!("container:id:{CONTAINER_ID}"),
        "container:runtime:docker".to_owned(),
        format!("systemd:slice:{name}.slice"),
        format!("systemd:unit:docker-{CONTAINER_ID}.scope"),
    ];
    expected.sort();
    assert_eq!(got, expected);
    assert!(strings(&attestation.selectors).contains(&format!("cgroup:path:{scope}")));
}

#[test]
fn a_look_alike_path_outside_trusted_roots_yields_nothing() {
    let mut cgroups = TestCgroups::new();
    let name = unique("look");
    let trusted = format!("/{name}.slice");
    // Shares the trusted root's text as a prefix but is a different segment,
    // and contains paths that would be trusted if anchored elsewhere.
    let look_alike = format!("/{name}.slice2/system.slice/docker-{CONTAINER_ID}.scope");
    let pid = cgroups.sleeper_in(&look_alike);

    let set = set_with_roots(&[&trusted, "/system.slice", "/docker"]);
    let attestation = set.attest(&PinnedProcess::open(pid).unwrap()).unwrap();
    assert_eq!(
        attestation.snapshot.cgroup_path.as_deref(),
        Some(look_alike.as_str())
    );
    assert!(
        of_kinds(&attestation.selectors, &["cgroup", "systemd", "container"]).is_empty(),
        "{:?}",
        attestation.selectors
    );
    assert!(strings(&attestation.selectors).contains(&"unix:uid:0".to_owned()));
}

#[test]
fn a_killed_and_reaped_child_is_gone() {
    let mut kid = Kid::sleep();
    let process = PinnedProcess::open(kid.pid()).unwrap();
    let set = AttestorSet::new(AttestorConfig::default()).unwrap();
    assert!(!process.has_exited());
    process.confirm_alive().unwrap();
    set.attest(&process).unwrap();

    kid.0.kill().unwrap();
    kid.0.wait().unwrap();
    assert!(process.has_exited());
    assert!(matches!(
        set.attest(&process),
        Err(AttestError::ProcessGone { pid }) if pid == kid.pid()
    ));
    assert!(matches!(
        process.confirm_alive(),
        Err(AttestError::ProcessGone { .. })
    ));
    assert!(matches!(
        PinnedProcess::open(kid.pid()),
        Err(AttestError::ProcessGone { .. })
    ));
}

#[test]
fn a_zombie_is_gone_even_though_its_proc_entry_remains() {
    let kid = Kid::sleep();
    let process = PinnedProcess::open(kid.pid()).unwrap();
    pidfd_send_signal(process.pidfd(), Signal::KILL).unwrap();
    wait_for_exit(&process);
    // Not reaped yet: /proc/<pid> still exists and shows the same start time.
    assert!(Path::new(&format!("/proc/{}/stat", kid.pid())).exists());
    assert!(process.has_exited());
    let set = AttestorSet::new(AttestorConfig::default()).unwrap();
    assert!(matches!(
        set.attest(&process),
        Err(AttestError::ProcessGone { .. })
    ));
    assert!(matches!(
        process.confirm_alive(),
        Err(AttestError::ProcessGone { .. })
    ));
}

#[test]
fn from_pidfd_checks_the_pid_the_kernel_reports() {
    let kid = Kid::sleep();
    let other = Kid::sleep();
    let pid = Pid::from_raw(kid.pid()).unwrap();

    let pinned =
        PinnedProcess::from_pidfd(kid.pid(), pidfd_open(pid, PidfdFlags::empty()).unwrap())
            .unwrap();
    assert_eq!(
        pinned.start_time(),
        PinnedProcess::open(kid.pid()).unwrap().start_time()
    );

    let mismatch =
        PinnedProcess::from_pidfd(other.pid(), pidfd_open(pid, PidfdFlags::empty()).unwrap());
    assert!(matches!(
        mismatch,
        Err(AttestError::PidfdMismatch { expected, actual }) if expected == other.pid() && actual == kid.pid()
    ));

    let mut dead = Kid::sleep();
    let fd = pidfd_open(Pid::from_raw(dead.pid()).unwrap(), PidfdFlags::empty()).unwrap();
    dead.0.kill().unwrap();
    dead.0.wait().unwrap();
    assert!(matches!(
        PinnedProcess::from_pidfd(dead.pid(), fd),
        Err(AttestError::ProcessGone { .. })
    ));
}

#[test]
fn a_grandchild_descends_from_its_shell_and_from_us() {
    let mut shell = Kid(Command::new("/bin/sh")
        .args(["-c", "sleep 30 & echo $!; wait"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap());
    let mut line = String::new();
    BufReader::new(shell.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let grandchild = PinnedProcess::open(line.trim().parse().unwrap()).unwrap();
    // Killed first so the shell's `wait` returns and the shell reaps it.
    struct KillOnDrop<'a>(&'a PinnedProcess);
    impl Drop for KillOnDrop<'_> {
        fn drop(&mut self) {
            let _ = pidfd_send_signal(self.0.pidfd(), Signal::KILL);
        }
    }
    let _guard = KillOnDrop(&grandchild);

    let shell_process = PinnedProcess::open(shell.pid()).unwrap();
    let me = PinnedProcess::open(std::process::id() as i32).unwrap();
    let g = grandchild.pid();

    assert_eq!(
        parent_of(g).unwrap(),
        Some((shell.pid(), shell_process.start_time()))
    );
    assert!(is_descendant_of(g, shell.pid(), shell_process.start_time()));
    assert!(is_descendant_of(g, me.pid(), me.start_time()));
    assert!(is_descendant_of(g, g, grandchild.start_time()));
    assert!(!is_descendant_of(
        g,
        shell.pid(),
        shell_process.start_time() + 1
    ));
    assert!(!is_descendant_of(shell.pid(), g, grandchild.start_time()));
    let sibling = Kid::sleep();
    assert!(!is_descendant_of(
        g,
        sibling.pid(),
        PinnedProcess::open(sibling.pid()).unwrap().start_time()
    ));
    // Let the shell reap the grandchild itself rather than leave it to init.
    drop(_guard);
    shell.0.wait().unwrap();
}

#[test]
fn a_deleted_binary_is_still_hashed_from_what_is_running() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("sleep-copy");
    fs::copy(SLEEP, &copy).unwrap();
    let original_digest = sha256_hex(&copy);
    // Another test thread forking while the copy was open for writing can
    // make exec fail with ETXTBSY for a moment.
    const ETXTBSY: i32 = 26;
    let mut spawned = None;
    for _ in 0..50 {
        match Command::new(&copy).arg("30").spawn() {
            Ok(child) => {
                spawned = Some(child);
                break;
            }
            Err(e) if e.raw_os_error() == Some(ETXTBSY) => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("spawning the copy: {e}"),
        }
    }
    let kid = Kid(spawned.expect("the copied binary became executable"));
    fs::remove_file(&copy).unwrap();

    let set = AttestorSet::new(AttestorConfig::default()).unwrap();
    let attestation = set
        .attest(&PinnedProcess::open(kid.pid()).unwrap())
        .unwrap();
    let got = strings(&attestation.selectors);
    assert!(
        got.contains(&format!("unix:sha256:{original_digest}")),
        "{got:?}"
    );
    assert!(
        got.contains(&format!("unix:path:{} (deleted)", copy.display())),
        "{got:?}"
    );
}

#[test]
fn hashing_can_be_limited_or_switched_off() {
    let kid = Kid::sleep();
    let process = PinnedProcess::open(kid.pid()).unwrap();
    for unix in [
        writ_attestors::UnixConfig {
            max_hash_bytes: 1024,
            ..Default::default()
        },
        writ_attestors::UnixConfig {
            hash_executable: false,
            ..Default::default()
        },
    ] {
        let set = AttestorSet::new(AttestorConfig {
            unix,
            ..AttestorConfig::default()
        })
        .unwrap();
        let got = strings(&set.attest(&process).unwrap().selectors);
        assert!(
            !got.iter().any(|s| s.starts_with("unix:sha256:")),
            "{got:?}"
        );
        assert!(got.iter().any(|s| s.starts_with("unix:path:")), "{got:?}");
    }
    let no_path = AttestorSet::new(AttestorConfig {
        unix: writ_attestors::UnixConfig {
            discover_workload_path: false,
            ..Default::default()
        },
        ..AttestorConfig::default()
    })
    .unwrap();
    let got = strings(&no_path.attest(&process).unwrap().selectors);
    assert!(!got.iter().any(|s| s.starts_with("unix:path:")), "{got:?}");
    assert!(got.iter().any(|s| s.starts_with("unix:sha256:")), "{got:?}");
}
