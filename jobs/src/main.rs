//! The `tidepool` binary.

use clap::Parser;
use tidepool_pipeline::memory::heap::CountingAllocator;

/// Counts live heap bytes so runs can report (and the GC trigger can read) a measured heap.
#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator::new();

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = tidepool_jobs::cli::Cli::parse();
    match tidepool_jobs::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
