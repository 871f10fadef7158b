//! `writ policy check`: evaluates one request offline against policy files
//! (or the built-in policy) and explains the decision, so a policy can be
//! tried before the agent loads it. Exit 0 allow, 1 deny, 2 bad input.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::cli::Output;
use crate::policy::{Decision, PolicyEngine, PolicyRequest};

pub const EXIT_ALLOW: i32 = 0;
pub const EXIT_DENY: i32 = 1;
pub const EXIT_BAD_INPUT: i32 = 2;

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Evaluate a request (JSON, see policy/README.md) and print the
    /// decision, the deciding policies and any errors. Exit 0 allow,
    /// 1 deny, 2 bad request or policy files.
    Check {
        /// The request as JSON; `-` reads standard input.
        #[arg(long, value_name = "FILE")]
        request: PathBuf,
        /// A Cedar policy file; repeat for several. Default: the built-in
        /// permissive policy.
        #[arg(long = "policy", value_name = "FILE")]
        policies: Vec<PathBuf>,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

/// A request as `writ policy check` reads it: the request itself, tagged
/// by `action`, plus the optional time to evaluate it at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckRequest {
    pub request: PolicyRequest,
    /// `None`: evaluate at the current time.
    pub now: Option<OffsetDateTime>,
}

impl CheckRequest {
    pub fn from_json(text: &str) -> anyhow::Result<Self> {
        let mut value: serde_json::Value = serde_json::from_str(text).context("not valid JSON")?;
        let object = value
            .as_object_mut()
            .context("expected a JSON object with an \"action\" field")?;
        let now = match object.remove("now") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(
                OffsetDateTime::parse(&s, &Rfc3339)
                    .with_context(|| format!("\"now\": {s:?} is not an RFC 3339 time"))?,
            ),
            Some(other) => anyhow::bail!("\"now\": expected an RFC 3339 string, got {other}"),
        };
        let request = serde_json::from_value(value)?;
        Ok(CheckRequest { request, now })
    }
}

/// Runs the command and returns the process exit code.
pub fn run(command: PolicyCommand) -> i32 {
    match command {
        PolicyCommand::Check {
            request,
            policies,
            output,
        } => check(&request, &policies, output),
    }
}

fn check(request_path: &Path, policies: &[PathBuf], output: Output) -> i32 {
    let request = match read_request(request_path) {
        Ok(request) => request,
        Err(e) => {
            let name = if request_path == Path::new("-") {
                "standard input".to_owned()
            } else {
                request_path.display().to_string()
            };
            errln!("writ policy check: {name}: invalid request: {e:#}");
            return EXIT_BAD_INPUT;
        }
    };
    let engine = if policies.is_empty() {
        PolicyEngine::builtin_default()
    } else {
        match PolicyEngine::load(policies) {
            Ok(engine) => engine,
            Err(e) => {
                errln!("{e}");
                errln!("writ policy check: the policy files do not load");
                return EXIT_BAD_INPUT;
            }
        }
    };
    for warning in engine.warnings() {
        errln!("warning: {warning}");
    }
    let now = request.now.unwrap_or_else(OffsetDateTime::now_utc);
    let decision = engine.evaluate(&request.request, now);
    let printed = match output {
        Output::Text => print_text(&engine, &request.request, now, &decision),
        Output::Json => print_json(&engine, &request.request, now, &decision),
    };
    match printed {
        // A reader that stopped early (`| head -1`) changes no decision.
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        Err(e) => {
            errln!("writ policy check: writing the decision to standard output: {e}");
            return EXIT_BAD_INPUT;
        }
    }
    if decision.allowed {
        EXIT_ALLOW
    } else {
        EXIT_DENY
    }
}

fn read_request(path: &Path) -> anyhow::Result<CheckRequest> {
    let text = if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read standard input")?;
        text
    } else {
        std::fs::read_to_string(path).context("cannot read the file")?
    };
    CheckRequest::from_json(&text)
}

fn format_time(now: OffsetDateTime) -> String {
    now.format(&Rfc3339).unwrap_or_else(|_| now.to_string())
}

fn print_text(
    engine: &PolicyEngine,
    request: &PolicyRequest,
    now: OffsetDateTime,
    d: &Decision,
) -> std::io::Result<()> {
    let mut out = crate::cli::stdout().lock();
    writeln!(out, "{}", if d.allowed { "ALLOW" } else { "DENY" })?;
    writeln!(out, "action:   {}", request.action_name())?;
    writeln!(out, "time:     {}", format_time(now))?;
    if d.deciding_policies.is_empty() {
        writeln!(out, "deciding: none ({})", d.denial_message())?;
    } else {
        writeln!(out, "deciding: {}", d.deciding_policies.join(", "))?;
    }
    if d.errors.is_empty() {
        writeln!(out, "errors:   none")?;
    } else {
        writeln!(out, "errors:")?;
        for e in &d.errors {
            writeln!(out, "  {e}")?;
        }
    }
    writeln!(out, "policies: {}", engine.source())?;
    // The caller exits the process right after, without running destructors.
    out.flush()
}

fn print_json(
    engine: &PolicyEngine,
    request: &PolicyRequest,
    now: OffsetDateTime,
    d: &Decision,
) -> std::io::Result<()> {
    let value = serde_json::json!({
        "decision": if d.allowed { "ALLOW" } else { "DENY" },
        "action": request.action_name(),
        "time": format_time(now),
        "deciding_policies": d.deciding_policies,
        "errors": d.errors,
        "message": d.denial_message(),
        "policies": engine.source(),
    });
    let mut out = crate::cli::stdout().lock();
    writeln!(out, "{value}")?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_request_takes_now_and_leaves_the_rest_to_the_request() {
        let parsed = CheckRequest::from_json(
            r#"{"action": "EndTask", "now": "2026-11-22T10:00:00+01:00",
                "caller": {"pid": 7, "uid": 1000},
                "task": {"id": "t", "spiffe_id": "spiffe://x/t", "data_class": "public",
                         "ttl_seconds": 60, "orchestrator": "pid:7"}}"#,
        )
        .unwrap();
        assert_eq!(parsed.now.unwrap().unix_timestamp(), 1_795_338_000);
        assert_eq!(parsed.request.action_name(), "EndTask");

        let err =
            CheckRequest::from_json(r#"{"action": "EndTask", "now": "yesterday"}"#).unwrap_err();
        assert!(format!("{err:#}").contains("RFC 3339"), "{err:#}");
        let err = CheckRequest::from_json(r#"{"action": "Launch"}"#).unwrap_err();
        assert!(format!("{err:#}").contains("Launch"), "{err:#}");
        let err = CheckRequest::from_json("[1]").unwrap_err();
        assert!(format!("{err:#}").contains("object"), "{err:#}");
    }
}
