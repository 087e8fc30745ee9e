//! `tollgate-gateway [--config FILE] [--listen ADDR] [--admin-listen ADDR] [--upstream-url URL]
//! [--no-migrate] [--print-config]`: parse config, run (or show the effective configuration).

use clap::Parser;

// glibc's allocator contends on its arena locks under pingora's many small allocations.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use figment::{providers::Serialized, Figment};
use tollgate_gateway::config::GatewayConfig;

#[derive(Parser)]
#[command(name = "tollgate-gateway", version, about = "Tollgate data plane")]
struct Args {
    /// TOML config file (see configs/gateway.toml).
    #[arg(long, env = "TOLLGATE_CONFIG")]
    config: Option<std::path::PathBuf>,
    /// Address for client traffic (overrides TOLLGATE_LISTEN).
    #[arg(long)]
    listen: Option<String>,
    /// Address for /metrics, /health, /ready (overrides TOLLGATE_ADMIN_LISTEN).
    #[arg(long)]
    admin_listen: Option<String>,
    /// Base URL of the upstream (overrides TOLLGATE_UPSTREAM_URL).
    #[arg(long)]
    upstream_url: Option<String>,
    /// Do not apply migrations at start (overrides TOLLGATE_MIGRATE_ON_START).
    #[arg(long)]
    no_migrate: bool,
    /// Print the effective configuration (secrets hidden) as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

fn main() -> anyhow::Result<()> {
    tollgate_gateway::init_logging();
    let args = Args::parse();
    let mut flags = Figment::new();
    for (key, value) in
        [("listen", args.listen), ("admin_listen", args.admin_listen), ("upstream_url", args.upstream_url)]
    {
        if let Some(v) = value {
            flags = flags.merge(Serialized::default(key, v));
        }
    }
    if args.no_migrate {
        flags = flags.merge(Serialized::default("migrate_on_start", false));
    }
    let config = GatewayConfig::load(args.config.as_deref(), flags)?;
    if args.print_config {
        print!("{}", tollgate_core::config::render_redacted(&config, &tollgate_gateway::config::SPEC)?);
        return Ok(());
    }
    tollgate_gateway::run(config)
}
