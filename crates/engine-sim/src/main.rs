//! `citadel-engine-sim`: a simulated, GPU-free stand-in for an OpenAI-compatible
//! inference engine (vLLM-like). See the library docs and README for details.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use citadel_engine_sim::{parse_duration, serve, Faults, SimConfig, CRASH_EXIT_CODE};

/// `--shutdown-grace`'s default, as clap shows it (`DEFAULT_SHUTDOWN_GRACE`).
const DEFAULT_GRACE: &str = "30s";
use clap::Parser;

/// Simulated OpenAI-compatible inference engine (vLLM stand-in; no GPU, no
/// model: deterministic synthetic output). Simulator-only control endpoints:
/// POST /sim/fault, GET /sim/stats.
#[derive(Parser, Debug)]
#[command(name = "citadel-engine-sim", version = env!("CITADEL_VERSION"))]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0 = ephemeral; the start line reports the real one).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Served model name; repeat for several (first = default).
    #[arg(
        long = "model",
        visible_alias = "served-model-name",
        value_name = "NAME"
    )]
    models: Vec<String>,
    /// Simulated model load time (/health is 503 until then), e.g. 2s, 500ms, 0.
    #[arg(long, default_value = "0", value_parser = parse_duration)]
    load_time: Duration,
    /// Token pace; 0 = as fast as possible.
    #[arg(long, default_value_t = 0.0)]
    tokens_per_second: f64,
    /// Extra delay before the first token (simulated prefill), e.g. 300ms.
    #[arg(long, default_value = "0", value_parser = parse_duration)]
    first_token_delay: Duration,
    /// max_tokens when a request sets none.
    #[arg(long, default_value_t = 16)]
    default_max_tokens: u64,
    /// Fault: exit with status 70 upon receiving the N-th completion request.
    #[arg(long, value_name = "N")]
    crash_after: Option<u64>,
    /// Fault: exit with status 70 right away (crash-looping engine).
    #[arg(long)]
    crash_on_start: bool,
    /// Fault: after N completion requests, accept connections but never answer.
    #[arg(long, value_name = "N")]
    hang_after: Option<u64>,
    /// Fault: after N completion requests, /health answers 503.
    #[arg(long, value_name = "N")]
    unhealthy_after: Option<u64>,
    /// Fault: /health always answers 503 (completions keep working).
    #[arg(long)]
    health_fails: bool,
    /// Fault: /health answers 200 but every inference request fails with 500.
    #[arg(long)]
    health_lies: bool,
    /// Fault: after load, allocate and touch N MiB per second until killed.
    #[arg(long, value_name = "N")]
    allocate_mb_per_sec: Option<f64>,
    /// On SIGTERM/SIGINT: stop accepting at once, then give requests and streams
    /// in flight this long to finish before closing their connections (under
    /// systemd the model's stop_timeout bounds it), e.g. 30s, 500ms.
    #[arg(long, value_name = "SPAN", default_value = DEFAULT_GRACE, value_parser = parse_duration)]
    shutdown_grace: Duration,
    /// Tokio worker threads; 0 or 1 = a single-threaded runtime.
    #[arg(long, default_value_t = 1)]
    worker_threads: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let models = if args.models.is_empty() {
        SimConfig::default().models
    } else {
        args.models.clone()
    };
    let cfg = SimConfig {
        models,
        load_time: args.load_time,
        tokens_per_second: (args.tokens_per_second > 0.0).then_some(args.tokens_per_second),
        first_token_delay: args.first_token_delay,
        default_max_tokens: args.default_max_tokens,
        faults: Faults {
            crash_after: args.crash_after,
            crash_on_start: args.crash_on_start,
            hang_after: args.hang_after,
            unhealthy_after: args.unhealthy_after,
            health_fails: args.health_fails,
            health_lies: args.health_lies,
            allocate_mb_per_sec: args.allocate_mb_per_sec,
        },
        log_to_stderr: true,
        shutdown_grace: args.shutdown_grace,
        ..SimConfig::default()
    };
    if cfg.faults.crash_on_start {
        eprintln!(
            "citadel-engine-sim: crash-on-start fault: exiting with status {CRASH_EXIT_CODE}"
        );
        return ExitCode::from(CRASH_EXIT_CODE as u8);
    }
    let rt = if args.worker_threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.worker_threads)
            .enable_all()
            .build()
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("citadel-engine-sim: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(run(args, cfg))
}

async fn run(args: Args, cfg: SimConfig) -> ExitCode {
    let listener = match tokio::net::TcpListener::bind((args.host.as_str(), args.port)).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "citadel-engine-sim: cannot listen on {}:{}: {e}",
                args.host, args.port
            );
            return ExitCode::FAILURE;
        }
    };
    let addr: SocketAddr = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("citadel-engine-sim: {e}");
            return ExitCode::FAILURE;
        }
    };
    let pace = match cfg.tokens_per_second {
        Some(tps) => format!("{tps} tokens/s"),
        None => "unpaced".to_string(),
    };
    let load = if cfg.load_time.is_zero() {
        "0s".to_string()
    } else {
        format!("{:?}", cfg.load_time)
    };
    eprintln!(
        "citadel-engine-sim: simulating model(s) {} on {addr}, load time {load}, {pace} (SIMULATOR: no real inference)",
        cfg.models.join(", "),
    );
    let grace = cfg.shutdown_grace;
    let signals = async move {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                let name = tokio::select! {
                    _ = term.recv() => "SIGTERM",
                    _ = int.recv() => "SIGINT",
                };
                eprintln!(
                    "citadel-engine-sim: {name} received, shutting down (no new connections; requests in flight get up to {:?})",
                    grace
                );
            }
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("citadel-engine-sim: cannot install signal handlers: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    match serve(listener, cfg, signals).await {
        Ok(()) => {
            eprintln!("citadel-engine-sim: stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("citadel-engine-sim: {e}; exiting with status {CRASH_EXIT_CODE}");
            // Exit at once, like a crashing process: no draining of anything.
            std::process::exit(CRASH_EXIT_CODE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default clap shows is the library's default.
    #[test]
    fn default_grace_is_the_library_default() {
        assert_eq!(
            parse_duration(DEFAULT_GRACE),
            Ok(citadel_engine_sim::DEFAULT_SHUTDOWN_GRACE)
        );
        let args = Args::parse_from(["citadel-engine-sim"]);
        assert_eq!(
            args.shutdown_grace,
            citadel_engine_sim::DEFAULT_SHUTDOWN_GRACE
        );
    }
}
