//! Whether the engines can be reachable only through the gateway (issue 12,
//! item 1), and the warning when they cannot.
//!
//! Engines listen on `127.0.0.1:PORT`. On the host's loopback every local user
//! can connect there (`IPAddressAllow=localhost` filters by address, and every
//! local user is localhost), skipping the gateway's keys and rate limits. So,
//! by default, the gateway and every model unit share one private network
//! namespace, `/run/netns/citadel` (made by `citadel-netns.service`): the
//! engines' loopback is that namespace's, which no host process can reach, and
//! the gateway's public socket is made by PID 1 in the host's namespace
//! (`citadel-gateway.socket`) and handed to the gateway.
//!
//! A private namespace has no way out, though. When a model has replicas (the
//! gateway must reach them from the host's network, be they on another host or
//! on the host's loopback) or runs an engine that needs the outside network
//! (Ollama downloads models), the stack runs in the host's network namespace
//! as before, and validation warns that the engines are then reachable by any
//! local user, and why.

use std::fmt;
use std::ops::Range;

use crate::raw::{RawConfig, RawModel, S};
use crate::{Diagnostic, EngineKind, ModelName, Settings};

/// The name of Citadel's network namespace (`ip netns`).
pub const NETNS_NAME: &str = "citadel";

/// Where `ip netns add citadel` mounts it; units join it with `NetworkNamespacePath=`.
pub const NETNS_PATH: &str = "/run/netns/citadel";

/// Where the gateway and the engines run, network-wise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineNetwork {
    /// Every Citadel unit in the private namespace [`NETNS_PATH`]: engines are
    /// reachable only through the gateway.
    Isolated,
    /// The host's network namespace, for these reasons (never empty): any
    /// local user can connect to the engines' ports.
    Host(Vec<HostNetworkReason>),
}

impl EngineNetwork {
    pub fn is_isolated(&self) -> bool {
        matches!(self, EngineNetwork::Isolated)
    }
}

/// Why a stack cannot be isolated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostNetworkReason {
    /// The model has replicas, which the gateway reaches over the host's network.
    Replicas { model: ModelName },
    /// The model's engine needs the outside network.
    EngineNeedsNetwork {
        model: ModelName,
        engine: EngineKind,
        why: &'static str,
    },
}

impl fmt::Display for HostNetworkReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostNetworkReason::Replicas { model } => write!(
                f,
                "model `{model}` has replicas, which the gateway reaches over the host's network"
            ),
            HostNetworkReason::EngineNeedsNetwork { model, engine, why } => {
                write!(
                    f,
                    "model `{model}` runs {engine}, which needs the outside network ({why})"
                )
            }
        }
    }
}

/// Why an engine needs the network beyond its own loopback, if it does.
pub fn engine_needs_network(kind: EngineKind) -> Option<&'static str> {
    match kind {
        EngineKind::Ollama => Some("Ollama downloads models"),
        _ => None,
    }
}

impl Settings {
    /// Where the stack runs, network-wise (see the module docs).
    pub fn engine_network(&self) -> EngineNetwork {
        let mut reasons = Vec::new();
        for m in &self.models {
            if !m.replicas.is_empty() {
                reasons.push(HostNetworkReason::Replicas {
                    model: m.name.clone(),
                });
            }
            let engine = m.engine.kind();
            if let Some(why) = engine_needs_network(engine) {
                reasons.push(HostNetworkReason::EngineNeedsNetwork {
                    model: m.name.clone(),
                    engine,
                    why,
                });
            }
        }
        if reasons.is_empty() {
            EngineNetwork::Isolated
        } else {
            EngineNetwork::Host(reasons)
        }
    }
}

const HELP: &str = "engines are then reachable by any local user at 127.0.0.1:PORT, without the gateway's keys and rate limits; to isolate them, serve replicas through a Citadel gateway on their own host, or pre-load Ollama's models and use another engine profile (see docs/operations.md, \"Engine isolation\")";

/// The warnings for a stack that cannot be isolated: one per reason, at the
/// key that causes it (the model's or `[model_defaults]`'s `replicas` or
/// `engine`). `settings` holds the validated models.
pub(crate) fn warnings(raw: &RawConfig, settings: &Settings) -> Vec<Diagnostic> {
    let EngineNetwork::Host(reasons) = settings.engine_network() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for reason in reasons {
        let (model, field) = match &reason {
            HostNetworkReason::Replicas { model } => (model, "replicas"),
            HostNetworkReason::EngineNeedsNetwork { model, .. } => (model, "engine"),
        };
        let own = raw
            .models
            .iter()
            .find(|(n, _)| n.get_ref() == model.as_str())
            .map(|(_, m)| m.get_ref());
        let (key, at) = match own.and_then(|m| field_span(m, field)) {
            Some(at) => (format!("models.{model}.{field}"), Some(at)),
            None => match field_span(&raw.model_defaults, field) {
                Some(at) => (format!("model_defaults.{field}"), Some(at)),
                None => (format!("models.{model}"), None),
            },
        };
        out.push(
            Diagnostic::warning(
                key,
                format!(
                    "engines are not isolated from local users: {reason}, so the gateway and every model run in the host's network namespace instead of Citadel's private one"
                ),
            )
            .at(at)
            .help(HELP),
        );
    }
    out
}

fn field_span(m: &RawModel, field: &str) -> Option<Range<usize>> {
    match field {
        "replicas" => m.replicas.as_ref().map(S::span),
        "engine" => m.engine.as_ref().map(S::span),
        _ => None,
    }
}
