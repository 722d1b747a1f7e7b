//! A volume's NBD allow-list: the clients that may attach it, by address, as networks
//! (`10.0.0.0/24`, `fd00::/64`) or single addresses (`10.0.0.7`), or by the name their
//! verified client certificate holds (`cert:backup-host`: NBD over TLS with
//! `--nbd-client-ca`).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use anyhow::{anyhow, bail, Result};
use nvmirror_dataplane::frontend::ClientId;

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
        let addr: IpAddr =
            addr.parse().map_err(|_| anyhow!("allow {s:?}: not an address, ADDRESS/PREFIX or cert:NAME"))?;
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

/// One entry of an allow-list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allow {
    /// Clients whose address is in the network.
    Net(AllowNet),
    /// Clients whose verified certificate holds this name (a subject alternative DNS name
    /// or the common name; compared without regard to ASCII case).
    Cert(String),
}

/// The prefix of a certificate name entry.
pub const CERT_PREFIX: &str = "cert:";
/// The longest certificate name an entry may hold (a DNS name's limit).
const CERT_NAME_BYTES_MAX: usize = 253;

impl FromStr for Allow {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let Some(name) = s.strip_prefix(CERT_PREFIX) else {
            return s.parse().map(Allow::Net);
        };
        if name.is_empty() || name.len() > CERT_NAME_BYTES_MAX || name.chars().any(char::is_control) {
            bail!("allow {s:?}: a certificate name is 1 to {CERT_NAME_BYTES_MAX} bytes, no control characters");
        }
        Ok(Allow::Cert(name.to_string()))
    }
}

impl Allow {
    fn admits(&self, client: &ClientId) -> bool {
        match self {
            Allow::Net(n) => n.contains(client.addr),
            Allow::Cert(name) => client.cert_names.iter().any(|c| c.eq_ignore_ascii_case(name)),
        }
    }
}

/// Parses an allow-list; empty admits everyone. At most [`ALLOW_MAX`] entries.
pub fn parse(list: &[String]) -> Result<Vec<Allow>> {
    if list.len() > ALLOW_MAX {
        bail!("an allow-list takes at most {ALLOW_MAX} entries, got {}", list.len());
    }
    list.iter().map(|s| s.parse()).collect()
}

/// Entries one allow-list holds at most.
pub const ALLOW_MAX: usize = 64;

/// Whether `list` admits `client`: an empty list admits everyone.
pub fn admits(list: &[Allow], client: &ClientId) -> bool {
    list.is_empty() || list.iter().any(|a| a.admits(client))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> ClientId {
        ClientId::at(s.parse().unwrap())
    }

    #[test]
    fn networks_addresses_and_mapped_ipv4() {
        let list =
            parse(&["10.1.0.0/16".into(), "192.168.7.9".into(), "fd00::/8".into(), "10.2.3.128/25".into()]).unwrap();
        for yes in ["10.1.255.3", "192.168.7.9", "fd12::1", "::ffff:10.1.0.1", "10.2.3.200"] {
            assert!(admits(&list, &ip(yes)), "{yes}");
        }
        for no in ["10.2.0.1", "192.168.7.8", "fe80::1", "127.0.0.1", "10.2.3.127"] {
            assert!(!admits(&list, &ip(no)), "{no}");
        }
        assert!(admits(&[], &ip("203.0.113.5")), "an empty list admits everyone");
        assert!(admits(&parse(&["0.0.0.0/0".into()]).unwrap(), &ip("203.0.113.5")));
        assert_eq!(list[0], Allow::Net("10.1.0.0/16".parse().unwrap()));
    }

    #[test]
    fn certificate_names_admit_verified_clients_only() {
        let list = parse(&["cert:Backup.example".into(), "10.9.0.0/16".into()]).unwrap();
        let with = |addr: &str, names: &[&str]| ClientId {
            addr: addr.parse().unwrap(),
            cert_names: names.iter().map(|n| n.to_string()).collect(),
        };
        assert!(admits(&list, &with("203.0.113.5", &["backup.example"])), "name, any case, any address");
        assert!(admits(&list, &with("203.0.113.5", &["other", "BACKUP.EXAMPLE"])));
        assert!(!admits(&list, &with("203.0.113.5", &["backup.example.org"])), "whole names only");
        assert!(!admits(&list, &with("203.0.113.5", &[])), "no certificate, no name");
        assert!(admits(&list, &with("10.9.1.1", &[])), "the address still admits");
        assert!(!admits(&parse(&["cert:a".into()]).unwrap(), &ip("127.0.0.1")));
    }

    #[test]
    fn malformed_entries_are_refused() {
        for bad in ["10.0.0.0/33", "host", "10.0.0.0/", "::/129", "1.2.3.4/-1", "", "cert:", "cert:a\nb"] {
            assert!(parse(&[bad.to_string()]).is_err(), "{bad}");
        }
        assert!(parse(&vec!["10.0.0.1".to_string(); ALLOW_MAX + 1]).is_err());
        assert!(parse(&[format!("cert:{}", "a".repeat(254))]).is_err());
        let why = |bad: &str| format!("{:#}", parse(&[bad.to_string()]).expect_err(bad));
        assert!(why("10.0.0.0/40").contains("prefix 0 to 32"), "{}", why("10.0.0.0/40"));
        assert!(why("host").contains("cert:NAME"), "{}", why("host"));
    }
}
