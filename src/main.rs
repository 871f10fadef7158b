//! The `writ` binary: parses the command line and hands over to the library.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = writ::cli::Cli::parse();
    match writ::cli::main(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("writ: {}", writ::cli::describe(&e));
            std::process::ExitCode::FAILURE
        }
    }
}
