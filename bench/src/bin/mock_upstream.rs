//! `tollgate-mock-upstream --listen ADDR`: an OpenAI-compatible stand-in for tests and benchmarks.

use clap::Parser;
use tollgate_bench::mock::{self, MockConfig};

#[derive(Parser)]
#[command(name = "tollgate-mock-upstream", version, about = "OpenAI-compatible stand-in upstream")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: String,
    #[command(flatten)]
    config: MockConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    eprintln!("tollgate-mock-upstream listening on {}", listener.local_addr()?);
    mock::serve(listener, args.config).await?;
    Ok(())
}
