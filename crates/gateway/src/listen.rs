//! The listening socket: handed over by systemd (socket activation from
//! `citadel-gateway.socket`, issue 12, item 1) or bound here.
//!
//! Under systemd the socket is made by PID 1 in the host's network namespace
//! while the gateway runs in Citadel's private one (with the engines): the
//! gateway could not bind a host address itself. The socket also outlives a
//! gateway restart, so clients connecting meanwhile wait in its backlog
//! instead of being refused. Outside systemd (tests, development) the gateway
//! binds `gateway.listen:gateway.port` (or `--listen`) itself.

use std::net::TcpListener;

use crate::StartError;

/// Takes the listening socket systemd passed (`LISTEN_PID`/`LISTEN_FDS`, the
/// sd_listen_fds(3) protocol), or `None` when the process was not
/// socket-activated. Exactly one TCP listening socket is expected.
///
/// Call it in `main` before any thread starts: it removes the two variables
/// from the environment (so children do not take the socket for theirs), and
/// changing the environment is not thread-safe.
pub fn from_systemd() -> Result<Option<TcpListener>, StartError> {
    let mut fds = listenfd::ListenFd::from_env();
    match fds.len() {
        0 => Ok(None),
        1 => {
            let listener = fds
                .take_tcp_listener(0)
                .map_err(|source| StartError::Io {
                    context: "the socket systemd passed (LISTEN_FDS) is not a TCP listening socket: check citadel-gateway.socket".into(),
                    source,
                })?
                .ok_or_else(|| StartError::Config("the socket systemd passed (LISTEN_FDS) was already taken".into()))?;
            Ok(Some(listener))
        }
        n => Err(StartError::Config(format!(
            "systemd passed {n} sockets (LISTEN_FDS={n}); the gateway takes exactly one: give citadel-gateway.socket a single ListenStream="
        ))),
    }
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
