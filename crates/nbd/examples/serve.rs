//! Serves raw image files over NBD until Ctrl-C: `serve --listen ADDR FILE...`.
//!
//! Each file becomes an export named after its stem. Used by `scripts/bench-nbd.sh`
//! until `tandem-lab serve` exists.

use std::path::PathBuf;

use anyhow::{Context, bail};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let mut args = std::env::args().skip(1);
    let mut listen = None;
    let mut files = Vec::new();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => listen = Some(args.next().context("--listen needs an address")?),
            "-h" | "--help" => {
                println!("usage: serve --listen ADDR FILE...");
                return Ok(());
            }
            _ => files.push(PathBuf::from(arg)),
        }
    }
    let listen = listen.unwrap_or_else(|| "127.0.0.1:10809".to_owned());
    if files.is_empty() {
        bail!("usage: serve --listen ADDR FILE...");
    }
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(tandem_nbd::serve_files(listener, files, shutdown.clone()));
    tokio::signal::ctrl_c().await?;
    shutdown.cancel();
    server.await??;
    Ok(())
}
