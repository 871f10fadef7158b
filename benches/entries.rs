//! `cargo bench --bench entries [-- --quick]`: CreateEntry against a real
//! `writ` as its registry grows: 20,000 entries (5,000 with `--quick`)
//! created through the admin API, 16 calls in flight, the rate reported for
//! each slice of 2,000 (1,000). Each create rebuilds the registry, so its
//! cost grows with the entries already there.

mod common;

use std::time::Instant;

use anyhow::{Context, Result};
use common::{Writ, fmt_duration, print_table};
use futures::StreamExt as _;
use writ::cli::client::connect;
use writ::proto::admin as apb;

/// Calls in flight at once.
const IN_FLIGHT: usize = 16;

fn main() -> Result<()> {
    let args = common::parse_args()?;
    let (total, slice) = if args.quick {
        (5_000, 1_000)
    } else {
        (20_000, 2_000)
    };
    common::print_machine("entries", &args);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    runtime.block_on(common::until_interrupted(run(total, slice)))
}

async fn run(total: usize, slice: usize) -> Result<()> {
    let mut writ = Writ::start("")?;
    let client = apb::entries_client::EntriesClient::new(connect(&writ.admin_socket).await?);
    let mut rows = Vec::new();
    let started = Instant::now();
    for first in (0..total).step_by(slice) {
        let t = Instant::now();
        let creates = futures::stream::iter(first..first + slice)
            .map(|n| {
                let mut client = client.clone();
                async move {
                    client
                        .create_entry(apb::CreateEntryRequest {
                            spiffe_id: format!("spiffe://writ.test/bench/entry-{n}"),
                            // A uid no bench process has: the registry grows,
                            // nothing is issued.
                            selectors: vec![format!("unix:uid:{}", 100_000 + n)],
                            ..Default::default()
                        })
                        .await
                }
            })
            .buffer_unordered(IN_FLIGHT)
            .collect::<Vec<_>>()
            .await;
        let elapsed = t.elapsed();
        if let Some(Err(status)) = creates.into_iter().find(Result::is_err) {
            anyhow::bail!("CreateEntry failed: {status}");
        }
        rows.push(vec![
            format!("{}–{}", first + 1, first + slice),
            fmt_duration(elapsed),
            format!("{:.0}", slice as f64 / elapsed.as_secs_f64()),
            fmt_duration(elapsed / slice as u32),
        ]);
    }
    writ.check_alive()?;
    print_table(
        &format!(
            "CreateEntry as the registry grows ({IN_FLIGHT} in flight; {total} in {})",
            fmt_duration(started.elapsed())
        ),
        &["entries", "time", "creates/s", "per create"],
        &rows,
    );
    let memory = writ.memory()?;
    println!("\nwrit memory after {total} entries: {}", memory.describe());
    Ok(())
}
