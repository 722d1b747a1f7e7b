//! Sizes on the command line: a number with an optional K, M, G or T suffix (powers of
//! 1024; an optional trailing `B` or `iB` is accepted).

use anyhow::{anyhow, bail, Result};

pub fn parse(s: &str) -> Result<u64> {
    let t = s.trim();
    let t = t.strip_suffix("iB").or_else(|| t.strip_suffix('B')).unwrap_or(t);
    let (num, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        Some('T' | 't') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 =
        num.trim().parse().map_err(|_| anyhow!("bad size {s:?}: expected a number with an optional K/M/G/T suffix"))?;
    let v = n.checked_shl(shift).filter(|v| v >> shift == n).ok_or_else(|| anyhow!("size {s:?} is too large"))?;
    if v == 0 {
        bail!("size {s:?} is zero");
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn sizes() {
        assert_eq!(parse("4096").unwrap(), 4096);
        assert_eq!(parse("64M").unwrap(), 64 << 20);
        assert_eq!(parse("1G").unwrap(), 1 << 30);
        assert_eq!(parse("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse("16k").unwrap(), 16 << 10);
        assert!(parse("").is_err());
        assert!(parse("0").is_err());
        assert!(parse("12X").is_err());
        assert!(parse("99999999999T").is_err());
        assert!(parse("-1M").is_err());
    }
}
