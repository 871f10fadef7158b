//! The `writ` command line: the agent (`run`), config checking (`validate`),
//! clients for the Workload API (`api`, `healthcheck`) and for the admin
//! API (`task`, `entry`, `bundle`, `reload`).

/// `println!` for what the CLI prints: a failed write is returned with `?`
/// instead of panicking, so that a reader that stops early (`writ entry list
/// | head -4`) ends writ quietly (see `stdout_closed`).
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!($crate::cli::stdout(), $($arg)*)?
    }};
}

/// `print!` as `outln!` is `println!`.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        write!($crate::cli::stdout(), $($arg)*)?
    }};
}

/// `eprintln!` for what the CLI says on stderr (errors, warnings): a
/// failed write is dropped. `eprintln!` panics when stderr is closed
/// (`2>&-`, or a reader of `2>&1 >/dev/null` that has left), which turned
/// a command's outcome into exit 101; with nowhere to say anything, the
/// exit status is all that is left to tell it.
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

pub mod admin;
pub mod api;
pub mod audit;
pub mod client;
pub mod policy;

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{Config, Environment, LogFormat};
use crate::service::LogLevelControl;

#[derive(Parser, Debug)]
#[command(
    name = "writ",
    version,
    about = "Per-task SPIFFE identities for AI agents"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the agent (built-in defaults when no config file is given).
    Run {
        /// The config file (TOML); without one, built-in defaults.
        #[arg(long, env = "WRIT_CONFIG")]
        config: Option<PathBuf>,
        /// Overrides `[log] format`.
        #[arg(long, value_enum)]
        log_format: Option<LogFormatArg>,
    },
    /// Check a config file and report its errors with line and column.
    Validate {
        /// The config file to check (as `writ run` would read it).
        #[arg(long, env = "WRIT_CONFIG")]
        config: PathBuf,
    },
    /// Talk to a SPIFFE Workload API (writ's or any other).
    Api {
        #[command(subcommand)]
        command: ApiCommand,
    },
    /// Exit 0 when the agent behind the socket reports SERVING (or, with
    /// --http, when its /ready endpoint answers 200).
    Healthcheck {
        #[command(flatten)]
        socket: SocketArg,
        /// Ask the `[telemetry]` HTTP listener instead, e.g. 127.0.0.1:9600.
        #[arg(long, conflicts_with = "socket")]
        http: Option<String>,
        /// Fail when writ has not answered within this long (a stopped or
        /// wedged agent would otherwise stall the probe).
        #[arg(long, default_value = "10s", value_parser = parse_timeout)]
        timeout: std::time::Duration,
        /// Text for people, or JSON for scripts.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Begin, end and inspect tasks (admin socket).
    Task {
        #[command(subcommand)]
        command: admin::TaskCommand,
    },
    /// Manage registration entries (admin socket).
    Entry {
        #[command(subcommand)]
        command: admin::EntryCommand,
    },
    /// Show, list, set and delete trust bundles (admin socket).
    Bundle {
        #[command(subcommand)]
        command: admin::BundleCommand,
    },
    /// Reload the running agent's config file (as SIGHUP does) and print
    /// what changed; a refused reload exits non-zero and changes nothing.
    Reload {
        #[command(flatten)]
        admin: admin::AdminSocketArg,
    },
    /// Verify or read the audit trail (offline; no agent needed).
    Audit {
        #[command(subcommand)]
        command: audit::AuditCommand,
    },
    /// Try Cedar policies offline (exit 0 allow, 1 deny, 2 bad input).
    Policy {
        #[command(subcommand)]
        command: policy::PolicyCommand,
    },
}

impl Command {
    /// Whether a failure of this command is reported as JSON on stderr
    /// (by `main`): with `--output json`, a script reads JSON, failures
    /// included.
    pub fn json_failures(&self) -> bool {
        let output = match self {
            Command::Api { command } => command.output(),
            Command::Task { command } => command.output(),
            Command::Entry { command } => command.output(),
            Command::Bundle { command } => command.output(),
            Command::Reload { admin } => admin.output,
            Command::Healthcheck { output, .. } => *output,
            // `writ policy check` reports its own failures, as exit codes
            // of its own (policy::run): they never reach `main`.
            Command::Policy { .. } => return false,
            Command::Run { .. } | Command::Validate { .. } | Command::Audit { .. } => return false,
        };
        output == Output::Json
    }
}

impl ApiCommand {
    /// The `--output` this command was given.
    fn output(&self) -> Output {
        match self {
            ApiCommand::Fetch {
                what:
                    FetchCommand::X509 { output, .. }
                    | FetchCommand::Jwt { output, .. }
                    | FetchCommand::JwtBundle { output, .. },
            }
            | ApiCommand::Watch { output, .. }
            | ApiCommand::Validate {
                what: ValidateCommand::Jwt { output, .. },
            } => *output,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum ApiCommand {
    /// Fetch once and print (or write) what the API returns.
    Fetch {
        #[command(subcommand)]
        what: FetchCommand,
    },
    /// Follow the X.509-SVID stream, printing every update.
    Watch {
        #[command(flatten)]
        socket: SocketArg,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Ask the Workload API to validate a credential.
    Validate {
        #[command(subcommand)]
        what: ValidateCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum ValidateCommand {
    /// Validate a JWT-SVID (ValidateJWTSVID); exits non-zero with the reason
    /// when it is refused.
    Jwt {
        #[command(flatten)]
        socket: SocketArg,
        /// The audience the token must be meant for.
        #[arg(long)]
        audience: String,
        /// The token.
        #[arg(long)]
        svid: String,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

#[derive(Subcommand, Debug)]
pub enum FetchCommand {
    /// X.509-SVIDs with their keys and bundles.
    X509 {
        #[command(flatten)]
        socket: SocketArg,
        /// Write svid.N.pem, svid.N.key (0600) and bundle.N.pem here.
        #[arg(long)]
        write: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// JWT-SVIDs for an audience: one per identity, or the one named.
    Jwt {
        #[command(flatten)]
        socket: SocketArg,
        /// Who the token is for; repeat for several.
        #[arg(long, required = true)]
        audience: Vec<String>,
        /// Only this identity (it must be one the caller holds).
        #[arg(long)]
        spiffe_id: Option<String>,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// The JWT bundles (JWKS per trust domain).
    JwtBundle {
        #[command(flatten)]
        socket: SocketArg,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

#[derive(Args, Debug)]
pub struct SocketArg {
    /// Workload API socket: a path (a relative one from the current
    /// directory) or unix:///absolute/path. Defaults to
    /// $SPIFFE_ENDPOINT_SOCKET (unless empty), then writ's default socket.
    #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub socket: Option<String>,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormatArg {
    Text,
    Json,
}

impl SocketArg {
    /// The socket to connect to; a warning about it is printed as `output`
    /// asks.
    pub fn resolve(&self, output: Output) -> anyhow::Result<PathBuf> {
        let variable = std::env::var("SPIFFE_ENDPOINT_SOCKET").ok();
        let path = self.resolve_with(variable.as_deref())?;
        if self.socket.is_none()
            && let Some(warning) = variable
                .as_deref()
                .and_then(|value| bare_path_warning(value, &path))
        {
            warn(output, &warning);
        }
        Ok(path)
    }

    /// `resolve` with the value of `SPIFFE_ENDPOINT_SOCKET`. An empty one
    /// counts as unset, as an empty `WRIT_ADMIN_SOCKET` does: `VAR=` is
    /// the shell's way to clear a variable for one command.
    fn resolve_with(&self, endpoint_socket: Option<&str>) -> anyhow::Result<PathBuf> {
        if let Some(s) = &self.socket {
            return client::parse_socket_address(s);
        }
        match endpoint_socket {
            Some(s) if !s.is_empty() => {
                client::parse_socket_address(s).context("SPIFFE_ENDPOINT_SOCKET")
            }
            _ => Ok(Config::builtin_defaults(&Environment::current())
                .workload_api
                .socket_path),
        }
    }
}

/// A warning for a `SPIFFE_ENDPOINT_SOCKET` that is a plain path. writ
/// takes it, but the SPIFFE SDKs (go-spiffe, py-spiffe) refuse anything
/// but a `unix:` URI, so a value that works here would fail the workloads
/// it was set for. The URI it suggests holds `resolved`, the absolute path
/// writ made of the value: a relative path cannot go in a unix URI.
fn bare_path_warning(value: &str, resolved: &Path) -> Option<String> {
    (!value.is_empty() && !value.starts_with("unix:")).then(|| {
        format!(
            "SPIFFE_ENDPOINT_SOCKET={value:?} is a plain path; writ accepts it, but SPIFFE SDKs (go-spiffe, py-spiffe) require a URI: SPIFFE_ENDPOINT_SOCKET=unix://{}",
            resolved.display()
        )
    })
}

/// Prints a warning on stderr. With `--output json` it is a JSON object on
/// a line of its own, so that whatever a script reads on stderr is JSON
/// (a failure that follows is one more object, `failure_json`).
fn warn(output: Output, warning: &str) {
    match output {
        Output::Text => errln!("writ: warning: {warning}"),
        Output::Json => errln!(
            "{}",
            serde_json::json!({ "warning": { "message": warning } })
        ),
    }
}

pub fn load_config(path: Option<&Path>) -> anyhow::Result<Config> {
    match path {
        Some(p) => Config::load(p).map_err(|e| anyhow::anyhow!("{e}")),
        None => Ok(Config::builtin_defaults(&Environment::current())),
    }
}

/// Installs the tracing subscriber (logs always go to stderr, which
/// journald captures; JSON puts each event's fields in their own members)
/// and returns the control `run` uses to change the filter on reload.
fn init_logging(config: &Config, format: Option<LogFormatArg>) -> LogLevelControl {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::prelude::*;
    let from_env = EnvFilter::try_from_env("WRIT_LOG").ok();
    let env_overrides = from_env.is_some();
    let filter = from_env.unwrap_or_else(|| EnvFilter::new(&config.log.level));
    let json = match format {
        Some(LogFormatArg::Json) => true,
        Some(LogFormatArg::Text) => false,
        None => config.log.format == LogFormat::Json,
    };
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    if json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_writer(std::io::stderr),
            )
            .init();
    } else {
        use std::io::IsTerminal as _;
        let ansi = use_colour(
            std::io::stderr().is_terminal(),
            std::env::var_os("NO_COLOR").as_deref(),
        );
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .with_writer(std::io::stderr),
            )
            .init();
    }
    Box::new(move |level: &str| {
        if env_overrides {
            // Whoever set WRIT_LOG asked for that filter over the file's.
            tracing::warn!(
                level,
                "WRIT_LOG is set; keeping its filter and ignoring log.level"
            );
            return Ok(());
        }
        let filter = EnvFilter::builder()
            .parse(level)
            .map_err(|e| format!("log.level {level:?}: {e}"))?;
        handle
            .reload(filter)
            .map_err(|e| format!("changing the log level: {e}"))
    })
}

/// Whether text logs are coloured: only for a person at a terminal.
/// Escape codes in a file or journald are noise that `grep` trips over, and
/// `NO_COLOR` set to anything but the empty string turns colour off
/// (no-color.org).
fn use_colour(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|value| value.is_empty())
}

/// The agent with its configuration loaded, logging set up and its CPU
/// scheduling policy applied: what `writ run` does before any runtime
/// thread exists.
struct PreparedAgent {
    loaded: Config,
    config: Option<PathBuf>,
    log_control: LogLevelControl,
}

/// Runs the command. `writ run` is prepared on this thread before the
/// runtime starts (`prepare_agent`): the CPU scheduling policy set there
/// is inherited by every thread writ starts after it. Every other command
/// runs on the runtime.
pub fn main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config, log_format } => {
            let prepared = prepare_agent(config, log_format)?;
            runtime()?.block_on(run_agent(prepared))
        }
        command => runtime()?.block_on(client(command)),
    }
}

/// The runtime `#[tokio::main]` would build: a worker per CPU, I/O and
/// timers on.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// The first part of `writ run`, on the main thread before any other
/// thread exists.
fn prepare_agent(
    config: Option<PathBuf>,
    log_format: Option<LogFormatArg>,
) -> anyhow::Result<PreparedAgent> {
    let loaded = load_config(config.as_deref())?;
    let log_control = init_logging(&loaded, log_format);
    match crate::scheduling::apply(loaded.cpu_scheduling) {
        Ok(crate::scheduling::Applied::KeptStartPolicy {
            policy,
            reset_on_fork,
        }) => {
            tracing::info!(
                policy,
                reset_on_fork,
                "keeping the CPU scheduling policy writ was started with"
            );
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(error = %e, "cannot move writ's threads to SCHED_BATCH (cpu_scheduling); they keep the default policy, which costs throughput under load");
        }
    }
    Ok(PreparedAgent {
        loaded,
        config,
        log_control,
    })
}

/// The rest of `writ run`, on the runtime: serves until told to stop.
async fn run_agent(prepared: PreparedAgent) -> anyhow::Result<()> {
    let PreparedAgent {
        loaded,
        config,
        log_control,
    } = prepared;
    // Caught from here on (SIGHUP before SIGTERM, so that a SIGTERM
    // handler in place means a SIGHUP one is too); one that comes while
    // writ starts is a reload once it is ready.
    let hangups = crate::reload::listen_for_sighup();
    let shutdown = shutdown_signal();
    crate::service::run(loaded, config, Some(log_control), shutdown, hangups).await?;
    Ok(())
}

/// Every command but `writ run` (which `main` starts itself).
async fn client(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run { .. } => anyhow::bail!("writ run is started by cli::main, not on a runtime"),
        Command::Validate { config } => validate(&config),
        Command::Api { command } => match command {
            ApiCommand::Fetch { what } => match what {
                FetchCommand::X509 {
                    socket,
                    write,
                    output,
                } => {
                    api::fetch_x509(
                        &socket.resolve(output)?,
                        write.as_deref(),
                        output == Output::Json,
                    )
                    .await
                }
                FetchCommand::Jwt {
                    socket,
                    audience,
                    spiffe_id,
                    output,
                } => {
                    api::fetch_jwt(
                        &socket.resolve(output)?,
                        audience,
                        spiffe_id.unwrap_or_default(),
                        output == Output::Json,
                    )
                    .await
                }
                FetchCommand::JwtBundle { socket, output } => {
                    api::fetch_jwt_bundles(&socket.resolve(output)?, output == Output::Json).await
                }
            },
            ApiCommand::Validate { what } => match what {
                ValidateCommand::Jwt {
                    socket,
                    audience,
                    svid,
                    output,
                } => {
                    api::validate_jwt(
                        &socket.resolve(output)?,
                        audience,
                        svid,
                        output == Output::Json,
                    )
                    .await
                }
            },
            ApiCommand::Watch { socket, output } => {
                api::watch(&socket.resolve(output)?, output == Output::Json).await
            }
        },
        Command::Healthcheck {
            socket,
            http,
            timeout,
            output,
        } => {
            let json = output == Output::Json;
            match http {
                Some(addr) => api::http_healthcheck(&addr, timeout, json).await,
                None => api::healthcheck(&socket.resolve(output)?, timeout, json).await,
            }
        }
        Command::Task { command } => admin::task(command).await,
        Command::Entry { command } => admin::entry(command).await,
        Command::Bundle { command } => admin::bundle(command).await,
        Command::Reload { admin } => admin::reload(admin).await,
        Command::Audit { command } => audit::audit(command).await,
        Command::Policy { command } => std::process::exit(policy::run(command)),
    }
}

/// A positive duration such as `10s` or `500ms`.
fn parse_timeout(text: &str) -> Result<std::time::Duration, String> {
    match crate::config::parse_duration(text) {
        Ok(d) if d.is_zero() => Err("must be more than zero".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

/// `writ validate`: the file, then what it names (policies, CA and
/// federation files), as a start would check them, starting nothing.
fn validate(config: &Path) -> anyhow::Result<()> {
    let loaded = match crate::config::validate_file(config) {
        Ok(loaded) => loaded,
        Err(errors) => {
            for e in &errors {
                errln!("{e}");
            }
            anyhow::bail!("{} error(s) in {}", errors.len(), config.display())
        }
    };
    let problems = crate::service::check_files(&loaded);
    if problems.is_empty() {
        outln!("{}: OK", config.display());
        return Ok(());
    }
    for problem in &problems {
        errln!("{problem}");
    }
    anyhow::bail!(
        "{} error(s) in the files {} names",
        problems.len(),
        config.display()
    )
}

/// Registers the handlers now (not when first polled), so a SIGTERM that
/// arrives while the agent is still starting stops it cleanly instead of
/// killing it with the default action.
fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
            // Without signal handlers we can only stop by being killed.
            std::future::pending::<()>().await;
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received; stopping"),
            _ = int.recv() => tracing::info!("SIGINT received; stopping"),
        }
    }
}

/// The error as one line: each cause after the one that holds it, except
/// where that one's message already ends with it (many errors put their
/// source in their own message, so `{:#}` said "Permission denied (os error
/// 13): Permission denied (os error 13)").
pub fn describe(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Says on stderr that the command failed: `failure_json` with
/// `--output json` (`Command::json_failures`), else `writ: ` and the
/// error on one line. A stderr that cannot be written to is not a second
/// failure (`errln!`): the exit status still says the first.
pub fn report_failure(error: &anyhow::Error, json: bool) {
    if json {
        errln!("{}", failure_json(error));
    } else {
        errln!("writ: {}", describe(error));
    }
}

/// Reports what stopped the command line from parsing, and gives the exit
/// status. Help and the version are printed as clap prints them. A usage
/// error (an unknown flag, a missing value; exit status 2) is plain text,
/// unless `args` (the command line, program name first) ask for `--output
/// json`: then it is the JSON error object every other failure of such a
/// command is, `{"error": {"message": ..., "usage": ...}}`, so that a
/// script reading stderr as JSON is never handed text.
pub fn report_parse_failure(
    error: clap::Error,
    args: impl IntoIterator<Item = std::ffi::OsString>,
) -> std::process::ExitCode {
    use clap::error::ErrorKind;
    let status = u8::try_from(error.exit_code()).unwrap_or(2);
    let shown_as_is = matches!(
        error.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    );
    if shown_as_is || !asks_for_json(args) {
        let _ = error.print();
        return std::process::ExitCode::from(status);
    }
    errln!("{}", usage_failure_json(&error.render().to_string()));
    std::process::ExitCode::from(status)
}

/// Whether a command line gives `--output json` (before any `--`).
fn asks_for_json(args: impl IntoIterator<Item = std::ffi::OsString>) -> bool {
    let mut previous_was_output = false;
    for arg in args.into_iter().skip(1) {
        if arg == "--" {
            return false;
        }
        if (previous_was_output && arg == "json") || arg == "--output=json" {
            return true;
        }
        previous_was_output = arg == "--output";
    }
    false
}

/// clap's rendered usage error as the JSON error object: its first
/// paragraph (without `error: `, on one line) is the message, its `Usage:`
/// line the usage.
fn usage_failure_json(rendered: &str) -> serde_json::Value {
    let message = rendered
        .lines()
        .map(str::trim)
        .skip_while(|line| line.is_empty())
        .take_while(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let message = match message.strip_prefix("error: ") {
        Some(rest) => rest,
        None if message.is_empty() => "the command line could not be parsed",
        None => &message,
    };
    let mut failure = serde_json::json!({ "message": message });
    if let Some(usage) = rendered
        .lines()
        .find_map(|line| line.trim().strip_prefix("Usage: "))
    {
        failure["usage"] = usage.into();
    }
    serde_json::json!({ "error": failure })
}

/// A failure as `--output json` reports it on stderr: one object,
/// `{"error": {"message": ..., "code": ...}}`. `message` is what text
/// output says after `writ: `; `code` is the gRPC status code's name when
/// a call was answered with an error status, and absent otherwise (a
/// socket that is not there, a bad argument, a file not written). A
/// health check answered with anything but SERVING has `"serving": false`
/// and the status's name as well, as a served one prints them on stdout.
pub fn failure_json(error: &anyhow::Error) -> serde_json::Value {
    let mut failure = serde_json::json!({ "message": describe(error) });
    if let Some(code) = status_code(error) {
        failure["code"] = format!("{code:?}").into();
    }
    if let Some(not_serving) = error
        .chain()
        .find_map(|cause| cause.downcast_ref::<api::NotServing>())
    {
        failure["serving"] = false.into();
        failure["status"] = not_serving.status_name().into();
    }
    serde_json::json!({ "error": failure })
}

/// The status code of the failed gRPC call behind `error`, if one is.
fn status_code(error: &anyhow::Error) -> Option<tonic::Code> {
    error
        .chain()
        .find_map(|cause| cause.downcast_ref::<client::StatusError>())
        .map(|status| status.code)
}

/// Whether the command failed because its standard output was closed
/// (`writ entry list | head -4`): the reader has all it wanted, so the
/// command stops without a word and exits 0.
///
/// SIGPIPE stays ignored, as in every Rust program, so a closed pipe or
/// socket is an error to handle rather than death by signal. Restoring
/// the default for the clients would also let a connection writ closes
/// kill them without a word. Only a write through [`stdout`] says its
/// broken pipe was standard output's ([`StdoutClosed`]): any other (a
/// named pipe where `--write` puts a file, a socket) is a failure like
/// any other. The agent's errors (`writ run`) are not asked this.
pub fn stdout_closed(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .and_then(|e| e.get_ref())
            .is_some_and(|inner| inner.is::<StdoutClosed>())
    })
}

/// What a write to standard output that found it closed carries, inside
/// its `BrokenPipe` error (see [`stdout_closed`]).
#[derive(Debug, thiserror::Error)]
#[error("standard output is closed")]
pub struct StdoutClosed;

/// Standard output for what the CLI prints (`W` is `Stdout`, or its lock):
/// its writes' broken pipes are marked as standard output's own
/// ([`StdoutClosed`]).
pub struct CliStdout<W = std::io::Stdout>(W);

/// Standard output, as the CLI prints to it.
pub fn stdout() -> CliStdout {
    CliStdout(std::io::stdout())
}

impl CliStdout {
    /// Locked for a run of writes, as `Stdout::lock`.
    pub fn lock(&self) -> CliStdout<std::io::StdoutLock<'static>> {
        CliStdout(self.0.lock())
    }
}

fn mark_stdout_error(error: std::io::Error) -> std::io::Error {
    if error.kind() == std::io::ErrorKind::BrokenPipe {
        std::io::Error::new(std::io::ErrorKind::BrokenPipe, StdoutClosed)
    } else {
        error
    }
}

impl<W: std::io::Write> std::io::Write for CliStdout<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf).map_err(mark_stdout_error)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush().map_err(mark_stdout_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_line_asks_for_json_only_with_output_json_before_a_double_dash() {
        let asks = |args: &[&str]| {
            asks_for_json(
                std::iter::once("writ")
                    .chain(args.iter().copied())
                    .map(std::ffi::OsString::from),
            )
        };
        assert!(asks(&["task", "get", "--output", "json"]));
        assert!(asks(&["task", "get", "--output=json", "t1"]));
        assert!(!asks(&["task", "get", "--output", "text"]));
        assert!(!asks(&["task", "get", "json"]));
        assert!(!asks(&["task", "get", "--", "--output", "json"]));
        assert!(!asks(&["--output"]));
        // The program's own name is not an argument.
        assert!(!asks_for_json(["--output=json".into()]));
    }

    #[test]
    fn a_usage_error_becomes_one_json_object() {
        let rendered = "error: the following required arguments were not provided:\n  <ID>\n\nUsage: writ task get <ID>\n\nFor more information, try '--help'.\n";
        assert_eq!(
            usage_failure_json(rendered),
            serde_json::json!({"error": {
                "message": "the following required arguments were not provided: <ID>",
                "usage": "writ task get <ID>",
            }})
        );
        assert_eq!(
            usage_failure_json("error: a value is required for '--ttl <TTL>'\n"),
            serde_json::json!({"error": {"message": "a value is required for '--ttl <TTL>'"}})
        );
        assert_eq!(
            usage_failure_json(""),
            serde_json::json!({"error": {"message": "the command line could not be parsed"}})
        );
    }

    #[test]
    fn an_empty_spiffe_endpoint_socket_is_unset() {
        let default = Config::builtin_defaults(&Environment::current())
            .workload_api
            .socket_path;
        let no_flag = SocketArg { socket: None };
        assert_eq!(no_flag.resolve_with(None).unwrap(), default);
        assert_eq!(no_flag.resolve_with(Some("")).unwrap(), default);
        assert_eq!(
            no_flag.resolve_with(Some("unix:///run/x.sock")).unwrap(),
            PathBuf::from("/run/x.sock")
        );
        let err = no_flag
            .resolve_with(Some("unix:///run/x.sock?x=1"))
            .unwrap_err();
        assert!(
            describe(&err).starts_with("SPIFFE_ENDPOINT_SOCKET: socket address"),
            "{err:#}"
        );
        // A plain path may be relative, in the variable as on the command
        // line, and the URI the warning suggests holds the absolute path.
        let here = std::env::current_dir().unwrap();
        let resolved = no_flag.resolve_with(Some("run/x.sock")).unwrap();
        assert_eq!(resolved, here.join("run/x.sock"));
        let warning = bare_path_warning("run/x.sock", &resolved).unwrap();
        assert!(
            warning.ends_with(&format!(
                "SPIFFE_ENDPOINT_SOCKET=unix://{}",
                here.join("run/x.sock").display()
            )),
            "{warning}"
        );
        let relative_flag = SocketArg {
            socket: Some("run/y.sock".into()),
        };
        assert_eq!(
            relative_flag.resolve_with(None).unwrap(),
            here.join("run/y.sock")
        );
        // A unix URI still names an absolute path only.
        let err = no_flag.resolve_with(Some("unix:run/x.sock")).unwrap_err();
        assert!(
            describe(&err).ends_with("must name an absolute path"),
            "{err:#}"
        );
        // The flag wins over the variable.
        let flag = SocketArg {
            socket: Some("/run/y.sock".into()),
        };
        assert_eq!(
            flag.resolve_with(Some("unix:///run/x.sock")).unwrap(),
            PathBuf::from("/run/y.sock")
        );
    }

    #[test]
    fn a_json_failure_has_the_message_and_any_status_code() {
        let status = tonic::Status::permission_denied("not an operator");
        let refused = client::status_error("CreateEntry", status);
        assert_eq!(
            failure_json(&refused),
            serde_json::json!({"error": {
                "message": "CreateEntry: PermissionDenied: not an operator",
                "code": "PermissionDenied",
            }})
        );
        // Found under context as well.
        let refused = refused.context("creating the entry");
        assert_eq!(
            failure_json(&refused)["error"]["code"],
            serde_json::json!("PermissionDenied")
        );
        assert_eq!(
            failure_json(&refused)["error"]["message"],
            serde_json::json!(describe(&refused))
        );
        // No call was answered: no code.
        let unconnected = anyhow::anyhow!("admin API at /x: connecting to the socket: refused");
        assert_eq!(
            failure_json(&unconnected),
            serde_json::json!({"error": {
                "message": "admin API at /x: connecting to the socket: refused",
            }})
        );
    }

    #[test]
    fn a_health_check_that_is_not_serving_names_its_status() {
        let not_serving = |status| {
            anyhow::Error::new(api::NotServing {
                socket: "/run/w.sock".into(),
                status,
            })
        };
        for (number, name) in [(0, "UNKNOWN"), (2, "NOT_SERVING"), (3, "SERVICE_UNKNOWN")] {
            assert_eq!(
                failure_json(&not_serving(number)),
                serde_json::json!({"error": {
                    "message": format!("writ at /run/w.sock is not serving ({name})"),
                    "serving": false,
                    "status": name,
                }})
            );
        }
        // A number the protocol has no name for is still said.
        let unnamed = failure_json(&not_serving(9));
        assert_eq!(
            unnamed["error"]["message"],
            "writ at /run/w.sock is not serving (status 9)"
        );
        assert_eq!(unnamed["error"]["status"], "9");
    }

    #[test]
    fn logs_are_coloured_only_at_a_terminal_without_no_color() {
        use std::ffi::OsStr;
        assert!(use_colour(true, None));
        assert!(use_colour(true, Some(OsStr::new(""))));
        assert!(!use_colour(true, Some(OsStr::new("1"))));
        assert!(!use_colour(false, None));
    }

    #[test]
    fn only_standard_outputs_broken_pipe_is_a_closed_stdout() {
        let marked = || mark_stdout_error(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        assert!(stdout_closed(&anyhow::Error::new(marked())));
        assert!(stdout_closed(
            &anyhow::Error::new(marked()).context("printing the entries")
        ));
        // A broken pipe that did not come through `stdout`: a named pipe
        // written as a file, a socket.
        let elsewhere = std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        assert!(!stdout_closed(&anyhow::Error::new(elsewhere)));
        let denied = mark_stdout_error(std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        assert_eq!(denied.kind(), std::io::ErrorKind::PermissionDenied);
        assert!(!stdout_closed(&anyhow::Error::new(denied)));
        assert!(!stdout_closed(&anyhow::anyhow!("Broken pipe")));
    }

    #[test]
    fn writes_to_a_closed_pipe_through_stdout_are_marked() {
        use std::io::Write as _;
        let (reader, mut pipe) = std::io::pipe().unwrap();
        drop(reader);
        let plain = pipe.write_all(b"x").unwrap_err();
        assert_eq!(plain.kind(), std::io::ErrorKind::BrokenPipe);
        assert!(!stdout_closed(&anyhow::Error::new(plain)));
        let marked = CliStdout(pipe).write_all(b"x").unwrap_err();
        assert_eq!(marked.kind(), std::io::ErrorKind::BrokenPipe);
        assert!(stdout_closed(&anyhow::Error::new(marked)));
    }

    #[derive(Debug, thiserror::Error)]
    #[error("creating /x: {source}")]
    struct Creating {
        source: std::io::Error,
    }

    #[test]
    fn a_cause_already_in_its_parents_message_is_said_once() {
        let denied = || std::io::Error::from_raw_os_error(13);
        let e = anyhow::Error::new(Creating { source: denied() }).context("starting");
        assert_eq!(describe(&e), format!("starting: creating /x: {}", denied()));
        // A cause its parent does not mention is kept.
        let e = anyhow::Error::new(denied()).context("opening /y");
        assert_eq!(describe(&e), format!("opening /y: {}", denied()));
    }
}
