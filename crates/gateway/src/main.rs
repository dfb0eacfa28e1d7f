//! `citadel-gateway --config PATH [--api-keys-file PATH] [--listen ADDR] [--admin-socket PATH]`
//!
//! Under systemd the listening socket comes from `citadel-gateway.socket`
//! (socket activation, LISTEN_FDS) and the admin channel's from
//! `citadel-gateway-admin.socket`; otherwise the gateway binds
//! `gateway.listen:gateway.port`, or `--listen`, and `--admin-socket` itself.
//!
//! Exit status: 0 after a clean stop, 78 (EX_CONFIG) when the configuration
//! cannot work (invalid config, auth on without keys), 1 on other errors,
//! 2 on bad command-line usage.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "citadel-gateway",
    version = env!("CITADEL_VERSION"),
    about = "OpenAI-compatible, health-aware API gateway"
)]
struct Cli {
    /// The stack's config file.
    #[arg(long, env = "CITADEL_CONFIG", default_value = citadel_config::DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Read API keys from this file instead of the systemd credential
    /// `$CREDENTIALS_DIRECTORY/api-keys` (development and tests).
    #[arg(long, value_name = "PATH")]
    api_keys_file: Option<PathBuf>,
    /// Listen on ADDR instead of the socket from systemd (socket activation,
    /// `citadel-gateway.socket`) or gateway.listen:gateway.port (port 0 = ephemeral).
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Serve the admin channel (drain, admit, temporary backends) on a Unix
    /// socket bound at PATH, mode 0600, instead of the one from systemd
    /// (citadel-gateway-admin.socket).
    #[arg(long, value_name = "PATH")]
    admin_socket: Option<PathBuf>,
    /// Print this program's man page (roff) and exit; the package is built with it.
    #[arg(long, hide = true)]
    man_page: bool,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if cli.man_page {
        let mut out = std::io::stdout().lock();
        return match clap_mangen::Man::new(<Cli as clap::CommandFactory>::command())
            .render(&mut out)
        {
            Ok(()) => std::process::ExitCode::SUCCESS,
            // A closed stdout (`| head`) is a normal end, as for every binary.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("citadel-gateway: cannot write the man page: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    // Before any thread starts: it clears LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES.
    let inherited = citadel_gateway::listen::from_systemd();
    let _logging = citadel_log::init("citadel-gateway");
    if let Ok(i) = &inherited {
        for w in &i.warnings {
            tracing::warn!("{w}");
        }
    }
    match inherited
        .map_err(anyhow::Error::from)
        .and_then(|l| run(cli, l))
    {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let code = e
                .downcast_ref::<citadel_gateway::StartError>()
                .map_or(1, |s| s.exit_code());
            tracing::error!("{e:#}");
            eprintln!("citadel-gateway: {e:#}");
            std::process::ExitCode::from(code as u8)
        }
    }
}

fn run(cli: Cli, inherited: citadel_gateway::listen::Inherited) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let keys = match cli.api_keys_file {
        Some(p) => citadel_gateway::KeySource::File(p),
        None => citadel_gateway::KeySource::Credential,
    };
    rt.block_on(citadel_gateway::run_service(
        citadel_gateway::ServiceOptions {
            config: cli.config,
            keys,
            listen: cli.listen,
            inherited: inherited.api,
            admin: inherited.admin,
            admin_socket: cli.admin_socket,
        },
    ))?;
    Ok(())
}
