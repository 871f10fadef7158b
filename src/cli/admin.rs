//! `writ task ...`, `writ entry ...`, `writ bundle ...` and `writ reload`:
//! clients for the admin socket.

use std::collections::{HashMap, hash_map};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::json;

use super::Output;
use super::client::{Api, api_status_error, connect_to};
use crate::config::{Config, Environment};
use crate::proto::admin as pb;

#[derive(Args, Debug)]
pub struct AdminSocketArg {
    /// The admin socket: a path (a relative one from the current
    /// directory) or unix:///absolute/path. Defaults to
    /// $WRIT_ADMIN_SOCKET (unless empty), then writ's default.
    // The variable is read in `path`, not by clap: clap would hand over an
    // empty variable as if it were an empty flag, and only the flag's
    // empty value is a mistake (as for --socket).
    #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub admin_socket: Option<String>,
    /// Text for people, or JSON for scripts.
    #[arg(long, value_enum, default_value_t = Output::Text, global = true)]
    pub output: Output,
}

impl AdminSocketArg {
    /// An empty value (such as `WRIT_ADMIN_SOCKET=`) counts as unset, as
    /// an empty `SPIFFE_ENDPOINT_SOCKET` does for other tools; the address
    /// is read as `--socket` reads it.
    fn path(&self) -> anyhow::Result<PathBuf> {
        self.path_with(std::env::var("WRIT_ADMIN_SOCKET").ok().as_deref())
    }

    /// `path` with the value of `WRIT_ADMIN_SOCKET`.
    fn path_with(&self, admin_socket_variable: Option<&str>) -> anyhow::Result<PathBuf> {
        if let Some(address) = &self.admin_socket {
            return super::client::parse_socket_address(address);
        }
        match admin_socket_variable {
            Some(address) if !address.is_empty() => {
                super::client::parse_socket_address(address).context("WRIT_ADMIN_SOCKET")
            }
            _ => Ok(Config::builtin_defaults(&Environment::current())
                .admin_api
                .socket_path),
        }
    }
}

// Parsed once per process from the command line; the size of the largest
// variant costs nothing worth boxing for.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum TaskCommand {
    /// Begin a task bound to a process (and its descendants) or a cgroup.
    // One group for both, so that giving neither names both in the error.
    #[command(group(clap::ArgGroup::new("binding").args(["pid", "cgroup"]).required(true)))]
    Begin {
        #[command(flatten)]
        admin: AdminSocketArg,
        /// The process the task is bound to, with its descendants.
        #[arg(long)]
        pid: Option<i32>,
        /// A cgroup v2 path such as /writ.slice/t-42.
        #[arg(long)]
        cgroup: Option<String>,
        // --id, --spiffe-id, --ttl and --parent refuse an empty value: the
        // request cannot tell an empty string from a field not given
        // (proto3 strings have no presence), so `--parent "$UNSET"` would
        // begin a top-level task with the orchestrator's whole scope
        // instead of a sub-task, and the agent could not notice.
        /// The task's id; default: a new ULID.
        #[arg(long = "id", value_parser = clap::builder::NonEmptyStringValueParser::new())]
        id: Option<String>,
        /// The task's SPIFFE ID; default: the caller's (for a sub-task, the
        /// parent task's) followed by /task/<id>.
        #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
        spiffe_id: Option<String>,
        /// What the task is for, in words (recorded; policies see it).
        #[arg(long, default_value = "")]
        purpose: String,
        /// A tool the task may use; repeatable. A sub-task's must be its
        /// parent's.
        #[arg(long = "tool")]
        tools: Vec<String>,
        /// A target the task may act on; repeatable. A sub-task's must be
        /// its parent's.
        #[arg(long = "target")]
        targets: Vec<String>,
        /// The class of data the task handles (a sub-task keeps its
        /// parent's).
        #[arg(long, default_value = "")]
        data_class: String,
        /// key=value, repeatable.
        #[arg(long = "attr", value_parser = parse_attr)]
        attributes: Vec<(String, String)>,
        /// Such as 10m (at least 2s); default from the agent's config.
        #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
        ttl: Option<String>,
        /// Make this a sub-task of the task with this id; default: the task
        /// the caller works in, if it works in one.
        #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
        parent: Option<String>,
        /// A trust domain whose bundle the task's processes receive; repeatable.
        #[arg(long = "federates-with")]
        federates_with: Vec<String>,
    },
    /// End a task: its credentials are revoked at once.
    End {
        #[command(flatten)]
        admin: AdminSocketArg,
        /// The task's id.
        id: String,
        /// Why it ended, in words (kept as the completion detail).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Show one task, active or completed.
    Get {
        #[command(flatten)]
        admin: AdminSocketArg,
        id: String,
    },
    /// List the active tasks (with --all, completed ones too).
    List {
        #[command(flatten)]
        admin: AdminSocketArg,
        /// Completed tasks too.
        #[arg(long)]
        all: bool,
        /// Tasks fetched per request (the listing goes on until all are
        /// printed); the agent takes at most 1000.
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(i32).range(1..))]
        page_size: i32,
    },
    /// Print task events as they happen.
    Watch {
        #[command(flatten)]
        admin: AdminSocketArg,
    },
}

#[derive(Subcommand, Debug)]
pub enum EntryCommand {
    /// Register an entry: processes matching all its selectors receive its
    /// SPIFFE ID. Prints the new entry's id.
    Create {
        #[command(flatten)]
        admin: AdminSocketArg,
        /// The SPIFFE ID matching processes receive.
        #[arg(long)]
        spiffe_id: String,
        /// type:key:value, repeatable; all must match.
        #[arg(long = "selector", required = true)]
        selectors: Vec<String>,
        /// Lifetime of its X509-SVIDs, such as 1h; default from the config.
        // Empty would read as not given (the default), as for task --ttl.
        #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
        x509_svid_ttl: Option<String>,
        /// A DNS SAN for its X509-SVIDs; repeatable.
        #[arg(long = "dns-name")]
        dns_names: Vec<String>,
        /// A hint passed to workloads with its SVIDs (the Workload API's
        /// `hint` field).
        #[arg(long, default_value = "")]
        hint: String,
        /// A trust domain whose bundle its processes receive; repeatable.
        #[arg(long = "federates-with")]
        federates_with: Vec<String>,
    },
    /// Delete an entry made with `entry create` (entries from the config
    /// file change only with the file).
    Delete {
        #[command(flatten)]
        admin: AdminSocketArg,
        id: String,
    },
    /// List every entry, from the config file and from `entry create`.
    List {
        #[command(flatten)]
        admin: AdminSocketArg,
        /// Entries fetched per request (the listing goes on until all are
        /// printed); the agent takes at most 1000.
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(i32).range(1..))]
        page_size: i32,
    },
}

impl TaskCommand {
    /// The `--output` this command was given.
    pub fn output(&self) -> Output {
        match self {
            TaskCommand::Begin { admin, .. }
            | TaskCommand::End { admin, .. }
            | TaskCommand::Get { admin, .. }
            | TaskCommand::List { admin, .. }
            | TaskCommand::Watch { admin } => admin.output,
        }
    }
}

impl EntryCommand {
    /// The `--output` this command was given.
    pub fn output(&self) -> Output {
        match self {
            EntryCommand::Create { admin, .. }
            | EntryCommand::Delete { admin, .. }
            | EntryCommand::List { admin, .. } => admin.output,
        }
    }
}

/// Prints a listing: `fetch` gets the page after a token (empty for the
/// first) and returns its items and the next token (empty after the last).
/// Text (`header`, if any, then `line` for each item) is printed page by
/// page as the pages arrive. With `json`, the items make one pretty-printed
/// JSON array (`to_json` of each), printed only once every page has
/// arrived: a page refused halfway (the entries changed meanwhile, writ
/// stopped) must not leave a script an unterminated array on stdout. Nothing
/// is printed before the first page has arrived, so a refused listing
/// leaves stdout empty rather than showing a table header over nothing.
async fn print_pages<T>(
    out: &mut impl Write,
    json: bool,
    header: Option<&str>,
    mut fetch: impl AsyncFnMut(String) -> anyhow::Result<(Vec<T>, String)>,
    mut line: impl FnMut(&mut dyn Write, &T) -> std::io::Result<()>,
    to_json: impl Fn(&T) -> serde_json::Value,
) -> anyhow::Result<()> {
    let mut listed = Vec::new();
    let mut page_token = String::new();
    loop {
        let first = page_token.is_empty();
        let (items, next) = fetch(page_token).await?;
        if json {
            listed.extend(items.iter().map(&to_json));
        } else {
            if first && let Some(header) = header {
                writeln!(out, "{header}")?;
            }
            for item in &items {
                line(out, item)?;
            }
        }
        if next.is_empty() {
            break;
        }
        page_token = next;
    }
    if json {
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&serde_json::Value::Array(listed))?
        )?;
    }
    Ok(())
}

/// Text from writ as the CLI prints it for people: control characters
/// escaped (`\n`, `\u{1b}`), so that stored text (an intent, a reason, an
/// entry's fields; older writs accepted control characters in them) cannot
/// move the cursor, recolour or clear the terminal, or forge lines of the
/// report. JSON output escapes them anyway.
fn clean(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return text.into();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_debug().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

/// `clean` of each item, joined with `sep`.
fn clean_joined(items: &[String], sep: &str) -> String {
    items.iter().map(|i| clean(i)).collect::<Vec<_>>().join(sep)
}

/// One `--attr`: the key ends at the first `=`, so a value may hold `=`.
fn parse_attr(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        None => Err(format!("{s:?} is not key=value")),
        Some(("", _)) => Err(format!("{s:?} has an empty key; write key=value")),
        Some((k, v)) => Ok((k.to_owned(), v.to_owned())),
    }
}

/// The `--attr` values as the request's map. A repeated key is refused:
/// keeping one of its values would drop the other without a word.
fn attribute_map(attributes: Vec<(String, String)>) -> anyhow::Result<HashMap<String, String>> {
    let mut map = HashMap::with_capacity(attributes.len());
    for (key, value) in attributes {
        match map.entry(key) {
            hash_map::Entry::Occupied(first) => anyhow::bail!(
                "--attr: key {:?} is given twice ({}={} and {}={}); give each key once",
                first.key(),
                first.key(),
                first.get(),
                first.key(),
                value
            ),
            hash_map::Entry::Vacant(slot) => {
                slot.insert(value);
            }
        }
    }
    Ok(map)
}

/// Maps a refused call on the admin socket at `socket` to the CLI's error.
fn refused<'a>(
    socket: &'a Path,
    call: &'static str,
) -> impl FnOnce(tonic::Status) -> anyhow::Error + 'a {
    move |status| api_status_error(Api::Admin, socket, call, status)
}

async fn tasks_client(
    path: &Path,
) -> anyhow::Result<pb::tasks_client::TasksClient<tonic::transport::Channel>> {
    let channel = connect_to(Api::Admin, path).await?;
    Ok(pb::tasks_client::TasksClient::new(channel))
}

async fn entries_client(
    path: &Path,
) -> anyhow::Result<pb::entries_client::EntriesClient<tonic::transport::Channel>> {
    let channel = connect_to(Api::Admin, path).await?;
    Ok(pb::entries_client::EntriesClient::new(channel))
}

fn time_string(secs: i64) -> String {
    if secs == 0 {
        return "-".into();
    }
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| secs.to_string())
}

pub fn task_json(t: &pb::Task) -> serde_json::Value {
    let binding = match t.binding.as_ref().and_then(|b| b.target.as_ref()) {
        Some(pb::binding::Target::Pid(p)) => json!({"pid": p}),
        Some(pb::binding::Target::Cgroup(c)) => json!({"cgroup": c}),
        None => json!(null),
    };
    let intent = t.intent.clone().unwrap_or_default();
    json!({
        "task_id": t.task_id,
        "spiffe_id": t.spiffe_id,
        "parent_task_id": t.parent_task_id,
        "binding": binding,
        "intent": {
            "purpose": intent.purpose, "tools": intent.tools, "targets": intent.targets,
            "data_class": intent.data_class, "attributes": intent.attributes,
        },
        "orchestrator_spiffe_id": t.orchestrator_spiffe_id,
        "created_at": t.created_at,
        "expires_at": t.expires_at,
        "completed_at": t.completed_at,
        "completion_reason": t.completion_reason,
        "completion_detail": t.completion_detail,
        "issued_serials": t.issued_serials,
        "federates_with": t.federates_with,
    })
}

fn print_task(t: &pb::Task) -> anyhow::Result<()> {
    let state = if t.completed_at == 0 {
        "active".to_owned()
    } else {
        format!("completed ({})", clean(&t.completion_reason))
    };
    outln!("Task:       {}", clean(&t.task_id));
    outln!("SPIFFE ID:  {}", clean(&t.spiffe_id));
    outln!("State:      {state}");
    if !t.parent_task_id.is_empty() {
        outln!("Parent:     {}", clean(&t.parent_task_id));
    }
    match t.binding.as_ref().and_then(|b| b.target.as_ref()) {
        Some(pb::binding::Target::Pid(p)) => outln!("Binding:    pid {p}"),
        Some(pb::binding::Target::Cgroup(c)) => outln!("Binding:    cgroup {}", clean(c)),
        None => {}
    }
    if !t.orchestrator_spiffe_id.is_empty() {
        outln!("Begun by:   {}", clean(&t.orchestrator_spiffe_id));
    }
    if let Some(i) = &t.intent {
        if !i.purpose.is_empty() {
            outln!("Purpose:    {}", clean(&i.purpose));
        }
        outln!("Tools:      {}", clean_joined(&i.tools, ", "));
        outln!("Targets:    {}", clean_joined(&i.targets, ", "));
        outln!("Data class: {}", clean(&i.data_class));
        let mut attributes: Vec<_> = i.attributes.iter().collect();
        attributes.sort();
        for (key, value) in attributes {
            outln!("Attribute:  {}={}", clean(key), clean(value));
        }
    }
    if !t.federates_with.is_empty() {
        outln!("Federates:  {}", clean_joined(&t.federates_with, ", "));
    }
    outln!("Created:    {}", time_string(t.created_at));
    outln!("Expires:    {}", time_string(t.expires_at));
    if t.completed_at != 0 {
        outln!("Completed:  {}", time_string(t.completed_at));
        if !t.completion_detail.is_empty() {
            outln!("Reason:     {}", clean(&t.completion_detail));
        }
    }
    if !t.issued_serials.is_empty() {
        outln!("Serials:    {}", clean_joined(&t.issued_serials, " "));
    }
    Ok(())
}

pub async fn task(cmd: TaskCommand) -> anyhow::Result<()> {
    match cmd {
        TaskCommand::Begin {
            admin,
            pid,
            cgroup,
            id,
            spiffe_id,
            purpose,
            tools,
            targets,
            data_class,
            attributes,
            ttl,
            parent,
            federates_with,
        } => {
            let target = match (pid, cgroup) {
                (Some(p), _) => pb::binding::Target::Pid(p),
                (None, Some(c)) => pb::binding::Target::Cgroup(c),
                (None, None) => anyhow::bail!("--pid or --cgroup is required"),
            };
            let request = pb::BeginTaskRequest {
                task_id: id.unwrap_or_default(),
                binding: Some(pb::Binding {
                    target: Some(target),
                }),
                spiffe_id: spiffe_id.unwrap_or_default(),
                intent: Some(pb::Intent {
                    purpose,
                    tools,
                    targets,
                    data_class,
                    attributes: attribute_map(attributes)?,
                }),
                ttl: ttl.unwrap_or_default(),
                parent_task_id: parent.unwrap_or_default(),
                federates_with,
            };
            let socket = admin.path()?;
            let task = tasks_client(&socket)
                .await?
                .begin_task(request)
                .await
                .map_err(refused(&socket, "BeginTask"))?
                .into_inner();
            if admin.output == Output::Json {
                outln!("{}", task_json(&task));
            } else {
                outln!("{}", task.task_id);
            }
        }
        TaskCommand::End { admin, id, reason } => {
            let socket = admin.path()?;
            let response = tasks_client(&socket)
                .await?
                .end_task(pb::EndTaskRequest {
                    task_id: id,
                    reason,
                })
                .await
                .map_err(refused(&socket, "EndTask"))?;
            let already = response
                .metadata()
                .contains_key(crate::admin_api::ALREADY_COMPLETED_HEADER);
            let task = response.into_inner();
            if admin.output == Output::Json {
                let mut json = task_json(&task);
                // Ending is idempotent: this says whether this call ended
                // the task, as the text output does.
                json["already_completed"] = already.into();
                outln!("{json}");
            } else if already {
                outln!(
                    "{} had already completed ({})",
                    clean(&task.task_id),
                    clean(&task.completion_reason)
                );
            } else {
                outln!(
                    "ended {} ({})",
                    clean(&task.task_id),
                    clean(&task.completion_reason)
                );
            }
        }
        TaskCommand::Get { admin, id } => {
            let socket = admin.path()?;
            let task = tasks_client(&socket)
                .await?
                .get_task(pb::GetTaskRequest { task_id: id })
                .await
                .map_err(refused(&socket, "GetTask"))?
                .into_inner();
            if admin.output == Output::Json {
                outln!("{}", serde_json::to_string_pretty(&task_json(&task))?);
            } else {
                print_task(&task)?;
            }
        }
        TaskCommand::List {
            admin,
            all,
            page_size,
        } => {
            let socket = admin.path()?;
            let mut client = tasks_client(&socket).await?;
            let json = admin.output == Output::Json;
            let header = format!("{:<28} {:<10} {:<24} SPIFFE ID", "TASK", "STATE", "EXPIRES");
            // A busy node retains far more completed tasks than one
            // response carries.
            let fetch = async |page_token| {
                let page = client
                    .list_tasks(pb::ListTasksRequest {
                        include_completed: all,
                        page_size,
                        page_token,
                    })
                    .await
                    .map_err(refused(&socket, "ListTasks"))?
                    .into_inner();
                Ok((page.tasks, page.next_page_token))
            };
            let line = |out: &mut dyn Write, t: &pb::Task| {
                let state = if t.completed_at == 0 {
                    "active"
                } else {
                    "completed"
                };
                writeln!(
                    out,
                    "{:<28} {:<10} {:<24} {}",
                    clean(&t.task_id),
                    state,
                    time_string(t.expires_at),
                    clean(&t.spiffe_id)
                )
            };
            let mut out = crate::cli::stdout();
            print_pages(&mut out, json, Some(&header), fetch, line, task_json).await?;
        }
        TaskCommand::Watch { admin } => {
            let socket = admin.path()?;
            let mut stream = tasks_client(&socket)
                .await?
                .watch_tasks(pb::WatchTasksRequest {})
                .await
                .map_err(refused(&socket, "WatchTasks"))?
                .into_inner();
            loop {
                let event = tokio::select! {
                    e = stream.message() => e.map_err(refused(&socket, "WatchTasks"))?,
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                };
                let Some(event) = event else { return Ok(()) };
                let kind = match pb::task_event::Kind::try_from(event.kind) {
                    Ok(pb::task_event::Kind::Begun) => "begun",
                    Ok(pb::task_event::Kind::Completed) => "completed",
                    _ => "unknown",
                };
                let task = event.task.unwrap_or_default();
                if admin.output == Output::Json {
                    outln!("{}", json!({"event": kind, "task": task_json(&task)}));
                } else if kind == "completed" {
                    outln!(
                        "{kind} {} {} ({})",
                        clean(&task.task_id),
                        clean(&task.spiffe_id),
                        clean(&task.completion_reason)
                    );
                } else {
                    outln!("{kind} {} {}", clean(&task.task_id), clean(&task.spiffe_id));
                }
            }
        }
    }
    Ok(())
}

fn entry_json(e: &pb::Entry) -> serde_json::Value {
    json!({
        "id": e.id, "spiffe_id": e.spiffe_id, "selectors": e.selectors,
        "x509_svid_ttl": e.x509_svid_ttl, "dns_names": e.dns_names, "hint": e.hint,
        "source": e.source, "federates_with": e.federates_with,
    })
}

pub async fn entry(cmd: EntryCommand) -> anyhow::Result<()> {
    match cmd {
        EntryCommand::Create {
            admin,
            spiffe_id,
            selectors,
            x509_svid_ttl,
            dns_names,
            hint,
            federates_with,
        } => {
            let socket = admin.path()?;
            let entry = entries_client(&socket)
                .await?
                .create_entry(pb::CreateEntryRequest {
                    spiffe_id,
                    selectors,
                    x509_svid_ttl: x509_svid_ttl.unwrap_or_default(),
                    dns_names,
                    hint,
                    federates_with,
                })
                .await
                .map_err(refused(&socket, "CreateEntry"))?
                .into_inner();
            if admin.output == Output::Json {
                outln!("{}", entry_json(&entry));
            } else {
                outln!("{}", clean(&entry.id));
            }
        }
        EntryCommand::Delete { admin, id } => {
            let socket = admin.path()?;
            entries_client(&socket)
                .await?
                .delete_entry(pb::DeleteEntryRequest { id: id.clone() })
                .await
                .map_err(refused(&socket, "DeleteEntry"))?;
            if admin.output == Output::Json {
                outln!("{}", json!({"deleted": id}));
            } else {
                outln!("deleted {id}");
            }
        }
        EntryCommand::List { admin, page_size } => {
            let socket = admin.path()?;
            let mut client = entries_client(&socket).await?;
            let fetch = async |page_token| {
                let page = client
                    .list_entries(pb::ListEntriesRequest {
                        page_size,
                        page_token,
                    })
                    .await
                    .map_err(refused(&socket, "ListEntries"))?
                    .into_inner();
                Ok((page.entries, page.next_page_token))
            };
            let line = |out: &mut dyn Write, e: &pb::Entry| {
                writeln!(
                    out,
                    "{}  {}  [{}]  ttl {}  ({})",
                    clean(&e.id),
                    clean(&e.spiffe_id),
                    clean_joined(&e.selectors, ", "),
                    clean(&e.x509_svid_ttl),
                    clean(&e.source)
                )
            };
            let json = admin.output == Output::Json;
            let mut out = crate::cli::stdout();
            print_pages(&mut out, json, None, fetch, line, entry_json).await?;
        }
    }
    Ok(())
}

#[derive(Subcommand, Debug)]
pub enum BundleCommand {
    /// Print a trust bundle: writ's own, or another trust domain's. With
    /// `--output json`: one object holding both forms (`pem`, and the
    /// SPIFFE document as `bundle`) whatever `--format` says.
    Show {
        #[command(flatten)]
        admin: AdminSocketArg,
        /// Default: writ's own trust domain.
        #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
        trust_domain: Option<String>,
        #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
        format: BundleFormat,
    },
    /// List writ's own bundle and every foreign one held or configured.
    List {
        #[command(flatten)]
        admin: AdminSocketArg,
    },
    /// Store a foreign trust domain's bundle (replacing any held). A
    /// configured trust domain's fetcher overwrites it on its next success.
    Set {
        #[command(flatten)]
        admin: AdminSocketArg,
        /// The foreign trust domain the bundle is for.
        #[arg(long)]
        trust_domain: String,
        /// How the input is written.
        #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
        format: BundleFormat,
        /// Read the bundle from this file; "-" or absent: standard input.
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Forget a foreign trust domain's bundle.
    Delete {
        #[command(flatten)]
        admin: AdminSocketArg,
        /// The foreign trust domain to forget.
        #[arg(long)]
        trust_domain: String,
    },
}

impl BundleCommand {
    /// The `--output` this command was given.
    pub fn output(&self) -> Output {
        match self {
            BundleCommand::Show { admin, .. }
            | BundleCommand::List { admin }
            | BundleCommand::Set { admin, .. }
            | BundleCommand::Delete { admin, .. } => admin.output,
        }
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BundleFormat {
    /// X.509 authorities as PEM certificates.
    Pem,
    /// The SPIFFE bundle document (JWK Set), as SPIRE's `-format spiffe`.
    Spiffe,
}

async fn bundles_client(
    path: &Path,
) -> anyhow::Result<pb::bundles_client::BundlesClient<tonic::transport::Channel>> {
    let channel = connect_to(Api::Admin, path).await?;
    Ok(pb::bundles_client::BundlesClient::new(channel))
}

fn print_bundle(bundle: &pb::Bundle, format: BundleFormat) -> anyhow::Result<()> {
    match format {
        BundleFormat::Pem => out!("{}", bundle.pem),
        BundleFormat::Spiffe => {
            let doc: serde_json::Value =
                serde_json::from_slice(&bundle.spiffe_json).context("bundle document from writ")?;
            outln!("{}", serde_json::to_string_pretty(&doc)?);
        }
    }
    Ok(())
}

/// Counts of (X.509, JWT) authorities in a bundle writ sent.
fn authority_counts(bundle: &pb::Bundle) -> (usize, usize) {
    crate::spiffe_id::TrustDomain::new(&bundle.trust_domain)
        .ok()
        .and_then(|td| crate::bundle::TrustBundle::from_spiffe_json(td, &bundle.spiffe_json).ok())
        .map_or((0, 0), |b| {
            (b.x509_authorities.len(), b.jwt_authorities.len())
        })
}

fn bundle_json(bundle: &pb::Bundle) -> serde_json::Value {
    let (x509, jwt) = authority_counts(bundle);
    let fetch = bundle.fetch.as_ref().map(|f| {
        json!({
            "url": f.url,
            "last_attempt": f.last_attempt,
            "last_success": f.last_success,
            "last_error": f.last_error,
            "next_attempt": f.next_attempt,
        })
    });
    json!({
        "trust_domain": bundle.trust_domain,
        "source": bundle.source,
        "sequence": bundle.sequence,
        "x509_authorities": x509,
        "jwt_authorities": jwt,
        "updated_at": bundle.updated_at,
        "fetch": fetch,
    })
}

fn read_input(file: Option<&Path>) -> anyhow::Result<Vec<u8>> {
    use std::io::Read;
    let limit = crate::bundle::MAX_BUNDLE_BYTES as u64;
    let mut data = Vec::new();
    match file {
        Some(path) if path != Path::new("-") => {
            std::fs::File::open(path)
                .with_context(|| format!("reading {}", path.display()))?
                .take(limit + 1)
                .read_to_end(&mut data)
                .with_context(|| format!("reading {}", path.display()))?;
        }
        _ => {
            std::io::stdin()
                .take(limit + 1)
                .read_to_end(&mut data)
                .context("reading the bundle from standard input")?;
        }
    }
    if data.len() as u64 > limit {
        anyhow::bail!("the bundle is larger than {limit} bytes");
    }
    Ok(data)
}

pub async fn bundle(cmd: BundleCommand) -> anyhow::Result<()> {
    match cmd {
        BundleCommand::Show {
            admin,
            trust_domain,
            format,
        } => {
            let socket = admin.path()?;
            let bundle = bundles_client(&socket)
                .await?
                .get_bundle(pb::GetBundleRequest {
                    trust_domain: trust_domain.unwrap_or_default(),
                })
                .await
                .map_err(refused(&socket, "GetBundle"))?
                .into_inner();
            if admin.output == Output::Json {
                // Both forms, beside what `bundle list` says of it.
                let mut v = bundle_json(&bundle);
                let document: serde_json::Value = serde_json::from_slice(&bundle.spiffe_json)
                    .context("bundle document from writ")?;
                v["pem"] = bundle.pem.clone().into();
                v["bundle"] = document;
                outln!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_bundle(&bundle, format)?;
            }
        }
        BundleCommand::List { admin } => {
            let socket = admin.path()?;
            let mut client = bundles_client(&socket).await?;
            let mut bundles = Vec::new();
            let mut page_token = String::new();
            loop {
                let page = client
                    .list_bundles(pb::ListBundlesRequest {
                        page_size: 0,
                        page_token,
                    })
                    .await
                    .map_err(refused(&socket, "ListBundles"))?
                    .into_inner();
                bundles.extend(page.bundles);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            if admin.output == Output::Json {
                let v: Vec<_> = bundles.iter().map(bundle_json).collect();
                outln!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                outln!(
                    "{:<32} {:<10} {:>10} {:>5} {:>4}  {:<24} ENDPOINT",
                    "TRUST DOMAIN",
                    "SOURCE",
                    "SEQUENCE",
                    "X509",
                    "JWT",
                    "UPDATED"
                );
                for b in &bundles {
                    let (x509, jwt) = authority_counts(b);
                    let endpoint = match &b.fetch {
                        None => String::new(),
                        Some(f) if f.last_error.is_empty() => f.url.clone(),
                        Some(f) => format!("{} (last fetch failed: {})", f.url, f.last_error),
                    };
                    outln!(
                        "{:<32} {:<10} {:>10} {:>5} {:>4}  {:<24} {}",
                        b.trust_domain,
                        b.source,
                        b.sequence,
                        x509,
                        jwt,
                        time_string(b.updated_at),
                        endpoint
                    );
                }
            }
        }
        BundleCommand::Set {
            admin,
            trust_domain,
            format,
            file,
        } => {
            let data = read_input(file.as_deref())?;
            let format = match format {
                BundleFormat::Pem => pb::BundleFormat::Pem,
                BundleFormat::Spiffe => pb::BundleFormat::Spiffe,
            };
            let socket = admin.path()?;
            let bundle = bundles_client(&socket)
                .await?
                .set_bundle(pb::SetBundleRequest {
                    trust_domain,
                    format: format as i32,
                    data,
                })
                .await
                .map_err(refused(&socket, "SetBundle"))?
                .into_inner();
            if admin.output == Output::Json {
                outln!("{}", bundle_json(&bundle));
            } else {
                let (x509, jwt) = authority_counts(&bundle);
                outln!(
                    "set bundle of {} ({x509} X.509 and {jwt} JWT authorities)",
                    bundle.trust_domain
                );
            }
        }
        BundleCommand::Delete {
            admin,
            trust_domain,
        } => {
            let socket = admin.path()?;
            bundles_client(&socket)
                .await?
                .delete_bundle(pb::DeleteBundleRequest {
                    trust_domain: trust_domain.clone(),
                })
                .await
                .map_err(refused(&socket, "DeleteBundle"))?;
            if admin.output == Output::Json {
                outln!("{}", json!({"deleted": trust_domain}));
            } else {
                outln!("deleted bundle of {trust_domain}");
            }
        }
    }
    Ok(())
}

pub fn reload_json(r: &pb::ReloadResponse) -> serde_json::Value {
    let federation = r.federation.clone().unwrap_or_default();
    json!({
        "config_path": r.config_path,
        "reloaded": !r.config_path.is_empty(),
        "entries": r.entries,
        "entries_changed": r.entries_changed,
        "policy_source": r.policy_source,
        "policy_ids": r.policy_ids,
        "log_level": r.log_level,
        "log_level_changed": r.log_level_changed,
        "federation": {
            "added": federation.added,
            "removed": federation.removed,
            "updated": federation.updated,
        },
        "restart_required": r.restart_required,
        "notes": r.notes,
    })
}

fn print_reload(r: &pb::ReloadResponse) -> anyhow::Result<()> {
    if r.config_path.is_empty() {
        outln!("nothing to reload: writ runs on built-in defaults (no config file)");
        return Ok(());
    }
    let changed = |yes: bool| if yes { " (changed)" } else { "" };
    outln!("reloaded {}", r.config_path);
    outln!("Entries:     {}{}", r.entries, changed(r.entries_changed));
    outln!(
        "Policies:    {} from {}",
        r.policy_ids.len(),
        r.policy_source
    );
    outln!(
        "Log level:   {}{}",
        r.log_level,
        changed(r.log_level_changed)
    );
    let federation = r.federation.clone().unwrap_or_default();
    for (what, tds) in [
        ("added", &federation.added),
        ("removed", &federation.removed),
        ("updated", &federation.updated),
    ] {
        if !tds.is_empty() {
            outln!("Federation:  {what} {}", tds.join(", "));
        }
    }
    if !r.restart_required.is_empty() {
        outln!("Restart needed for: {}", r.restart_required.join(", "));
    }
    for note in &r.notes {
        outln!("Note: {note}");
    }
    Ok(())
}

/// `writ reload`: the admin `Reload` call.
pub async fn reload(admin: AdminSocketArg) -> anyhow::Result<()> {
    let path = admin.path()?;
    let channel = connect_to(Api::Admin, &path).await?;
    let response = match pb::agent_client::AgentClient::new(channel)
        .reload(pb::ReloadRequest {})
        .await
    {
        Ok(response) => response.into_inner(),
        Err(status) => {
            // A script reading stdout learns of the refusal there too; the
            // exit status and stderr say it as for every other refusal.
            // Only as a courtesy, so a failed write is dropped: returned,
            // it would replace the refusal, and a closed stdout (EPIPE)
            // would then be taken for a reader that left early and exit 0
            // in silence (`stdout_closed`), as if the reload had been made.
            if admin.output == Output::Json {
                use std::io::Write as _;
                let refusal = json!({
                    "reloaded": false,
                    "refused": true,
                    "code": format!("{:?}", status.code()),
                    "reason": status.message(),
                });
                let mut stdout = crate::cli::stdout().lock();
                let _ = writeln!(stdout, "{refusal:#}").and_then(|()| stdout.flush());
            }
            return Err(api_status_error(Api::Admin, &path, "Reload", status));
        }
    };
    if admin.output == Output::Json {
        outln!("{}", serde_json::to_string_pretty(&reload_json(&response))?);
    } else {
        print_reload(&response)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The admin socket is read as the Workload API socket is: a plain
    /// path, relative ones too, resolved against the current directory; a
    /// unix URI with an absolute path only.
    #[test]
    fn admin_socket_addresses_are_read_as_workload_socket_addresses() {
        let here = std::env::current_dir().unwrap();
        let flag = |address: &str| AdminSocketArg {
            admin_socket: Some(address.to_owned()),
            output: Output::Text,
        };
        let no_flag = AdminSocketArg {
            admin_socket: None,
            output: Output::Text,
        };
        assert_eq!(
            flag("run/admin.sock").path_with(None).unwrap(),
            here.join("run/admin.sock")
        );
        assert_eq!(
            no_flag.path_with(Some("run/admin.sock")).unwrap(),
            here.join("run/admin.sock")
        );
        assert_eq!(
            no_flag.path_with(Some("unix:///run/a.sock")).unwrap(),
            PathBuf::from("/run/a.sock")
        );
        let default = Config::builtin_defaults(&Environment::current())
            .admin_api
            .socket_path;
        assert_eq!(no_flag.path_with(Some("")).unwrap(), default);
        let err = no_flag.path_with(Some("unix:run/admin.sock")).unwrap_err();
        assert_eq!(
            crate::cli::describe(&err),
            "WRIT_ADMIN_SOCKET: socket address \"unix:run/admin.sock\" must name an absolute path"
        );
        // As for --socket, only unix URIs are addresses; other schemes are
        // refused rather than taken for a file name.
        assert!(flag("tcp://127.0.0.1:1").path_with(None).is_err());
        // The flag wins over the variable.
        assert_eq!(
            flag("/run/b.sock").path_with(Some("/run/a.sock")).unwrap(),
            PathBuf::from("/run/b.sock")
        );
    }

    #[test]
    fn an_attribute_needs_a_key_and_may_hold_equals_signs() {
        assert_eq!(parse_attr("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert_eq!(parse_attr("a="), Ok(("a".into(), String::new())));
        let err = parse_attr("=v").unwrap_err();
        assert!(err.contains("empty key"), "{err}");
        assert!(parse_attr("v").unwrap_err().contains("not key=value"));
    }

    /// A listing whose second page is refused leaves no JSON on stdout
    /// (it used to leave an array never closed); text shows what arrived.
    #[tokio::test]
    async fn a_json_listing_is_printed_whole_or_not_at_all() {
        async fn list(json: bool, fail_at: Option<usize>) -> (anyhow::Result<()>, String) {
            let mut out = Vec::new();
            let mut calls = 0;
            let fetch = async |token: String| {
                calls += 1;
                if Some(calls) == fail_at {
                    anyhow::bail!("ListEntries: Aborted");
                }
                let next = if token.is_empty() { "p2" } else { "" };
                Ok((vec![format!("item{calls}")], next.to_owned()))
            };
            let line = |out: &mut dyn Write, item: &String| writeln!(out, "{item}");
            let to_json = |item: &String| json!({ "id": item });
            let result = print_pages(&mut out, json, Some("ID"), fetch, line, to_json).await;
            (result, String::from_utf8(out).unwrap())
        }
        let (result, out) = list(true, Some(2)).await;
        assert!(result.is_err());
        assert_eq!(out, "");
        let (result, out) = list(true, None).await;
        result.unwrap();
        let listed: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(listed, json!([{"id": "item1"}, {"id": "item2"}]));
        let (result, out) = list(false, Some(2)).await;
        assert!(result.is_err());
        assert_eq!(out, "ID\nitem1\n");
        let (result, out) = list(false, Some(1)).await;
        assert!(result.is_err());
        assert_eq!(out, "");
    }

    #[test]
    fn text_output_escapes_control_characters() {
        assert_eq!(clean("plain é ✓"), "plain é ✓");
        assert_eq!(
            clean("line1\nTask:       FAKE\u{1b}[31m\r\u{7}\u{9b}\0"),
            "line1\\nTask:       FAKE\\u{1b}[31m\\r\\u{7}\\u{9b}\\0"
        );
        assert_eq!(clean_joined(&["a\tb".into(), "c".into()], ", "), "a\\tb, c");
    }

    #[test]
    fn a_repeated_attribute_key_is_refused() {
        let pair = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        let map = attribute_map(vec![pair("a", "b=c"), pair("x", "y")]).unwrap();
        assert_eq!(map.len(), 2);
        assert_eq!(map["a"], "b=c");
        let err = attribute_map(vec![pair("a", "b=c"), pair("x", "y"), pair("a", "d")])
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "--attr: key \"a\" is given twice (a=b=c and a=d); give each key once"
        );
    }
}
