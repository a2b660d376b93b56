//! `levqor-peers`: run a fake Stripe or a SIEM receiver on loopback until
//! SIGTERM or Ctrl-C, for the demo and the benchmarks. State is read over HTTP
//! (`GET /_fake/state` on Stripe, `GET /_fake/events` on a receiver).

use clap::{Parser, Subcommand};
use levqor_peers::{siem, stripe};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    peer: Peer,
}

#[derive(Subcommand)]
enum Peer {
    /// A fake Stripe: customers, subscriptions, billing meters and their summaries.
    Stripe {
        #[arg(long, default_value = "127.0.0.1:12111")]
        listen: std::net::SocketAddr,
        #[arg(long, env = "STRIPE_SECRET_KEY")]
        api_key: String,
        /// Meter event names, comma separated.
        #[arg(long, value_delimiter = ',', default_value = "api_calls")]
        meters: Vec<String>,
        /// Milliseconds each meter event request takes (a stand-in for the network).
        #[arg(long, default_value_t = 0.2)]
        latency_ms: f64,
    },
    /// A SIEM receiver: splunk_hec, datadog or webhook.
    Siem {
        #[arg(long)]
        kind: String,
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long, env = "LEVQOR_PEER_SECRET")]
        secret: String,
    },
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let _keep: Box<dyn std::any::Any> = match cli.peer {
        Peer::Stripe { listen, api_key, meters, latency_ms } => {
            let m: Vec<&str> = meters.iter().map(String::as_str).collect();
            let s = stripe::FakeStripe::start(listen, &api_key, &m).await.unwrap_or_else(|e| die(&e));
            s.state.lock().unwrap().meter_latency = std::time::Duration::from_secs_f64(latency_ms.max(0.0) / 1000.0);
            println!("fake Stripe on {}", s.url());
            Box::new(s)
        }
        Peer::Siem { kind, listen, secret } => {
            let k = match kind.as_str() {
                "splunk_hec" => siem::Kind::SplunkHec,
                "datadog" => siem::Kind::Datadog,
                "webhook" => siem::Kind::Webhook,
                other => die(&format!("unknown receiver kind {other:?} (splunk_hec, datadog, webhook)")),
            };
            let r = siem::Receiver::start_on(listen, k, &secret).await.unwrap_or_else(|e| die(&e));
            println!("{kind} receiver on {}", r.url());
            Box::new(r)
        }
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn die(e: &dyn std::fmt::Display) -> ! {
    eprintln!("levqor-peers: {e}");
    std::process::exit(2)
}
