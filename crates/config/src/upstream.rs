//! Static checks of upstream URLs (`models.NAME.replicas`): issue 12, item 3.
//!
//! A replica that is the gateway itself makes every request a loop (one
//! request was forwarded to the gateway 4,628 times). The config crate does no
//! I/O, so only what the text says is checked: a literal loopback address,
//! `localhost` (and names under `.localhost`, RFC 6761, and the loopback
//! names distributions put in `/etc/hosts`), an unspecified address, or the
//! gateway's own listen address, with the gateway's port. A name that
//! resolves to the gateway is caught at run time by the gateway's hop header
//! instead.
//!
//! Resolvers read IPv4 addresses the way `inet_aton` does (`127.1`,
//! `2130706433`, `0x7f000001` and `0177.0.0.1` are all 127.0.0.1), so an
//! IPv4 literal that is not a canonical dotted quad is refused
//! ([`ipv4_spelling`]) and, for the loop check, read as a resolver reads it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

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

/// Names of the local host by loopback that Debian, Ubuntu, Fedora and
/// others put in `/etc/hosts`, besides `localhost` itself.
const LOOPBACK_NAMES: [&str; 7] = [
    "localhost.localdomain",
    "localhost4",
    "localhost4.localdomain4",
    "localhost6",
    "localhost6.localdomain6",
    "ip6-localhost",
    "ip6-loopback",
];

/// How an upstream URL writes its host, when the host is an IPv4 literal
/// (its last label is a number, as for a resolver).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ipv4Spelling {
    /// A name, an IPv6 address or a canonical dotted quad (`10.0.0.12`).
    Fine,
    /// A number a resolver reads as this address (`127.1`, `2130706433`,
    /// `0x7f000001`, `0177.0.0.1`, a trailing dot).
    Means(Ipv4Addr),
    /// A number that is no address (`1.2.3.4.5`, `256.0.0.1`, `09.0.0.1`).
    Invalid,
}

/// Whether the host of `url` is an IPv4 literal written other than as a
/// canonical dotted quad, and what a resolver reads it as.
pub fn ipv4_spelling(url: &str) -> Ipv4Spelling {
    host_port(url).map_or(Ipv4Spelling::Fine, |(host, _)| host_spelling(host))
}

/// [`ipv4_spelling`] of a host.
fn host_spelling(host: &str) -> Ipv4Spelling {
    if host.parse::<IpAddr>().is_ok() || host.contains(':') {
        return Ipv4Spelling::Fine;
    }
    let trimmed = host.strip_suffix('.').unwrap_or(host);
    let last = trimmed.rsplit('.').next().unwrap_or(trimmed);
    if !is_number_label(last) {
        return Ipv4Spelling::Fine;
    }
    inet_aton(trimmed).map_or(Ipv4Spelling::Invalid, Ipv4Spelling::Means)
}

/// Whether a label is a number as a resolver reads one: decimal, octal or
/// `0x` hexadecimal.
fn is_number_label(label: &str) -> bool {
    match label
        .strip_prefix("0x")
        .or_else(|| label.strip_prefix("0X"))
    {
        Some(hex) => hex.bytes().all(|b| b.is_ascii_hexdigit()),
        None => !label.is_empty() && label.bytes().all(|b| b.is_ascii_digit()),
    }
}

/// One part of an `inet_aton` address: `0x` hexadecimal, a leading `0`
/// octal, else decimal; `None` when it is no number or does not fit 32 bits.
fn aton_part(part: &str) -> Option<u32> {
    if let Some(hex) = part.strip_prefix("0x").or_else(|| part.strip_prefix("0X")) {
        if hex.is_empty() {
            return Some(0);
        }
        return u32::from_str_radix(hex, 16).ok();
    }
    if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if part.len() > 1 && part.starts_with('0') {
        return u32::from_str_radix(&part[1..], 8).ok();
    }
    part.parse().ok()
}

/// The address `inet_aton(3)` reads from `text`: one to four parts, the last
/// filling the bytes the others leave.
fn inet_aton(text: &str) -> Option<Ipv4Addr> {
    let parts = text
        .split('.')
        .map(aton_part)
        .collect::<Option<Vec<u32>>>()?;
    let (last, head) = parts.split_last()?;
    if head.len() > 3 || head.iter().any(|&p| p > 255) {
        return None;
    }
    let bits = 8 * (4 - head.len() as u32);
    if bits < 32 && *last >> bits != 0 {
        return None;
    }
    let high = head
        .iter()
        .enumerate()
        .fold(0u32, |acc, (i, &p)| acc | p << (24 - 8 * i as u32));
    Some(Ipv4Addr::from(high | last))
}

/// The address `host` names as a literal: an IP address, or an IPv4 address
/// in any spelling a resolver reads.
fn literal_ip(host: &str) -> Option<IpAddr> {
    match host.parse::<IpAddr>() {
        Ok(ip) => Some(canonical(ip)),
        Err(_) => match host_spelling(host) {
            Ipv4Spelling::Means(v4) => Some(IpAddr::V4(v4)),
            Ipv4Spelling::Fine | Ipv4Spelling::Invalid => None,
        },
    }
}

/// Whether `host` names this machine by loopback: `localhost`, a name under
/// `.localhost`, the loopback names of `/etc/hosts`, `127.0.0.0/8`, `::1`, or
/// an unspecified address (`0.0.0.0` and `::` connect to the local host), in
/// any spelling a resolver reads.
fn is_local_host(host: &str) -> bool {
    let name = host.trim_end_matches('.').to_ascii_lowercase();
    if name == "localhost"
        || name.ends_with(".localhost")
        || LOOPBACK_NAMES.contains(&name.as_str())
    {
        return true;
    }
    match literal_ip(host) {
        Some(ip) => ip.is_loopback() || ip.is_unspecified(),
        None => false,
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
    let own = literal_ip(host).is_some_and(|ip| ip == listen);
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

    /// Review of issue 12, item 3: IPv4 literals in the forms resolvers read
    /// (`inet_aton`) and the loopback names of `/etc/hosts` bypassed the check.
    #[test]
    fn review_replica_loop_bypasses() {
        let gw: IpAddr = "127.0.0.1".parse().unwrap();
        for url in [
            "http://127.1:18000",
            "http://127.0.1:18000",
            "http://2130706433:18000",
            "http://0x7f000001:18000",
            "http://0X7F.1:18000",
            "http://0177.0.0.1:18000",
            "http://127.0.0.1.:18000",
            "http://ip6-localhost:18000",
            "http://ip6-loopback:18000",
            "http://localhost.localdomain:18000",
            "http://localhost6:18000",
            "http://[::ffff:127.0.0.1]:18000",
            "http://[::ffff:7f00:1]:18000",
            "http://[0:0:0:0:0:0:0:1]:18000",
            "http://0:18000",
            "http://0.0.0.0:18000",
        ] {
            assert!(points_at_gateway(url, gw, 18000), "{url}");
            assert!(!points_at_gateway(url, gw, 18001), "{url} other port");
        }
        let means = |ip: [u8; 4]| Ipv4Spelling::Means(Ipv4Addr::from(ip));
        for (url, spelling) in [
            ("http://127.1:1", means([127, 0, 0, 1])),
            ("http://2130706433:1", means([127, 0, 0, 1])),
            ("http://0x7f000001:1", means([127, 0, 0, 1])),
            ("http://0177.0.0.1:1", means([127, 0, 0, 1])),
            ("http://010.0.0.012:1", means([8, 0, 0, 10])),
            ("http://10.0.0.012:1", means([10, 0, 0, 10])),
            ("http://0:1", means([0, 0, 0, 0])),
            ("http://10.0.0.12.:1", means([10, 0, 0, 12])),
            ("http://1.2.3.4.5:1", Ipv4Spelling::Invalid),
            ("http://256.0.0.1:1", Ipv4Spelling::Invalid),
            ("http://09.0.0.1:1", Ipv4Spelling::Invalid),
            ("http://1.256.65536:1", Ipv4Spelling::Invalid),
            ("http://4294967296:1", Ipv4Spelling::Invalid),
            ("http://10.0.0.12:1", Ipv4Spelling::Fine),
            ("http://0.0.0.0:1", Ipv4Spelling::Fine),
            ("http://gpu2.lan:1", Ipv4Spelling::Fine),
            ("http://cafe.be:1", Ipv4Spelling::Fine),
            ("http://1.2.3.example:1", Ipv4Spelling::Fine),
            ("http://[::ffff:127.0.0.1]:1", Ipv4Spelling::Fine),
            ("http://[::1]:1", Ipv4Spelling::Fine),
        ] {
            assert_eq!(ipv4_spelling(url), spelling, "{url}");
        }
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

        /// Every spelling a resolver reads of a loopback address (decimal,
        /// hexadecimal, octal, short forms) loops, and is not a dotted quad.
        #[test]
        fn review_any_spelling_of_loopback_loops(
            b in any::<[u8; 3]>(),
            form in 0usize..6,
            port in 1u16..,
        ) {
            let ip = Ipv4Addr::new(127, b[0], b[1], b[2]);
            let n = u32::from(ip);
            let host = match form {
                0 => n.to_string(),
                1 => format!("{n:#x}"),
                2 => format!("0{n:o}"),
                3 => format!("127.{}", n & 0xff_ffff),
                4 => format!("127.{}.{}", b[0], n & 0xffff),
                _ => format!("0177.{:#x}.0{:o}.{}", b[0], b[1], b[2]),
            };
            let url = format!("http://{host}:{port}");
            prop_assert!(points_at_gateway(&url, LO, port), "{}", url);
            prop_assert_eq!(ipv4_spelling(&url), Ipv4Spelling::Means(ip));
        }

        /// A canonical dotted quad is always fine, and read as itself.
        #[test]
        fn review_dotted_quads_are_fine(a in any::<[u8; 4]>()) {
            let ip = Ipv4Addr::from(a);
            let url = format!("http://{ip}:8000");
            prop_assert_eq!(ipv4_spelling(&url), Ipv4Spelling::Fine);
            prop_assert_eq!(points_at_gateway(&url, LO, 8000), ip.is_loopback() || ip.is_unspecified());
        }
    }
}
