//! Static checks of upstream URLs (`models.NAME.replicas`): issue 12, item 3.
//!
//! A replica that is the gateway itself makes every request a loop (one
//! request was forwarded to the gateway 4,628 times). The config crate does no
//! I/O, so only what the text says is checked: a literal loopback address,
//! `localhost` (and names under `.localhost`, RFC 6761), an unspecified
//! address, or the gateway's own listen address, with the gateway's port. A
//! name that resolves to the gateway is caught at run time by the gateway's
//! hop header instead.

use std::net::{IpAddr, Ipv6Addr};

/// The host and port of `http://HOST:PORT[/]` (IPv6 without its brackets), or
/// `None` when the URL is not of that shape.
pub fn host_port(url: &str) -> Option<(&str, u16)> {
    let rest = url.strip_prefix("http://")?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let (host, port) = rest.rsplit_once(':')?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let port: u16 = port.parse().ok()?;
    let host = match host.strip_prefix('[') {
        Some(h) => h.strip_suffix(']')?,
        None => host,
    };
    (!host.is_empty()).then_some((host, port))
}

/// The address as an IPv4 one when it is an IPv4-mapped IPv6 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Whether `host` names this machine by loopback: `localhost`, a name under
/// `.localhost`, `127.0.0.0/8`, `::1`, or an unspecified address (`0.0.0.0`
/// and `::` connect to the local host).
fn is_local_host(host: &str) -> bool {
    let name = host.trim_end_matches('.').to_ascii_lowercase();
    if name == "localhost" || name.ends_with(".localhost") {
        return true;
    }
    match host.parse::<IpAddr>().map(canonical) {
        Ok(ip) => ip.is_loopback() || ip.is_unspecified(),
        Err(_) => false,
    }
}

/// Whether the upstream `url` is, by its text, the gateway listening on
/// `listen`:`port`. Names other than `localhost` are not resolved (no I/O).
pub fn points_at_gateway(url: &str, listen: IpAddr, port: u16) -> bool {
    let Some((host, p)) = host_port(url) else {
        return false;
    };
    if p != port {
        return false;
    }
    let listen = canonical(listen);
    let own = host
        .parse::<IpAddr>()
        .map(canonical)
        .is_ok_and(|ip| ip == listen);
    // A gateway on every interface (0.0.0.0, ::) or on loopback answers on
    // every loopback address and name.
    let local_listen = listen.is_loopback()
        || listen.is_unspecified()
        || listen == IpAddr::V6(Ipv6Addr::UNSPECIFIED);
    own || (local_listen && is_local_host(host))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LO: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn issue12_replica_loop_addresses() {
        let any4: IpAddr = "0.0.0.0".parse().unwrap();
        let any6: IpAddr = "::".parse().unwrap();
        let lan: IpAddr = "10.0.0.5".parse().unwrap();
        for url in [
            "http://127.0.0.1:8000",
            "http://127.0.0.1:8000/",
            "http://127.1.2.3:8000",
            "http://localhost:8000",
            "http://LocalHost.:8000",
            "http://api.localhost:8000",
            "http://[::1]:8000",
            "http://[::ffff:127.0.0.1]:8000",
            "http://0.0.0.0:8000",
            "http://[::]:8000",
        ] {
            for listen in [LO, any4, any6] {
                assert!(points_at_gateway(url, listen, 8000), "{url} on {listen}");
            }
            assert!(!points_at_gateway(url, LO, 8001), "{url} other port");
            assert!(!points_at_gateway(url, lan, 8000), "{url} on {lan}");
        }
        assert!(points_at_gateway("http://10.0.0.5:8000", lan, 8000));
        assert!(!points_at_gateway("http://10.0.0.6:8000", lan, 8000));
        assert!(!points_at_gateway("http://10.0.0.5:8000", LO, 8000));
        assert!(!points_at_gateway("http://gpu2.lan:8000", LO, 8000));
        assert!(!points_at_gateway("http://notlocalhost:8000", LO, 8000));
        assert!(!points_at_gateway("http://127.0.0.1:11400", LO, 8000));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(384))]

        /// The URL is outside input: any text gives an answer, never a panic.
        #[test]
        fn issue12_points_at_gateway_never_panics(url in ".{0,64}", port in any::<u16>()) {
            let _ = points_at_gateway(&url, LO, port);
            let _ = points_at_gateway(&format!("http://{url}"), LO, port);
        }

        /// Every loopback IPv4 literal with the gateway's port is refused.
        #[test]
        fn issue12_any_loopback_v4_with_the_port_loops(b in any::<[u8; 3]>(), port in 1u16..) {
            let url = format!("http://127.{}.{}.{}:{port}", b[0], b[1], b[2]);
            prop_assert!(points_at_gateway(&url, LO, port));
        }
    }
}
