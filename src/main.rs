//! The `writ` binary: parses the command line and hands over to the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = match writ::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return writ::cli::report_parse_failure(e, std::env::args_os()),
    };
    // Only a client's output has a reader that may leave early; the
    // agent's errors are never taken for that.
    let agent = matches!(cli.command, writ::cli::Command::Run { .. });
    let json_failures = cli.command.json_failures();
    let outcome = match cli.command {
        // Prepared before the runtime starts its threads, which then
        // inherit the CPU scheduling policy (`cli::prepare_agent`).
        writ::cli::Command::Run { config, log_format } => {
            writ::cli::prepare_agent(config, log_format)
                .and_then(|prepared| runtime()?.block_on(writ::cli::run_agent(prepared)))
        }
        _ => runtime().and_then(|runtime| runtime.block_on(writ::cli::main(cli))),
    };
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if !agent && writ::cli::stdout_closed(&e) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            writ::cli::report_failure(&e, json_failures);
            std::process::ExitCode::FAILURE
        }
    }
}

/// The runtime `#[tokio::main]` would build: a worker per CPU, I/O and
/// timers on.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    use anyhow::Context as _;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}
