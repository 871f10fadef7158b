//! Getting the real SPIFFE peers on demand and caching them under
//! `target/interop/`: SPIRE's server and agent, our go-spiffe client program,
//! and py-spiffe in a virtualenv. Without Go or Python the tests skip loudly;
//! with `WRIT_REQUIRE_INTEROP=1` they fail instead.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub const SPIRE_VERSION: &str = "v1.15.3";
pub const PY_SPIFFE_VERSION: &str = "0.3.2";

fn source_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop")
}

pub fn cache_dir() -> PathBuf {
    // CARGO_TARGET_TMPDIR is <target>/tmp; the cache sits beside it.
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .join("interop");
    std::fs::create_dir_all(dir.join("bin")).expect("creating the interop cache");
    dir
}

pub fn required() -> bool {
    std::env::var("WRIT_REQUIRE_INTEROP").as_deref() == Ok("1")
}

/// Skips (loudly) or, when interop is required, fails.
pub fn unavailable(what: &str) {
    if required() {
        panic!("WRIT_REQUIRE_INTEROP=1 but {what}");
    }
    eprintln!(
        "\n!!!!!!!! SKIPPED interop test: {what} (set WRIT_REQUIRE_INTEROP=1 to make this fatal) !!!!!!!!\n"
    );
}

fn run(cmd: &mut Command, what: &str) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn have(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().is_ok()
        || Command::new(tool).arg("version").output().is_ok()
}

/// A stamp file records what a cached build was made from, so a version bump
/// rebuilds instead of reusing a stale binary.
fn cached(stamp: &Path, expected: &str, outputs: &[PathBuf]) -> bool {
    outputs.iter().all(|o| o.exists())
        && std::fs::read_to_string(stamp).is_ok_and(|s| s == expected)
}

fn go_build_env(cmd: &mut Command) {
    // The Go module proxy is the only network these tests use; never fetch
    // from VCS directly, and don't touch the checked-in go.mod/go.sum.
    cmd.env("GOFLAGS", "-mod=mod -buildvcs=false")
        .env("GOTOOLCHAIN", "local");
}

pub struct Spire {
    pub server: PathBuf,
    pub agent: PathBuf,
}

/// spire-server and spire-agent at SPIRE_VERSION, built from the pinned
/// module in tests/interop/spire (the equivalent of `go install
/// github.com/spiffe/spire/cmd/...@v1.15.3`, which needs a module-list query
/// the registry here refuses; see docs/interop.md).
pub fn spire() -> Option<&'static Spire> {
    static SPIRE: OnceLock<Result<Spire, String>> = OnceLock::new();
    let result = SPIRE.get_or_init(|| {
        if !have("go") {
            return Err("the Go toolchain is not installed".into());
        }
        let bin = cache_dir().join("bin");
        let spire = Spire {
            server: bin.join("spire-server"),
            agent: bin.join("spire-agent"),
        };
        let stamp = bin.join("spire.stamp");
        let go_mod = std::fs::read_to_string(source_dir().join("spire/go.mod")).unwrap_or_default();
        if !cached(
            &stamp,
            &go_mod,
            &[spire.server.clone(), spire.agent.clone()],
        ) {
            eprintln!(
                "interop: building SPIRE {SPIRE_VERSION} (first run only; several minutes)..."
            );
            let mut cmd = Command::new("go");
            cmd.current_dir(source_dir().join("spire"))
                .args(["build", "-o"])
                .arg(&bin)
                .args([
                    "github.com/spiffe/spire/cmd/spire-server",
                    "github.com/spiffe/spire/cmd/spire-agent",
                ]);
            go_build_env(&mut cmd);
            run(&mut cmd, "building SPIRE")?;
            std::fs::write(&stamp, go_mod).map_err(|e| e.to_string())?;
        }
        Ok(spire)
    });
    match result {
        Ok(s) => Some(s),
        Err(e) => {
            unavailable(e);
            None
        }
    }
}

/// Our go-spiffe v2 client program (tests/interop/go-client).
pub fn go_client() -> Option<&'static Path> {
    static CLIENT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let result = CLIENT.get_or_init(|| {
        if !have("go") {
            return Err("the Go toolchain is not installed".into());
        }
        let src = source_dir().join("go-client");
        let bin = cache_dir().join("bin/writ-interop-go");
        let stamp = cache_dir().join("bin/writ-interop-go.stamp");
        let fingerprint = ["main.go", "go.mod", "go.sum"]
            .iter()
            .map(|f| std::fs::read_to_string(src.join(f)).unwrap_or_default())
            .collect::<String>();
        if !cached(&stamp, &fingerprint, std::slice::from_ref(&bin)) {
            let mut cmd = Command::new("go");
            cmd.current_dir(&src)
                .args(["build", "-o"])
                .arg(&bin)
                .arg(".");
            go_build_env(&mut cmd);
            run(&mut cmd, "building the go-spiffe client")?;
            std::fs::write(&stamp, fingerprint).map_err(|e| e.to_string())?;
        }
        Ok(bin)
    });
    match result {
        Ok(p) => Some(p.as_path()),
        Err(e) => {
            unavailable(e);
            None
        }
    }
}

/// A Python interpreter with py-spiffe installed (a virtualenv in the cache).
pub fn python() -> Option<&'static Path> {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let result = PYTHON.get_or_init(|| {
        if !have("python3") {
            return Err("python3 is not installed".into());
        }
        let venv = cache_dir().join("venv");
        let python = venv.join("bin/python");
        let stamp = venv.join("writ.stamp");
        if !cached(&stamp, PY_SPIFFE_VERSION, std::slice::from_ref(&python)) {
            eprintln!(
                "interop: installing py-spiffe {PY_SPIFFE_VERSION} into {} (first run only)...",
                venv.display()
            );
            run(
                Command::new("python3").args(["-m", "venv"]).arg(&venv),
                "creating a virtualenv",
            )?;
            run(
                Command::new(&python).args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    &format!("spiffe=={PY_SPIFFE_VERSION}"),
                ]),
                "pip install spiffe",
            )?;
            std::fs::write(&stamp, PY_SPIFFE_VERSION).map_err(|e| e.to_string())?;
        }
        Ok(python)
    });
    match result {
        Ok(p) => Some(p.as_path()),
        Err(e) => {
            unavailable(e);
            None
        }
    }
}

pub fn py_client_script() -> PathBuf {
    source_dir().join("py_client.py")
}
