//! `tollgate-bare-proxy --listen ADDR --upstream HOST:PORT [--threads N]`: a pingora reverse proxy
//! with no logic at all, the physical limit the gateway is measured against.

use async_trait::async_trait;

// The same allocator as the gateway, so that the comparison is of logic, not of allocators.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use clap::Parser;
use pingora::{
    prelude::HttpPeer,
    proxy::{http_proxy_service, ProxyHttp, Session},
    server::{configuration::ServerConf, RunArgs, Server},
    Result,
};

#[derive(Parser)]
#[command(name = "tollgate-bare-proxy", about = "pingora passthrough with no logic (benchmark baseline)")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: String,
    #[arg(long, default_value = "127.0.0.1:9000")]
    upstream: std::net::SocketAddr,
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

struct Passthrough {
    upstream: std::net::SocketAddr,
}

#[async_trait]
impl ProxyHttp for Passthrough {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
}

fn main() {
    let args = Args::parse();
    let conf = ServerConf {
        threads: args.threads,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        pid_file: std::env::temp_dir()
            .join(format!("tollgate-bare-proxy-{}.pid", std::process::id()))
            .display()
            .to_string(),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut service = http_proxy_service(&server.configuration, Passthrough { upstream: args.upstream });
    service.add_tcp(&args.listen);
    server.add_service(service);
    server.run(RunArgs::default());
}
