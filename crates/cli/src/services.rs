//! SERVICE arguments: model names, instance names (`phi3:2`), `gateway`
//! (alias `api-gateway`, `citadel-gateway`) or unit names.
//!
//! A name resolves to every unit it could mean: a unit name of the stack, the
//! gateway's aliases, a model name (every local instance of the model, in
//! order: issue 15), an instance name (that instance alone). Exactly one
//! meaning must remain; a name that means two different things (a model named
//! `citadel-gateway.service`, which the config refuses too) is refused with
//! both readings rather than guessed (issue 9, item 15: `restart
//! citadel-gateway.service` restarted the gateway).

use anyhow::{bail, Result};
use citadel_config::{unit_names, Settings};

/// The gateway's names besides its unit name.
const GATEWAY_ALIASES: &[&str] = &["gateway", "api-gateway", "citadel-gateway"];

/// One model as SERVICE names see it: its name and its local instances as
/// (instance name, unit name), instance 1 first.
struct ModelUnits<'a> {
    model: &'a str,
    instances: Vec<(String, String)>,
}

fn model_units_of(settings: &Settings) -> Vec<ModelUnits<'_>> {
    settings
        .models
        .iter()
        .map(|m| ModelUnits {
            model: m.name.as_str(),
            instances: (1..=m.instance_count())
                .map(|n| (m.instance_name(n), m.instance_unit(n)))
                .collect(),
        })
        .collect()
}

/// Every model instance's unit in stack order (each model's instances in
/// order, instance 1 first), without the gateway.
pub fn model_units(settings: &Settings) -> Vec<String> {
    settings
        .models
        .iter()
        .flat_map(|m| (1..=m.instance_count()).map(|n| m.instance_unit(n)))
        .collect()
}

/// Resolves SERVICE arguments to unit names, models first (each with its
/// instances, in stack order) then the gateway. No arguments means the whole
/// stack.
pub fn resolve(settings: &Settings, names: &[String]) -> Result<Vec<String>> {
    resolve_in(&model_units_of(settings), names)
}

/// [`resolve`] over the models' units in stack order.
fn resolve_in(models: &[ModelUnits<'_>], names: &[String]) -> Result<Vec<String>> {
    let all: Vec<String> = models
        .iter()
        .flat_map(|m| m.instances.iter().map(|(_, unit)| unit.clone()))
        .chain(std::iter::once(unit_names::GATEWAY.to_owned()))
        .collect();
    if names.is_empty() {
        return Ok(all);
    }
    let mut chosen = Vec::new();
    for name in names {
        let n = name.as_str();
        let mut meanings: Vec<(Vec<String>, &str)> = Vec::new();
        if all.iter().any(|u| u == n) {
            meanings.push((vec![n.to_owned()], "the unit name"));
        }
        if GATEWAY_ALIASES.contains(&n) {
            meanings.push((vec![unit_names::GATEWAY.to_owned()], "the gateway"));
        }
        if let Some(m) = models.iter().find(|m| m.model == n) {
            let how = if m.instances.len() > 1 {
                "the model name, every instance"
            } else {
                "the model name"
            };
            meanings.push((m.instances.iter().map(|(_, u)| u.clone()).collect(), how));
        }
        if let Some((_, unit)) = models
            .iter()
            .flat_map(|m| m.instances.iter().skip(1))
            .find(|(instance, _)| instance == n)
        {
            meanings.push((vec![unit.clone()], "the instance name"));
        }
        let mut readings: Vec<&Vec<String>> = meanings.iter().map(|(u, _)| u).collect();
        readings.sort();
        readings.dedup();
        let units = match readings.as_slice() {
            [units] => (*units).clone(),
            [] => bail!("{}", unknown(models, n)),
            _ => {
                let readings: Vec<String> = meanings
                    .iter()
                    .map(|(u, how)| format!("{} ({how})", u.join(" ")))
                    .collect();
                bail!(
                    "service `{n}` is ambiguous: it names {}; give the full unit name of the one you mean",
                    readings.join(" and ")
                );
            }
        };
        for unit in units {
            if !chosen.contains(&unit) {
                chosen.push(unit);
            }
        }
    }
    chosen.sort_by_key(|u| all.iter().position(|a| a == u));
    Ok(chosen)
}

/// The error for a name that means nothing: the valid names, each model with
/// its instances when it has more than one; for `MODEL:N` of a known model,
/// the instances it does have.
fn unknown(models: &[ModelUnits<'_>], n: &str) -> String {
    let instances = |m: &ModelUnits<'_>| -> String {
        m.instances
            .iter()
            .map(|(i, _)| i.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if let Some((model, _)) = n.split_once(citadel_config::INSTANCE_SEPARATOR) {
        if let Some(m) = models.iter().find(|m| m.model == model) {
            return format!(
                "unknown service `{n}`: model {model} has {} local instance{} ({}); add one with a [[models.{model}.instances]] table",
                m.instances.len(),
                if m.instances.len() == 1 { "" } else { "s" },
                instances(m)
            );
        }
    }
    let names: Vec<String> = models
        .iter()
        .map(|m| {
            if m.instances.len() > 1 {
                format!("{} (instances {})", m.model, instances(m))
            } else {
                m.model.to_owned()
            }
        })
        .collect();
    format!(
        "unknown service `{n}`; valid services: {}, gateway (alias api-gateway), or their unit names",
        names.join(", ")
    )
}

/// The model names among SERVICE arguments that name a model with two or
/// more local instances (by its model name).
pub fn multi_instance_models<'a>(settings: &Settings, names: &'a [String]) -> Vec<&'a str> {
    names
        .iter()
        .map(String::as_str)
        .filter(|n| settings.model(n).is_some_and(|m| m.instance_count() > 1))
        .collect()
}

/// The short name shown for a unit: the instance name (the model name for
/// instance 1, `phi3:2` after it), or `gateway`.
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

    /// A model with one instance.
    fn one<'a>(model: &'a str, unit: &str) -> ModelUnits<'a> {
        ModelUnits {
            model,
            instances: vec![(model.to_owned(), unit.to_owned())],
        }
    }

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
            one("phi3", "citadel-model@phi3.service"),
            one(
                "citadel-gateway.service",
                "citadel-model@citadel-gateway.service.service",
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
        let models = vec![one("api-gateway", "citadel-model@api-gateway.service")];
        assert!(resolve_in(&models, &["api-gateway".into()]).is_err());
    }

    /// Issue 15: a model name means every local instance, in order; an
    /// instance name or unit name one; `MODEL:N` beyond the model's
    /// instances is refused naming those it has.
    #[test]
    fn issue15_model_names_mean_every_instance() {
        let s = citadel_config::parse(
            "[models.phi3]\nport = 11403\nengine = \"sim\"\n[[models.phi3.instances]]\nport = 11413\n\
             [models.tiny]\nport = 11404\nengine = \"sim\"\n",
            std::path::Path::new("c.toml"),
        )
        .unwrap()
        .settings;
        let r =
            |names: &[&str]| resolve(&s, &names.iter().map(|n| n.to_string()).collect::<Vec<_>>());
        let both = ["citadel-model@phi3.service", "citadel-model@phi3:2.service"];
        assert_eq!(r(&["phi3"]).unwrap(), both);
        assert_eq!(r(&["phi3:2"]).unwrap(), ["citadel-model@phi3:2.service"]);
        assert_eq!(
            r(&["citadel-model@phi3:2.service"]).unwrap(),
            ["citadel-model@phi3:2.service"]
        );
        // Stack order, whatever the order given; no unit twice.
        assert_eq!(
            r(&["gateway", "phi3:2", "tiny", "phi3"]).unwrap(),
            [
                both[0],
                both[1],
                "citadel-model@tiny.service",
                "citadel-gateway.service"
            ]
        );
        assert_eq!(r(&[]).unwrap().len(), 4);
        assert_eq!(
            model_units(&s),
            [both[0], both[1], "citadel-model@tiny.service"]
        );
        let err = r(&["phi3:3"]).unwrap_err().to_string();
        assert!(
            err.contains("model phi3 has 2 local instances (phi3, phi3:2)"),
            "{err}"
        );
        let err = r(&["phi3:1"]).unwrap_err().to_string();
        assert!(err.contains("(phi3, phi3:2)"), "{err}");
        let err = r(&["tiny:2"]).unwrap_err().to_string();
        assert!(
            err.contains("model tiny has 1 local instance (tiny)"),
            "{err}"
        );
        let err = r(&["llama"]).unwrap_err().to_string();
        assert!(
            err.contains("valid services: phi3 (instances phi3, phi3:2), tiny, gateway"),
            "{err}"
        );
        assert_eq!(short_name("citadel-model@phi3:2.service"), "phi3:2");
        let names = ["phi3".to_owned(), "tiny".to_owned(), "phi3:2".to_owned()];
        assert_eq!(multi_instance_models(&s, &names), ["phi3"]);
    }
}
