//! `writ audit verify` and `writ audit tail`: checking the audit trail
//! offline against the CA's roots, and reading (or following) its newest
//! records. Neither needs the agent to be running.

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use rustls_pki_types::CertificateDer;

use crate::audit::{self, TrailEnd, VerifyOptions};
use crate::ca::CaError;
use crate::config::Config;

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Check every record's hash, the chain across rotated files, and every
    /// checkpoint's signature; name the first broken record.
    Verify {
        #[command(flatten)]
        trail: TrailArgs,
        /// PEM file of trusted CA certificates (repeatable). Default: the
        /// CA roots in `<data_dir>/ca/state.json`, expired ones included,
        /// plus the upstream bundle in upstream mode.
        #[arg(long)]
        bundle: Vec<PathBuf>,
        /// Accept a trail that was not closed (writ crashed and has not
        /// restarted): verify up to its last complete record.
        #[arg(long)]
        allow_open: bool,
    },
    /// Print the newest records as JSON lines.
    Tail {
        #[command(flatten)]
        trail: TrailArgs,
        /// Keep printing records as they are appended, across rotations.
        #[arg(short, long)]
        follow: bool,
        /// How many records to print first.
        #[arg(short = 'n', long = "lines", default_value_t = 10)]
        lines: usize,
    },
}

#[derive(Args, Debug)]
pub struct TrailArgs {
    /// The trail's current file (rotated files sit beside it). Default:
    /// `[audit] path` of the config.
    #[arg(long)]
    pub path: Option<PathBuf>,
    /// Config file to take the audit path and CA directory from (default:
    /// built-in defaults).
    #[arg(long, env = "WRIT_CONFIG")]
    pub config: Option<PathBuf>,
}

impl TrailArgs {
    fn resolve(&self) -> anyhow::Result<(PathBuf, Config)> {
        let config = super::load_config(self.config.as_deref())?;
        let path = self
            .path
            .clone()
            .unwrap_or_else(|| config.audit.path.clone());
        Ok((path, config))
    }
}

pub async fn audit(command: AuditCommand) -> anyhow::Result<()> {
    match command {
        AuditCommand::Verify {
            trail,
            bundle,
            allow_open,
        } => {
            let (path, config) = trail.resolve()?;
            let roots = trusted_roots(&bundle, &config)?;
            verify(&path, &roots, allow_open)
        }
        AuditCommand::Tail {
            trail,
            follow,
            lines,
        } => {
            let (path, _) = trail.resolve()?;
            tail(&path, lines, follow).await
        }
    }
}

fn verify(path: &Path, roots: &[CertificateDer<'static>], allow_open: bool) -> anyhow::Result<()> {
    let options = VerifyOptions {
        allow_open_end: allow_open,
    };
    let report = audit::verify_with(path, roots, &options).map_err(|e| anyhow::anyhow!("{e}"))?;
    for seq in &report.unclean_starts {
        errln!(
            "warning: the record at seq {seq} says the run before it ended without a close checkpoint (a crash, or records removed from its end)"
        );
    }
    for seq in &report.missing_trail_starts {
        errln!(
            "warning: the record at seq {seq} says writ had run with its data directory before but found no audit trail: the records before it are missing (the trail was removed, or [audit] path changed)"
        );
    }
    let checkpoint = match report.last_checkpoint_seq {
        Some(seq) => format!("last checkpoint at seq {seq}"),
        None => "no checkpoint".to_owned(),
    };
    let end = match report.end {
        TrailEnd::Closed => "closed cleanly".to_owned(),
        TrailEnd::Live { unsigned_records } => format!(
            "being written; {unsigned_records} record(s) after the last checkpoint are not signed yet"
        ),
        TrailEnd::Open {
            unsigned_records,
            torn_bytes,
        } => {
            let torn = if torn_bytes > 0 {
                format!(", and an incomplete last line of {torn_bytes} bytes was ignored")
            } else {
                String::new()
            };
            format!(
                "NOT closed: {unsigned_records} record(s) after the last checkpoint are unsigned and later records may have been removed{torn}"
            )
        }
    };
    let learned = match report.learned_roots {
        0 => String::new(),
        n => format!("; {n} root(s) handed on by ca_rotated records"),
    };
    let summary = format!(
        "{} records, {} checkpoints in {} file(s); {checkpoint}; {end}{learned}",
        report.records,
        report.checkpoints,
        report.files.len()
    );
    // The chain checks out, but a start found records at its end that had
    // been changed: as much a failure as finding them there now.
    if !report.modified_tail_starts.is_empty() {
        let problems: Vec<String> = report
            .modified_tail_starts
            .iter()
            .map(|m| {
                format!(
                    "{}:{} (seq {}): this start found that the trail ended in lines modified after writ wrote them, and moved them to {}",
                    m.file.display(),
                    m.line,
                    m.seq,
                    m.moved_to
                )
            })
            .collect();
        anyhow::bail!(
            "{}\nFAILED: the chain is intact ({summary}), but records were modified before the start(s) above",
            problems.join("\n")
        );
    }
    outln!("OK: {summary}");
    Ok(())
}

/// The roots checkpoints must chain to: `--bundle` files, else what the CA
/// state keeps (the roots it holds and the expired ones it remembers for
/// this), plus the upstream bundle in upstream mode.
fn trusted_roots(
    bundles: &[PathBuf],
    config: &Config,
) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    if !bundles.is_empty() {
        let mut roots = Vec::new();
        for bundle in bundles {
            roots.extend(read_pem_certificates(bundle)?);
        }
        return Ok(roots);
    }
    let ca_dir = config.data_dir.join(crate::config::CA_DIR);
    let from_state = crate::ca::read_checkpoint_roots(&ca_dir);
    let mut roots = match (&config.ca.upstream, from_state) {
        (_, Ok(roots)) => roots,
        // Upstream, the state only adds the roots of earlier self-signed
        // runs; without it the upstream bundle still verifies this CA.
        (Some(_), Err(CaError::Io { source, .. }))
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            Vec::new()
        }
        (Some(_), Err(e)) => {
            errln!(
                "warning: not using the roots in {}: {e}; checking against the upstream bundle only",
                ca_dir.display()
            );
            Vec::new()
        }
        (None, Err(e)) => {
            return Err(anyhow::Error::new(e).context(format!(
                "reading the CA roots from {} (pass --bundle FILE.pem to name them)",
                ca_dir.display()
            )));
        }
    };
    if let Some(upstream) = &config.ca.upstream {
        roots.extend(read_pem_certificates(&upstream.bundle)?);
    }
    if roots.is_empty() {
        anyhow::bail!(
            "{} holds no CA certificate (pass --bundle FILE.pem to name them)",
            ca_dir.join("state.json").display()
        );
    }
    Ok(roots)
}

fn read_pem_certificates(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let roots = pem_certificates(&text, path)?;
    if roots.is_empty() {
        anyhow::bail!("{} contains no CERTIFICATE block", path.display());
    }
    Ok(roots)
}

fn pem_certificates(text: &str, origin: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let blocks =
        pem::parse_many(text).with_context(|| format!("{} is not valid PEM", origin.display()))?;
    Ok(blocks
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| CertificateDer::from(b.into_contents()))
        .collect())
}

/// How often `--follow` looks for new records.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

async fn tail(path: &Path, lines: usize, follow: bool) -> anyhow::Result<()> {
    let start =
        audit::tail_lines(path, lines).with_context(|| format!("reading {}", path.display()))?;
    {
        let mut out = crate::cli::stdout().lock();
        for line in &start.lines {
            out.write_all(line)?;
            out.write_all(b"\n")?;
        }
        out.flush()?;
    }
    if !follow {
        return Ok(());
    }
    let mut follower = Follower {
        file: start.current,
        offset: start.resume_at,
        partial: Vec::new(),
    };
    loop {
        let mut out = crate::cli::stdout().lock();
        let progressed = follower.print_new(&mut out)?;
        if !progressed && !follower.switch_if_rotated(path, &mut out)? {
            drop(out);
            tokio::time::sleep(FOLLOW_POLL).await;
        }
    }
}

/// Reads one file of the trail as it grows, printing complete lines.
struct Follower {
    file: Option<std::fs::File>,
    offset: u64,
    /// The start of a line still being written.
    partial: Vec<u8>,
}

impl Follower {
    /// Prints the complete lines appended since last time; whether any
    /// bytes were read.
    fn print_new(&mut self, out: &mut impl Write) -> anyhow::Result<bool> {
        let Some(file) = &mut self.file else {
            return Ok(false);
        };
        let mut chunk = Vec::new();
        use std::io::Seek;
        file.seek(std::io::SeekFrom::Start(self.offset))?;
        file.read_to_end(&mut chunk)?;
        // Zeroed space the writer keeps ready is not written yet.
        if let Some(unwritten) = chunk.iter().position(|&b| b == 0) {
            chunk.truncate(unwritten);
        }
        if chunk.is_empty() {
            return Ok(false);
        }
        self.offset += chunk.len() as u64;
        self.partial.extend_from_slice(&chunk);
        if let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') {
            out.write_all(&self.partial[..=end])?;
            out.flush()?;
            self.partial.drain(..=end);
        }
        Ok(true)
    }

    /// When the path now names another file (the one we read was rotated
    /// away), prints the rest of it and of any file rotated after it, then
    /// switches to the new current file.
    fn switch_if_rotated(&mut self, path: &Path, out: &mut impl Write) -> anyhow::Result<bool> {
        let Ok(current) = std::fs::metadata(path) else {
            return Ok(false);
        };
        let ours = match &self.file {
            Some(file) => Some(file.metadata()?),
            None => None,
        };
        if ours
            .as_ref()
            .is_some_and(|m| m.ino() == current.ino() && m.dev() == current.dev())
        {
            return Ok(false);
        }
        // The writer may have appended between our last read and rotating.
        self.print_new(out)?;
        // Several rotations can happen between two polls: print the whole
        // of every file rotated after ours.
        if let Some(ours) = ours {
            let files = audit::trail_files(path)?;
            let position = files.iter().position(|f| {
                std::fs::metadata(f).is_ok_and(|m| m.ino() == ours.ino() && m.dev() == ours.dev())
            });
            if let Some(position) = position {
                for rotated in &files[position + 1..] {
                    if rotated.as_path() == path {
                        break;
                    }
                    self.file = Some(std::fs::File::open(rotated)?);
                    self.offset = 0;
                    self.partial.clear();
                    self.print_new(out)?;
                }
            }
        }
        self.file = Some(std::fs::File::open(path)?);
        self.offset = 0;
        self.partial.clear();
        Ok(true)
    }
}
