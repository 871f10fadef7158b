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
    match writ::cli::main(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if !agent && writ::cli::stdout_closed(&e) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            writ::cli::report_failure(&e, json_failures);
            std::process::ExitCode::FAILURE
        }
    }
}
