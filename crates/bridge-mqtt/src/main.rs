//! `weft-bridge-mqtt`: a Matrix application service that bridges an MQTT
//! broker's devices into rooms (docs/bridge-mqtt.md). It speaks to the
//! homeserver only through the application-service API, so it works with
//! any homeserver (Weft, Synapse, …).

mod bridge;
mod config;
mod content;
mod mapping;
mod matrix;
mod state;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "weft-bridge-mqtt", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs the bridge.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Writes the registration file (Synapse's format) for the homeserver.
    GenerateRegistration {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long, short)]
        out: PathBuf,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    match Cli::parse().cmd {
        Cmd::GenerateRegistration { config, out } => {
            let cfg = config::Config::load(&config)?;
            std::fs::write(&out, cfg.registration_yaml()).with_context(|| format!("writing {}", out.display()))?;
            println!("wrote {}", out.display());
            Ok(())
        }
        Cmd::Run { config } => {
            let cfg = config::Config::load(&config)?;
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(bridge::run(cfg))
        }
    }
}
