//! A volume's NBD allow-list: the client addresses that may attach it, as networks
//! (`10.0.0.0/24`, `fd00::/64`) or single addresses (`10.0.0.7`).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use anyhow::{anyhow, bail, Result};

/// One network of an allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllowNet {
    addr: IpAddr,
    prefix: u8,
}

impl AllowNet {
    /// Whether `ip` is in the network (an IPv4 client seen as `::ffff:a.b.c.d` is taken as
    /// the IPv4 address it is).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => prefix_eq(&net.octets(), &ip.octets(), self.prefix),
            (IpAddr::V6(net), IpAddr::V6(ip)) => prefix_eq(&net.octets(), &ip.octets(), self.prefix),
            _ => false,
        }
    }
}

/// Whether the first `bits` bits of `a` and `b` are equal.
fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let (whole, rest) = (usize::from(bits / 8), bits % 8);
    if a[..whole] != b[..whole] {
        return false;
    }
    rest == 0 || (a[whole] ^ b[whole]) >> (8 - rest) == 0
}

impl FromStr for AllowNet {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| anyhow!("allow {s:?}: not an address or ADDRESS/PREFIX"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => {
                p.parse::<u8>().ok().filter(|&p| p <= max).ok_or_else(|| anyhow!("allow {s:?}: prefix 0 to {max}"))?
            }
        };
        Ok(AllowNet { addr, prefix })
    }
}

impl fmt::Display for AllowNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Parses an allow-list; empty admits everyone. At most [`ALLOW_MAX`] entries.
pub fn parse(list: &[String]) -> Result<Vec<AllowNet>> {
    if list.len() > ALLOW_MAX {
        bail!("an allow-list takes at most {ALLOW_MAX} networks, got {}", list.len());
    }
    list.iter().map(|s| s.parse()).collect()
}

/// Networks one allow-list holds at most.
pub const ALLOW_MAX: usize = 64;

/// Whether `list` admits `ip`: an empty list admits everyone.
pub fn admits(list: &[AllowNet], ip: IpAddr) -> bool {
    list.is_empty() || list.iter().any(|n| n.contains(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn networks_addresses_and_mapped_ipv4() {
        let list =
            parse(&["10.1.0.0/16".into(), "192.168.7.9".into(), "fd00::/8".into(), "10.2.3.128/25".into()]).unwrap();
        for yes in ["10.1.255.3", "192.168.7.9", "fd12::1", "::ffff:10.1.0.1", "10.2.3.200"] {
            assert!(admits(&list, ip(yes)), "{yes}");
        }
        for no in ["10.2.0.1", "192.168.7.8", "fe80::1", "127.0.0.1", "10.2.3.127"] {
            assert!(!admits(&list, ip(no)), "{no}");
        }
        assert!(admits(&[], ip("203.0.113.5")), "an empty list admits everyone");
        assert!(admits(&parse(&["0.0.0.0/0".into()]).unwrap(), ip("203.0.113.5")));
        assert_eq!(list[0].to_string(), "10.1.0.0/16");
    }

    #[test]
    fn malformed_entries_are_refused() {
        for bad in ["10.0.0.0/33", "host", "10.0.0.0/", "::/129", "1.2.3.4/-1", ""] {
            assert!(parse(&[bad.to_string()]).is_err(), "{bad}");
        }
        assert!(parse(&vec!["10.0.0.1".to_string(); ALLOW_MAX + 1]).is_err());
    }
}
