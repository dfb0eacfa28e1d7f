//! Developer tasks: `cargo xtask <task> [args...]`.
//!
//! Each task lives in its own module and parses its own arguments, so tasks can
//! grow independently. `cargo xtask help` lists them.

use std::process::ExitCode;

mod bench_gateway;
mod bench_sim;
mod deb;
mod e2e_deb;
mod e2e_llama_cpp;
mod e2e_vllm;
mod sandbox;
#[cfg(test)]
mod tidy;
mod tier;
mod vllm;

type Task = fn(Vec<String>) -> anyhow::Result<()>;

const TASKS: &[(&str, &str, Task)] = &[
    (
        "sandbox",
        "boot a throwaway systemd container (systemd as PID 1) and run commands in it",
        sandbox::run,
    ),
    (
        "vllm-setup",
        "install the pinned vLLM CPU build into a venv and generate the tiny test model",
        vllm::run,
    ),
    (
        "e2e-vllm",
        "run the real-vLLM end-to-end tier inside the sandbox",
        e2e_vllm::run,
    ),
    (
        "e2e-llama-cpp",
        "build llama.cpp's llama-server and run the real-llama.cpp end-to-end tier in the sandbox",
        e2e_llama_cpp::run,
    ),
    (
        "deb",
        "build the Debian package citadel_VERSION_ARCH.deb (release binaries, man pages, completions)",
        deb::run,
    ),
    (
        "e2e-deb",
        "build two versions of the package and install, upgrade (under load), remove and purge it in the sandbox",
        e2e_deb::run,
    ),
    (
        "bench-sim",
        "measure the engine simulator's throughput on one core",
        bench_sim::run,
    ),
    (
        "bench-gateway",
        "measure the gateway's added latency, throughput and memory",
        bench_gateway::run,
    ),
];

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(task) = args
        .next()
        .filter(|t| t != "help" && t != "--help" && t != "-h")
    else {
        eprintln!("usage: cargo xtask <task> [args...]\n\ntasks:");
        for (name, help, _) in TASKS {
            eprintln!("  {name:<14} {help}");
        }
        return ExitCode::from(2);
    };
    let Some((_, _, run)) = TASKS.iter().find(|(name, _, _)| *name == task) else {
        eprintln!("error: unknown task `{task}` (try `cargo xtask help`)");
        return ExitCode::from(2);
    };
    match run(args.collect()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
