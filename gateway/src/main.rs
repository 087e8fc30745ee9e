//! `tollgate-gateway`: loads and checks its configuration. The proxy itself is not yet wired in.

use clap::Parser;
use tollgate_gateway::config::GatewayConfig;

#[derive(Parser)]
#[command(name = "tollgate-gateway", version, about = "Tollgate data plane")]
struct Args {
    /// TOML config file (see configs/gateway.toml).
    #[arg(long, env = "TOLLGATE_CONFIG")]
    config: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = GatewayConfig::load(args.config.as_deref())?;
    eprintln!(
        "tollgate-gateway: configuration valid (listen {}, upstream {}); the proxy is not part of this build yet",
        config.listen, config.upstream_url
    );
    std::process::exit(2)
}
