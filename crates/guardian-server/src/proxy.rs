//! Trusted reverse proxies, and who the client is behind them.
//!
//! Behind a proxy or load balancer every connection comes from the proxy's
//! address, so limits kept per address would count all clients as one: ten
//! wrong admin tokens from anyone would lock every administrator out. For a
//! request whose connection comes from a trusted proxy, the client is the
//! right-most address of `X-Forwarded-For` that is not itself a trusted
//! proxy: each proxy appends the address it received the request from, and
//! entries further left are only what the client claimed. From any other
//! peer the header is ignored, so a client cannot choose the address it is
//! counted under.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use axum::http::HeaderMap;

/// An IP address or a network (`10.0.0.0/8`, `fd00::/8`, `127.0.0.1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

/// Why a text is not an [`IpNet`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an IP address or network (ADDR or ADDR/PREFIX)")]
pub struct IpNetError(String);

impl FromStr for IpNet {
    type Err = IpNetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || IpNetError(s.to_owned());
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr = addr.parse::<IpAddr>().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            // Digits only: `u8::from_str` would also take a sign.
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse::<u8>().ok().filter(|&p| p <= max).ok_or_else(bad)?
            }
            Some(_) => return Err(bad()),
        };
        // An IPv4-mapped network (`::ffff:10.0.0.0/104`) is the IPv4 one,
        // as the peers it is compared with are.
        match addr.to_canonical() {
            v4 @ IpAddr::V4(_) if addr.is_ipv6() && prefix >= 96 => Ok(Self {
                addr: v4,
                prefix: prefix - 96,
            }),
            _ => Ok(Self { addr, prefix }),
        }
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl IpNet {
    /// Whether `ip` lies in this network. An IPv4 address mapped into IPv6
    /// (a dual-stack listener's view of a peer) counts as the IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                same_prefix(&net.octets(), &ip.octets(), self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                same_prefix(&net.octets(), &ip.octets(), self.prefix)
            }
            _ => false,
        }
    }
}

/// Whether the first `bits` bits of `a` and `b` are equal.
fn same_prefix(a: &[u8], b: &[u8], bits: u8) -> bool {
    let whole = usize::from(bits / 8);
    if a[..whole] != b[..whole] {
        return false;
    }
    let rest = bits % 8;
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    (a[whole] & mask) == (b[whole] & mask)
}

/// The proxies whose `X-Forwarded-For` is believed.
#[derive(Debug, Clone, Default)]
pub(crate) struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    pub(crate) fn new(nets: Vec<IpNet>) -> Self {
        Self(nets)
    }

    /// Whether connections from `ip` come from a trusted proxy.
    pub(crate) fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|n| n.contains(ip))
    }

    /// The address a request from `peer` is counted under: `peer` itself,
    /// or behind trusted proxies the right-most forwarded address that is
    /// not one. A forwarded entry that is not an address ends the walk (the
    /// last address reached is the client): nothing left of it was written
    /// by a proxy that can be believed.
    pub(crate) fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let mut client = peer.to_canonical();
        if !self.trusts(client) {
            return client;
        }
        for line in headers.get_all("x-forwarded-for").iter().rev() {
            let Ok(line) = line.to_str() else {
                return client;
            };
            for entry in line.rsplit(',') {
                let Some(ip) = forwarded_ip(entry.trim()) else {
                    return client;
                };
                client = ip;
                if !self.trusts(ip) {
                    return client;
                }
            }
        }
        client
    }
}

/// An `X-Forwarded-For` entry: an address, or one with a port (some proxies
/// write `1.2.3.4:5678` or `[2001:db8::1]:443`).
fn forwarded_ip(entry: &str) -> Option<IpAddr> {
    entry
        .parse::<IpAddr>()
        .or_else(|_| entry.parse::<SocketAddr>().map(|a| a.ip()))
        .ok()
        .map(|ip| ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn networks_parse_and_contain_what_they_should() {
        assert!(net("10.0.0.0/8").contains(ip("10.255.1.2")));
        assert!(!net("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(net("192.168.1.0/25").contains(ip("192.168.1.127")));
        assert!(!net("192.168.1.0/25").contains(ip("192.168.1.128")));
        assert!(net("127.0.0.1").contains(ip("127.0.0.1")));
        assert!(!net("127.0.0.1").contains(ip("127.0.0.2")));
        assert!(net("0.0.0.0/0").contains(ip("8.8.8.8")));
        assert!(!net("0.0.0.0/0").contains(ip("::1")), "families never mix");
        assert!(net("fd00::/8").contains(ip("fd12::1")));
        assert!(net("::1").contains(ip("::1")));
        // A dual-stack listener sees IPv4 peers as mapped IPv6 addresses.
        assert!(net("127.0.0.1").contains(ip("::ffff:127.0.0.1")));
        assert!(net("::ffff:10.0.0.0/104").contains(ip("10.1.2.3")));
        assert_eq!(net("10.0.0.1").to_string(), "10.0.0.1/32");
        for bad in [
            "",
            "10.0.0.0/33",
            "::/129",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0.0/-1",
            "10.0.0",
            "host",
            "10.0.0.0/8/8",
            " 10.0.0.1",
            "1.2.3.4:80",
        ] {
            assert!(bad.parse::<IpNet>().is_err(), "{bad:?}");
        }
    }

    fn headers(lines: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for l in lines {
            h.append("x-forwarded-for", l.parse().unwrap());
        }
        h
    }

    #[test]
    fn the_client_is_the_right_most_untrusted_forwarded_address() {
        let proxies = TrustedProxies::new(vec![net("10.0.0.0/8"), net("127.0.0.1")]);
        let peer = ip("127.0.0.1");
        let client = |lines: &[&str]| proxies.client(peer, &headers(lines));
        assert_eq!(client(&["203.0.113.7"]), ip("203.0.113.7"));
        // What the client wrote itself, left of what the proxy appended, is
        // not believed.
        assert_eq!(client(&["1.1.1.1, 203.0.113.7"]), ip("203.0.113.7"));
        // Through two trusted proxies.
        assert_eq!(client(&["203.0.113.7, 10.1.1.1"]), ip("203.0.113.7"));
        // Several header lines are one list, in order.
        assert_eq!(
            client(&["1.1.1.1", "203.0.113.7, 10.1.1.1"]),
            ip("203.0.113.7")
        );
        assert_eq!(client(&["[2001:db8::1]:443"]), ip("2001:db8::1"));
        assert_eq!(client(&["203.0.113.7:5678"]), ip("203.0.113.7"));
        // No header, or one a proxy cannot have written: the nearest
        // trusted hop.
        assert_eq!(client(&[]), peer);
        assert_eq!(client(&["garbage"]), peer);
        assert_eq!(client(&["203.0.113.7, garbage, 10.1.1.1"]), ip("10.1.1.1"));
        assert_eq!(client(&["203.0.113.7,"]), peer);
        // Only trusted hops: the left-most of them.
        assert_eq!(client(&["10.2.2.2, 10.1.1.1"]), ip("10.2.2.2"));
        // From an untrusted peer the header counts for nothing.
        let stranger = ip("198.51.100.9");
        assert_eq!(
            proxies.client(stranger, &headers(&["203.0.113.7"])),
            stranger
        );
        // Without trusted proxies, nobody's header counts.
        let none = TrustedProxies::default();
        assert_eq!(none.client(peer, &headers(&["203.0.113.7"])), peer);
    }
}
