//! The `writ` command line: the agent (`run`), config checking (`validate`),
//! and clients for the Workload API (`api`, `healthcheck`, `bundle`).

pub mod admin;
pub mod api;
pub mod client;
pub mod policy;

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{Config, Environment, LogFormat};

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
        #[arg(long, env = "WRIT_CONFIG")]
        config: Option<PathBuf>,
        /// Overrides `[log] format`.
        #[arg(long, value_enum)]
        log_format: Option<LogFormatArg>,
    },
    /// Check a config file and report every error with line and column.
    Validate {
        #[arg(long)]
        config: PathBuf,
    },
    /// Talk to a SPIFFE Workload API (writ's or any other).
    Api {
        #[command(subcommand)]
        command: ApiCommand,
    },
    /// Exit 0 when the agent behind the socket reports SERVING.
    Healthcheck(SocketArg),
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
    /// Show trust bundles (admin socket).
    Bundle {
        #[command(subcommand)]
        command: admin::BundleCommand,
    },
    /// Try Cedar policies offline (exit 0 allow, 1 deny, 2 bad input).
    Policy {
        #[command(subcommand)]
        command: policy::PolicyCommand,
    },
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
}

#[derive(Args, Debug)]
pub struct SocketArg {
    /// Workload API socket: a path or unix:///path. Defaults to
    /// $SPIFFE_ENDPOINT_SOCKET, then writ's default socket.
    #[arg(long)]
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
    pub fn resolve(&self) -> anyhow::Result<PathBuf> {
        if let Some(s) = &self.socket {
            return client::parse_socket_address(s);
        }
        if let Ok(s) = std::env::var("SPIFFE_ENDPOINT_SOCKET") {
            return client::parse_socket_address(&s).context("SPIFFE_ENDPOINT_SOCKET");
        }
        Ok(Config::builtin_defaults(&Environment::current())
            .workload_api
            .socket_path)
    }
}

pub fn load_config(path: Option<&Path>) -> anyhow::Result<Config> {
    match path {
        Some(p) => Config::load(p).map_err(|e| anyhow::anyhow!("{e}")),
        None => Ok(Config::builtin_defaults(&Environment::current())),
    }
}

fn init_logging(config: &Config, format: Option<LogFormatArg>) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("WRIT_LOG").unwrap_or_else(|_| EnvFilter::new(&config.log.level));
    let json = match format {
        Some(LogFormatArg::Json) => true,
        Some(LogFormatArg::Text) => false,
        None => config.log.format == LogFormat::Json,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

pub async fn main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config, log_format } => {
            let config = load_config(config.as_deref())?;
            init_logging(&config, log_format);
            crate::service::run(config, shutdown_signal()).await?;
            Ok(())
        }
        Command::Validate { config } => match crate::config::validate_file(&config) {
            Ok(_) => {
                println!("{}: OK", config.display());
                Ok(())
            }
            Err(errors) => {
                for e in &errors {
                    eprintln!("{e}");
                }
                anyhow::bail!("{} error(s) in {}", errors.len(), config.display())
            }
        },
        Command::Api { command } => match command {
            ApiCommand::Fetch { what } => match what {
                FetchCommand::X509 {
                    socket,
                    write,
                    output,
                } => {
                    api::fetch_x509(&socket.resolve()?, write.as_deref(), output == Output::Json)
                        .await
                }
            },
            ApiCommand::Watch { socket, output } => {
                api::watch(&socket.resolve()?, output == Output::Json).await
            }
        },
        Command::Healthcheck(socket) => api::healthcheck(&socket.resolve()?).await,
        Command::Task { command } => admin::task(command).await,
        Command::Entry { command } => admin::entry(command).await,
        Command::Bundle { command } => admin::bundle(command).await,
        Command::Policy { command } => std::process::exit(policy::run(command)),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers we can only stop by being killed.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received; stopping"),
        _ = int.recv() => tracing::info!("SIGINT received; stopping"),
    }
}
