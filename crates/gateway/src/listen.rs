//! The listening socket: handed over by systemd (socket activation from
//! `citadel-gateway.socket`, issue 12, item 1) or bound here.
//!
//! Under systemd the socket is made by PID 1 in the host's network namespace
//! while the gateway runs in Citadel's private one (with the engines): the
//! gateway could not bind a host address itself. The socket also outlives a
//! gateway restart, so clients connecting meanwhile wait in its backlog
//! instead of being refused. Outside systemd (tests, development) the gateway
//! binds `gateway.listen:gateway.port` (or `--listen`) itself.
//!
//! The admin channel (issue 15: draining, temporary backends) is a second,
//! root-only Unix socket from `citadel-gateway-admin.socket`; the two are
//! told apart by their `FileDescriptorName=` (`api`, `admin`). Outside
//! systemd, `--admin-socket PATH` binds it here ([`bind_admin`]).

use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::Path;

use crate::StartError;

/// The sockets systemd passed.
#[derive(Debug, Default)]
pub struct Inherited {
    /// The API's listening socket (`citadel-gateway.socket`).
    pub api: Option<TcpListener>,
    /// The admin channel (`citadel-gateway-admin.socket`, issue 15).
    pub admin: Option<UnixListener>,
    /// What to log once logging runs (an old install without the admin socket).
    pub warnings: Vec<String>,
}

/// What each passed fd is, by position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Api,
    Admin,
}

/// The `FileDescriptorName=` of the API socket.
pub const API_FD_NAME: &str = "api";
/// The `FileDescriptorName=` of the admin socket.
pub const ADMIN_FD_NAME: &str = "admin";

/// Tells the `n` passed fds apart by `LISTEN_FDNAMES` (colon-separated, one
/// name per fd, in order; sd_listen_fds_with_names(3)): `api` and `admin`.
/// An install from before issue 15 passes one fd named after its socket
/// unit (or no names at all): that one is the API, and there is no admin
/// channel (a warning). Returns each fd's role and the warnings.
pub fn roles(names: Option<&str>, n: usize) -> Result<(Vec<Role>, Vec<String>), String> {
    let names: Vec<&str> = match names {
        Some(s) if !s.is_empty() => s.split(':').collect(),
        _ => Vec::new(),
    };
    let named = names.len() == n;
    let mut roles = Vec::with_capacity(n);
    let mut warnings = Vec::new();
    if named
        && names
            .iter()
            .any(|x| *x == API_FD_NAME || *x == ADMIN_FD_NAME)
    {
        for (i, name) in names.iter().enumerate() {
            let role = match *name {
                API_FD_NAME => Role::Api,
                ADMIN_FD_NAME => Role::Admin,
                other => {
                    return Err(format!(
                        "systemd passed a socket named {other:?} (fd {}, LISTEN_FDNAMES); the gateway takes `api` (citadel-gateway.socket) and `admin` (citadel-gateway-admin.socket)",
                        i + 3
                    ))
                }
            };
            if roles.contains(&role) {
                return Err(format!(
                    "systemd passed two sockets named {name:?} (LISTEN_FDNAMES): give each socket unit a single ListenStream="
                ));
            }
            roles.push(role);
        }
        if !roles.contains(&Role::Api) {
            return Err("systemd passed the admin socket but no API socket (FileDescriptorName=api): check citadel-gateway.socket".into());
        }
        if !roles.contains(&Role::Admin) {
            warnings.push("no admin socket from systemd (citadel-gateway-admin.socket is not running): draining and temporary backends are not available; `citadel-systemd install` and `start` bring it".into());
        }
        return Ok((roles, warnings));
    }
    match n {
        0 => {}
        1 => {
            roles.push(Role::Api);
            warnings.push("systemd passed one socket without the name `api` (an install from before the admin channel): using it for the API; there is no admin channel until `citadel-systemd install` renders citadel-gateway-admin.socket".into());
        }
        n => {
            return Err(format!(
                "systemd passed {n} sockets (LISTEN_FDS={n}) without the names `api` and `admin` (LISTEN_FDNAMES): give citadel-gateway.socket a single ListenStream= and FileDescriptorName=api"
            ))
        }
    }
    Ok((roles, warnings))
}

/// Takes the sockets systemd passed (`LISTEN_PID`/`LISTEN_FDS`/`LISTEN_FDNAMES`,
/// the sd_listen_fds(3) protocol): the API's TCP socket and, when present,
/// the admin channel's Unix socket, told apart by name ([`roles`]).
///
/// Call it in `main` before any thread starts: it removes the variables from
/// the environment (so children do not take the sockets for theirs), and
/// changing the environment is not thread-safe.
pub fn from_systemd() -> Result<Inherited, StartError> {
    // Read before listenfd takes the fds (it clears LISTEN_FDS and LISTEN_PID
    // but leaves the names).
    let names = std::env::var("LISTEN_FDNAMES").ok();
    let mut fds = listenfd::ListenFd::from_env();
    if fds.len() > 0 {
        std::env::remove_var("LISTEN_FDNAMES");
    }
    let (roles, warnings) = roles(names.as_deref(), fds.len()).map_err(StartError::Config)?;
    let mut out = Inherited {
        warnings,
        ..Inherited::default()
    };
    let taken =
        || StartError::Config("a socket systemd passed (LISTEN_FDS) was already taken".into());
    for (i, role) in roles.into_iter().enumerate() {
        match role {
            Role::Api => {
                let l = fds
                    .take_tcp_listener(i)
                    .map_err(|source| StartError::Io {
                        context: "the socket systemd passed (LISTEN_FDS) is not a TCP listening socket: check citadel-gateway.socket".into(),
                        source,
                    })?
                    .ok_or_else(taken)?;
                out.api = Some(l);
            }
            Role::Admin => {
                let l = fds
                    .take_unix_listener(i)
                    .map_err(|source| StartError::Io {
                        context: "the admin socket systemd passed is not a Unix listening socket: check citadel-gateway-admin.socket".into(),
                        source,
                    })?
                    .ok_or_else(taken)?;
                out.admin = Some(l);
            }
        }
    }
    Ok(out)
}

/// Binds the admin channel's Unix socket at `path` outside systemd
/// (`--admin-socket`), readable and writable by this user only (0600): it is
/// bound under a temporary name, restricted, then renamed into place, so it
/// is never reachable with wider permissions. A stale socket file at `path`
/// is replaced.
pub fn bind_admin(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let l = UnixListener::bind(&tmp)?;
    let res = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(l)
}

/// Binds `addr` the way nginx does, for when the gateway is not
/// socket-activated (issue 11, item 3): `SO_REUSEADDR` (a restart rebinds at
/// once, whatever connections of the old process linger in TIME_WAIT) and a
/// listen backlog of `backlog` (`gateway.listen_backlog`; tokio's default of
/// 128 overflowed under a burst of 1,000 connections: 683 dropped SYNs, each
/// a one-second client retry). Linux caps the backlog at
/// `net.core.somaxconn`. Needs a tokio runtime.
pub fn bind(addr: std::net::SocketAddr, backlog: u32) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

#[cfg(test)]
mod tests {
    use super::{roles, Role};

    /// Issue 15: the API and admin sockets are told apart by LISTEN_FDNAMES,
    /// in either order; an old install's single unnamed (or unit-named) fd
    /// is the API, with a warning.
    #[test]
    fn issue15_listen_fdnames_tell_api_and_admin_apart() {
        let (r, w) = roles(Some("api:admin"), 2).unwrap();
        assert_eq!(r, [Role::Api, Role::Admin]);
        assert!(w.is_empty(), "{w:?}");
        let (r, _) = roles(Some("admin:api"), 2).unwrap();
        assert_eq!(r, [Role::Admin, Role::Api]);
        // The admin socket not running: the API alone, with a warning.
        let (r, w) = roles(Some("api"), 1).unwrap();
        assert_eq!(r, [Role::Api]);
        assert_eq!(w.len(), 1);
        // Before issue 15: one fd named after its unit, or no names at all.
        for names in [Some("citadel-gateway.socket"), None, Some("")] {
            let (r, w) = roles(names, 1).unwrap();
            assert_eq!(r, [Role::Api], "{names:?}");
            assert!(w[0].contains("no admin channel"), "{w:?}");
        }
        assert_eq!(roles(None, 0).unwrap().0, []);
        // Refused: two unnamed fds, an unknown name, a duplicate, admin alone.
        assert!(roles(None, 2).is_err());
        assert!(roles(Some("a:b"), 2).is_err());
        assert!(roles(Some("api:other"), 2)
            .unwrap_err()
            .contains("\"other\""));
        assert!(roles(Some("api:api"), 2).is_err());
        assert!(roles(Some("admin"), 1).is_err());
        // Names that do not match the count of fds are not trusted.
        assert!(roles(Some("api:admin"), 3).is_err());
    }
}
