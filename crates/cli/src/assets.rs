//! What the Debian package ships besides the binaries, generated from the clap
//! definition so it cannot drift from the CLI (issue 13, item 1):
//! `citadel-systemd assets --out DIR` (hidden) writes the man pages (one for
//! the CLI, one per subcommand: `citadel-systemd-install.1`, ...) and the
//! bash, zsh and fish completions. Completion of SERVICE arguments asks the
//! CLI itself: `citadel-systemd services` (hidden) prints the stack's service
//! names from the config, one per line, and the bash and fish scripts call it
//! for the subcommands that take SERVICE arguments (static completions cannot
//! know the models). zsh completes subcommands and options only.

use std::fs;
use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use citadel_config::Settings;
use clap::CommandFactory;
use clap_complete::Shell;

use crate::fsutil;
use crate::Cli;

/// The program name the man pages and completions are for.
const BIN: &str = "citadel-systemd";

/// Writes `DIR/man/*.1` and `DIR/completions/{citadel-systemd.bash,
/// _citadel-systemd, citadel-systemd.fish}`.
pub fn generate(out: &Path) -> Result<ExitCode> {
    let man = out.join("man");
    let completions = out.join("completions");
    for dir in [&man, &completions] {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    clap_mangen::generate_to(Cli::command(), &man)
        .with_context(|| format!("cannot write the man pages into {}", man.display()))?;
    let takes_services = subcommands_taking_services();
    for (shell, hook) in [
        (Shell::Bash, Some(bash_hook(&takes_services))),
        (Shell::Zsh, None),
        (Shell::Fish, Some(fish_hook(&takes_services))),
    ] {
        let mut cmd = Cli::command();
        let path = clap_complete::generate_to(shell, &mut cmd, BIN, &completions)
            .with_context(|| format!("cannot write the {shell} completion"))?;
        if shell == Shell::Bash {
            let text = fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            fsutil::write_atomic(&path, fixed_bash(&text).as_bytes(), 0o644)?;
        }
        if let Some(hook) = hook {
            let mut f = fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            f.write_all(hook.as_bytes())
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
    }
    outln!(
        "wrote man pages into {} and completions into {}",
        man.display(),
        completions.display()
    )?;
    Ok(ExitCode::SUCCESS)
}

/// Two fixes to clap's bash script: it offers hidden subcommands too
/// (`opts="... assets services help"`): they are taken out of its word lists;
/// and clap_complete 4.6 names the case labels of a program whose name has a
/// dash differently from the states it sets (`citadel__subcmd__systemd__...`
/// against `citadel__systemd__...`), so no subcommand's options would ever
/// complete: the labels are given the names of the states.
fn fixed_bash(script: &str) -> String {
    without_hidden(&script.replace("citadel__subcmd__systemd__", "citadel__systemd__"))
}

fn without_hidden(script: &str) -> String {
    let hidden: Vec<String> = Cli::command()
        .get_subcommands()
        .filter(|s| s.is_hide_set())
        .map(|s| s.get_name().to_owned())
        .collect();
    let mut out = String::with_capacity(script.len());
    for line in script.split_inclusive('\n') {
        match line.split_once("opts=\"") {
            Some((head, rest)) => {
                let (words, tail) = rest.split_once('"').unwrap_or((rest, ""));
                let kept: Vec<&str> = words
                    .split(' ')
                    .filter(|w| !hidden.iter().any(|h| h == w))
                    .collect();
                out.push_str(&format!("{head}opts=\"{}\"{tail}", kept.join(" ")));
            }
            None => out.push_str(line),
        }
    }
    out
}

/// The visible subcommands with SERVICE arguments (`start`, `status`, ...).
fn subcommands_taking_services() -> Vec<String> {
    Cli::command()
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .filter(|s| s.get_arguments().any(|a| a.get_id() == "services"))
        .map(|s| s.get_name().to_owned())
        .collect()
}

/// The names `citadel-systemd services` prints: every model, then the gateway.
pub fn service_names(settings: &Settings) -> Vec<String> {
    settings
        .models
        .iter()
        .map(|m| m.name.as_str().to_owned())
        .chain(std::iter::once("gateway".to_owned()))
        .collect()
}

/// `citadel-systemd services`: one name per line.
pub fn print_service_names(settings: &Settings) -> Result<ExitCode> {
    for name in service_names(settings) {
        outln!("{name}")?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Appended to clap's bash script: its function completes subcommands and
/// options; at a SERVICE position of a subcommand in `takes` the names come
/// from `citadel-systemd services` (with the line's own --config/--root).
fn bash_hook(takes: &[String]) -> String {
    format!(
        r#"
# Citadel: SERVICE arguments complete to the stack's models and the gateway,
# read from the config by `citadel-systemd services`.
_citadel_systemd_services() {{
    _citadel__systemd "$@"
    local cur="${{COMP_WORDS[COMP_CWORD]}}" sub="" i
    local -a global=()
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "${{COMP_WORDS[i]}}" in
            --config|--root)
                global+=("${{COMP_WORDS[i]}}" "${{COMP_WORDS[i+1]}}")
                ((i++)) ;;
            --config=*|--root=*) global+=("${{COMP_WORDS[i]}}") ;;
            -*) ;;
            *) [[ -z "$sub" ]] && sub="${{COMP_WORDS[i]}}" ;;
        esac
    done
    [[ "$cur" == -* ]] && return 0
    case "$sub" in
        {subs})
            local names
            names="$("${{COMP_WORDS[0]}}" "${{global[@]}}" services 2>/dev/null)"
            COMPREPLY=($(compgen -W "$names" -- "$cur")) ;;
    esac
    return 0
}}
complete -F _citadel_systemd_services -o bashdefault -o default {BIN}
"#,
        subs = takes.join("|"),
    )
}

/// Appended to clap's fish script: SERVICE names for the subcommands in `takes`.
fn fish_hook(takes: &[String]) -> String {
    format!(
        "\n# Citadel: SERVICE arguments complete to the stack's models and the gateway.\n\
         complete -c {BIN} -n \"__fish_seen_subcommand_from {subs}\" -f -a \"({BIN} services 2>/dev/null)\"\n",
        subs = takes.join(" "),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue13_service_completion_covers_every_subcommand_with_service_arguments() {
        let takes = subcommands_taking_services();
        for sub in [
            "start", "stop", "restart", "reload", "enable", "disable", "status", "logs",
        ] {
            assert!(takes.iter().any(|t| t == sub), "{sub} missing in {takes:?}");
        }
        assert!(!takes.iter().any(|t| t == "install" || t == "services"));
        assert!(bash_hook(&takes).contains("restart|"));
        assert!(fish_hook(&takes).contains(" restart "));
    }

    /// Every state clap's bash function can reach has its case label, and no
    /// hidden subcommand is offered.
    #[test]
    fn issue13_bash_completion_reaches_every_subcommand() {
        let mut cmd = Cli::command();
        let mut raw = Vec::new();
        clap_complete::generate(Shell::Bash, &mut cmd, BIN, &mut raw);
        let script = fixed_bash(&String::from_utf8(raw).unwrap());
        for sub in ["status", "install", "restart", "logs"] {
            let state = format!("cmd=\"citadel__systemd__subcmd__{sub}\"");
            let label = format!("        citadel__systemd__subcmd__{sub})");
            assert!(script.contains(&state), "{sub}: no state");
            assert!(script.contains(&label), "{sub}: no case label");
        }
        for line in script.lines().filter(|l| l.contains("opts=\"")) {
            for hidden in ["assets", "services", "report-failure"] {
                assert!(!line.split(['"', ' ']).any(|w| w == hidden), "{line}");
            }
        }
    }
}
