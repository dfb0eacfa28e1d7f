//! Engines reachable only through the gateway (issue 12, item 1).
//!
//! The gateway and every model unit join one private network namespace,
//! `/run/netns/citadel`, which `citadel-netns.service` makes with `ip netns`
//! (`NetworkNamespacePath=`, systemd.exec(5)): the engines' `127.0.0.1:PORT`
//! is that namespace's loopback, which no process on the host's network (any
//! local user) can reach. The supervisor probes its engine from inside the
//! same unit, and the gateway reaches the engines on the shared loopback.
//!
//! Why a named namespace and not `JoinsNamespaceOf=`: a unit joins the
//! namespace of a unit it names only while that unit runs, so a model started
//! while the gateway is stopped would get a namespace of its own, which the
//! gateway, started later, would not share; and both units would share their
//! `/tmp` too. (Measured in the booted sandbox, systemd 252, with `b`
//! `JoinsNamespaceOf=a`, both `PrivateNetwork=yes`: `b` started before `a`
//! gets a namespace of its own and `a` another, and restarting `a` does not
//! bring them together; `a` before `b` shares one.) A named namespace outlives single units: the gateway restarting
//! while models run, or a model restarting alone, joins the same one.
//! `StopWhenUnneeded=yes` removes it when no Citadel unit needs it any more.
//!
//! The gateway's public socket is made by PID 1 in the host's namespace from
//! `citadel-gateway.socket` and handed over at start (socket activation): the
//! API stays reachable from the host and beyond, the gateway needs no
//! capability for a privileged port, and connections made while the gateway
//! restarts wait in the socket's backlog instead of being refused.
//!
//! When the stack cannot be isolated (replicas, an engine that downloads: see
//! `citadel_config::network`) the units stay in the host's namespace; the
//! gateway still gets its socket from systemd.

use std::path::PathBuf;

use citadel_config::network::NETNS_PATH;
use citadel_config::{unit_names, Settings};

use crate::units::header;
use crate::writer::{Literal, Token, UnitWriter};
use crate::{FileKind, RenderedFile};

// `ip` (iproute2: /bin/ip on Debian and Ubuntu, merged /usr or not) makes and
// removes the namespace; the lines below name NETNS_NAME, checked by a test.

/// Where the gateway and the models run, network-wise: in isolated stacks,
/// ordered after and bound to the namespace they join. `[Unit]` part.
pub(crate) fn namespace_dependencies(w: &mut UnitWriter, settings: &Settings) {
    if settings.engine_network().is_isolated() {
        w.comment("Engines are reachable only through the gateway: see citadel-netns.service.")
            .set("BindsTo", unit_names::NETNS)
            .set("After", unit_names::NETNS);
    }
}

/// The `[Service]` part: join Citadel's namespace.
pub(crate) fn join_namespace(w: &mut UnitWriter, settings: &Settings) {
    if settings.engine_network().is_isolated() {
        w.comment(&format!(
            "Citadel's private network namespace ({NETNS_PATH}): its loopback is shared by the"
        ))
        .comment(
            "gateway and the engines only; no local user on the host can connect to an engine.",
        )
        .set("PrivateNetwork", "yes")
        .set("NetworkNamespacePath", NETNS_PATH);
    } else {
        w.comment(
            "Host network namespace: `citadel-systemd validate` says why, and that any local",
        )
        .comment("user can connect to the engines' ports.");
    }
}

/// `citadel-netns.service`: makes the named namespace with its loopback up,
/// removes it when stopped. Rendered only for isolated stacks.
pub(crate) fn netns_unit(settings: &Settings) -> Option<RenderedFile> {
    if !settings.engine_network().is_isolated() {
        return None;
    }
    let mut w = UnitWriter::new(&header(settings, "#"));
    w.section("Unit")
        .set(
            "Description",
            "Citadel network namespace (engines reachable only through the gateway)",
        )
        .set("Documentation", "man:ip-netns(8) man:systemd.exec(5)")
        .comment("Pulled in by the gateway and the models (BindsTo=); gone when none runs.")
        .set("StopWhenUnneeded", "yes");
    w.section("Service")
        .set("Type", "oneshot")
        .set("RemainAfterExit", "yes")
        .comment(
            "A namespace left mounted by a killed run is replaced (processes still in it keep it).",
        )
        .set("ExecStartPre", "-/bin/ip netns delete citadel")
        .set("ExecStart", "/bin/ip netns add citadel")
        .set("ExecStart", "/bin/ip -n citadel link set lo up")
        .set("ExecStop", "/bin/ip netns delete citadel")
        .comment("Runs as root: mounting a namespace needs CAP_SYS_ADMIN in the host's mount")
        .comment("namespace (no ProtectSystem= or other mount sandboxing, which would hide the")
        .comment("mount), the loopback CAP_NET_ADMIN. Nothing else.")
        .set("CapabilityBoundingSet", "CAP_SYS_ADMIN CAP_NET_ADMIN")
        .set("NoNewPrivileges", "yes")
        .set("RestrictAddressFamilies", "AF_UNIX AF_NETLINK")
        .set("LockPersonality", "yes")
        .set("MemoryDenyWriteExecute", "yes")
        .set("RestrictRealtime", "yes")
        .set("SystemCallArchitectures", "native")
        .set("SyslogIdentifier", "citadel-netns")
        .set("LogExtraFields", "CITADEL_SERVICE=netns");
    Some(RenderedFile {
        path: PathBuf::from(unit_names::NETNS),
        kind: FileKind::Unit,
        contents: w.finish(),
    })
}

/// `citadel-gateway.socket`: the gateway's public listening socket.
pub(crate) fn gateway_socket(settings: &Settings) -> RenderedFile {
    let g = &settings.gateway;
    let addr = match g.listen {
        std::net::IpAddr::V6(a) => format!("[{a}]:{}", g.port),
        std::net::IpAddr::V4(a) => format!("{a}:{}", g.port),
    };
    let mut w = UnitWriter::new(&header(settings, "#"));
    w.section("Unit")
        .set(
            "Description",
            Literal::new(format!("Citadel API gateway socket ({addr})")),
        )
        .set("Documentation", "man:systemd.socket(5)")
        .set("PartOf", unit_names::TARGET);
    w.section("Socket")
        .comment("Made by PID 1 in the host's network namespace and handed to citadel-gateway")
        .comment("(LISTEN_FDS): the API is reachable from the host while the engines are not, and")
        .comment("connections made while the gateway restarts wait here instead of being refused.")
        .set("ListenStream", Token::new(addr))
        .set("NoDelay", "yes")
        .comment(
            "Connections the kernel queues until the gateway accepts them (gateway.listen_backlog;",
        )
        .comment("Linux caps it at net.core.somaxconn): a burst or a restart overflows no queue.")
        .set("Backlog", Token::new(g.listen_backlog.to_string()))
        .comment("The gateway tells this socket from the admin socket by name (LISTEN_FDNAMES).")
        .set("FileDescriptorName", API_FD_NAME);
    w.section("Install").set("WantedBy", unit_names::TARGET);
    RenderedFile {
        path: PathBuf::from(unit_names::GATEWAY_SOCKET),
        kind: FileKind::Unit,
        contents: w.finish(),
    }
}

/// The `FileDescriptorName=` of the API socket (the gateway's `listen::API_FD_NAME`).
pub const API_FD_NAME: &str = "api";
/// The `FileDescriptorName=` of the admin socket (the gateway's `listen::ADMIN_FD_NAME`).
pub const ADMIN_FD_NAME: &str = "admin";

/// `citadel-gateway-admin.socket` (issue 15): the gateway's admin channel
/// (drain and admit backends, add and remove temporary ones), used by
/// `citadel-systemd restart --rolling/--surge`.
pub(crate) fn gateway_admin_socket(settings: &Settings) -> RenderedFile {
    let mut w = UnitWriter::new(&header(settings, "#"));
    w.section("Unit")
        .set(
            "Description",
            "Citadel API gateway admin socket (drain, temporary backends)",
        )
        .set("Documentation", "man:systemd.socket(5)")
        // Not PartOf=citadel.target: with it, `systemctl restart citadel.target`
        // restarted both sockets at once and the API socket failed to listen
        // again (EADDRINUSE, no API; e2e issue10_disable_sticks_across_target_restart_and_reboot,
        // 1 in 2 runs under systemd 252). `citadel-systemd stop` stops it.
        .comment(
            "Started with citadel.target (WantedBy=) but not PartOf= it: restarting the target",
        )
        .comment("restarted both sockets at once and the API socket could not listen again")
        .comment("(EADDRINUSE). `citadel-systemd stop` and `uninstall` stop this socket too.");
    w.section("Socket")
        .comment("Root only: whoever can connect can take a model out of service or send its")
        .comment("traffic to any address, so the socket is owned by root with mode 0600 (the")
        .comment("gateway's own user cannot open it: PID 1 hands it over already listening).")
        .comment("A unit of its own, not a second ListenStream= of citadel-gateway.socket: that")
        .comment("unit's NoDelay= and Backlog= are TCP options, and a socket unit's options")
        .comment("apply to every socket it listens on; it also stays off the API's port.")
        .set("ListenStream", unit_names::ADMIN_SOCKET_PATH)
        .set("SocketUser", "root")
        .set("SocketGroup", "root")
        .set("SocketMode", "0600")
        .set("RemoveOnStop", "yes")
        .comment(
            "Handed to citadel-gateway with the API socket; told apart by name (LISTEN_FDNAMES).",
        )
        .set("FileDescriptorName", ADMIN_FD_NAME)
        .set("Service", unit_names::GATEWAY);
    w.section("Install").set("WantedBy", unit_names::TARGET);
    RenderedFile {
        path: PathBuf::from(unit_names::GATEWAY_ADMIN_SOCKET),
        kind: FileKind::Unit,
        contents: w.finish(),
    }
}
