//! `tollgate-control-api [--config FILE] [--print-config] [serve|migrate]`: parse config, then serve
//! or migrate (or show the effective configuration).

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use figment::{providers::Serialized, Figment};
use tollgate_control_api::config::ControlApiConfig;

#[derive(Parser)]
#[command(name = "tollgate-control-api", version, about = "Tollgate control API")]
struct Args {
    /// TOML config file (see configs/control-api.toml).
    #[arg(long, env = "TOLLGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on, `IP:port` (overrides TOLLGATE_API_LISTEN).
    #[arg(long)]
    listen: Option<String>,
    /// Do not apply migrations at start.
    #[arg(long)]
    no_migrate: bool,
    /// Print the effective configuration (secrets hidden) as TOML and exit.
    #[arg(long)]
    print_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API (the default).
    Serve,
    /// Apply the database migrations and exit.
    Migrate,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();
    let mut flags = Figment::new();
    if let Some(listen) = args.listen {
        flags = flags.merge(Serialized::default("listen", listen));
    }
    if args.no_migrate {
        flags = flags.merge(Serialized::default("migrate_on_start", false));
    }
    let config = ControlApiConfig::load(args.config.as_deref(), flags)?;
    if args.print_config {
        print!("{}", tollgate_core::config::render_redacted(&config, &tollgate_control_api::config::SPEC)?);
        return Ok(());
    }
    match args.command.unwrap_or(Command::Serve) {
        Command::Migrate => {
            let db = tollgate_control_api::connect_db(&config.database_url).await?;
            tollgate_core::MIGRATOR.run(&db).await?;
            tollgate_core::ensure_usage_partitions(&db).await?;
            eprintln!("migrations applied");
            Ok(())
        }
        Command::Serve => tollgate_control_api::run(config).await,
    }
}
