//! SERVICE arguments: model names, `gateway` (alias `api-gateway`) or unit names.

use anyhow::{bail, Result};
use citadel_config::{unit_names, Settings};

/// Resolves SERVICE arguments to unit names, models first (by port) then the
/// gateway. No arguments means the whole stack.
pub fn resolve(settings: &Settings, names: &[String]) -> Result<Vec<String>> {
    let all: Vec<String> = settings
        .models
        .iter()
        .map(|m| m.unit_name())
        .chain(std::iter::once(unit_names::GATEWAY.to_owned()))
        .collect();
    if names.is_empty() {
        return Ok(all);
    }
    let mut chosen = Vec::new();
    for name in names {
        let unit = match name.as_str() {
            "gateway" | "api-gateway" | "citadel-gateway" => unit_names::GATEWAY.to_owned(),
            n if all.iter().any(|u| u == n) => n.to_owned(),
            n if settings.model(n).is_some() => format!("citadel-model@{n}.service"),
            n => {
                let models: Vec<&str> = settings.models.iter().map(|m| m.name.as_str()).collect();
                bail!(
                    "unknown service `{n}`; valid services: {}, gateway (alias api-gateway), or their unit names",
                    models.join(", ")
                );
            }
        };
        if !chosen.contains(&unit) {
            chosen.push(unit);
        }
    }
    chosen.sort_by_key(|u| all.iter().position(|a| a == u));
    Ok(chosen)
}

/// The short name shown for a unit: the model name, or `gateway`.
pub fn short_name(unit: &str) -> &str {
    if unit == unit_names::GATEWAY {
        return "gateway";
    }
    unit.strip_prefix("citadel-model@")
        .and_then(|u| u.strip_suffix(".service"))
        .unwrap_or(unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        citadel_config::parse(
            citadel_config::SIM_EXAMPLE_CONFIG,
            std::path::Path::new("c.toml"),
        )
        .unwrap()
        .settings
    }

    #[test]
    fn names_resolve_to_units_in_stack_order() {
        let s = settings();
        let got = resolve(
            &s,
            &[
                "api-gateway".into(),
                "phi3".into(),
                "citadel-model@mixtral.service".into(),
            ],
        )
        .unwrap();
        assert_eq!(
            got,
            [
                "citadel-model@mixtral.service",
                "citadel-model@phi3.service",
                "citadel-gateway.service"
            ]
        );
        assert_eq!(resolve(&s, &[]).unwrap().len(), 5);
    }

    #[test]
    fn unknown_names_list_the_valid_ones() {
        let err = resolve(&settings(), &["llama".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown service `llama`"), "{err}");
        assert!(
            err.contains("mixtral, hermes, openchat, phi3, gateway"),
            "{err}"
        );
    }
}
