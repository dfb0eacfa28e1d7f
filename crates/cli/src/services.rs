//! SERVICE arguments: model names, `gateway` (alias `api-gateway`,
//! `citadel-gateway`) or unit names.
//!
//! A name resolves to every unit it could mean: a unit name of the stack, the
//! gateway's aliases, a model name. Exactly one must remain; a name that means
//! two different units (a model named `citadel-gateway.service`, which the
//! config refuses too) is refused with both readings rather than guessed
//! (issue 9, item 15: `restart citadel-gateway.service` restarted the gateway).

use anyhow::{bail, Result};
use citadel_config::{unit_names, Settings};

/// The gateway's names besides its unit name.
const GATEWAY_ALIASES: &[&str] = &["gateway", "api-gateway", "citadel-gateway"];

/// Resolves SERVICE arguments to unit names, models first (by port) then the
/// gateway. No arguments means the whole stack.
pub fn resolve(settings: &Settings, names: &[String]) -> Result<Vec<String>> {
    let models: Vec<(&str, String)> = settings
        .models
        .iter()
        .map(|m| (m.name.as_str(), m.unit_name()))
        .collect();
    resolve_in(&models, names)
}

/// [`resolve`] over (model name, unit name) pairs in stack order.
fn resolve_in(models: &[(&str, String)], names: &[String]) -> Result<Vec<String>> {
    let all: Vec<String> = models
        .iter()
        .map(|(_, unit)| unit.clone())
        .chain(std::iter::once(unit_names::GATEWAY.to_owned()))
        .collect();
    if names.is_empty() {
        return Ok(all);
    }
    let mut chosen = Vec::new();
    for name in names {
        let n = name.as_str();
        let mut meanings: Vec<(String, &str)> = Vec::new();
        if all.iter().any(|u| u == n) {
            meanings.push((n.to_owned(), "the unit name"));
        }
        if GATEWAY_ALIASES.contains(&n) {
            meanings.push((unit_names::GATEWAY.to_owned(), "the gateway"));
        }
        if let Some((_, unit)) = models.iter().find(|(m, _)| *m == n) {
            meanings.push((unit.clone(), "the model name"));
        }
        let mut units: Vec<&String> = meanings.iter().map(|(u, _)| u).collect();
        units.sort();
        units.dedup();
        let unit = match units.as_slice() {
            [unit] => (*unit).clone(),
            [] => {
                let models: Vec<&str> = models.iter().map(|(m, _)| *m).collect();
                bail!(
                    "unknown service `{n}`; valid services: {}, gateway (alias api-gateway), or their unit names",
                    models.join(", ")
                );
            }
            _ => {
                let readings: Vec<String> = meanings
                    .iter()
                    .map(|(u, how)| format!("{u} ({how})"))
                    .collect();
                bail!(
                    "service `{n}` is ambiguous: it names {}; give the full unit name of the one you mean",
                    readings.join(" and ")
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

    /// Issue 9, item 15: with a model named `citadel-gateway.service`,
    /// `restart citadel-gateway.service` restarted the gateway. Such a name is
    /// refused as ambiguous; each full unit name still resolves to its unit.
    #[test]
    fn issue9_service_names_resolve_unambiguously() {
        let models = vec![
            ("phi3", "citadel-model@phi3.service".to_owned()),
            (
                "citadel-gateway.service",
                "citadel-model@citadel-gateway.service.service".to_owned(),
            ),
        ];
        let err = resolve_in(&models, &["citadel-gateway.service".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("ambiguous"), "{err}");
        assert!(
            err.contains("citadel-model@citadel-gateway.service.service (the model name)"),
            "{err}"
        );
        assert!(
            err.contains("citadel-gateway.service (the unit name)"),
            "{err}"
        );
        assert_eq!(
            resolve_in(
                &models,
                &["citadel-model@citadel-gateway.service.service".into()]
            )
            .unwrap(),
            ["citadel-model@citadel-gateway.service.service"]
        );
        assert_eq!(
            resolve_in(&models, &["gateway".into()]).unwrap(),
            ["citadel-gateway.service"]
        );
        // A model named like a gateway alias is ambiguous too.
        let models = vec![(
            "api-gateway",
            "citadel-model@api-gateway.service".to_owned(),
        )];
        assert!(resolve_in(&models, &["api-gateway".into()]).is_err());
    }
}
