//! Ethernet MAC addresses: parsing, printing, and the random default each VM gets.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A 48-bit MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A random unicast, locally administered address (first octet `x2`, `x6`, `xa`, `xe`),
    /// so that it never collides with a vendor's address and clones each get their own.
    pub fn random() -> Self {
        let mut b = [0u8; 6];
        if crate::entropy::fill_random(&mut b).is_err() {
            // No entropy source: the clock and pid still tell VMs on one host apart.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
                ^ u128::from(std::process::id()) << 64;
            b.copy_from_slice(&t.to_le_bytes()[..6]);
        }
        b[0] = (b[0] & 0xfc) | 0x02;
        MacAddr(b)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// Why a string is not a MAC address a NIC can have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MacParseError {
    /// Not six hex octets.
    #[error("{0:?} is not a MAC address like 02:00:00:00:00:01")]
    Malformed(String),
    /// The group bit is set.
    #[error("{0:?} is a multicast MAC address; give a unicast one")]
    Multicast(String),
}

impl FromStr for MacAddr {
    type Err = MacParseError;

    /// `aa:bb:cc:dd:ee:ff` (hex, `:` or `-` between octets); a multicast address is refused
    /// (a NIC cannot have one).
    fn from_str(s: &str) -> Result<Self, MacParseError> {
        let b =
            kiln_agent::netif::parse_mac(s).ok_or_else(|| MacParseError::Malformed(s.into()))?;
        if b[0] & 1 != 0 {
            return Err(MacParseError::Multicast(s.into()));
        }
        Ok(MacAddr(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_print_and_random() {
        let m: MacAddr = "02:ab:CD:00:10:ff".parse().unwrap();
        assert_eq!(m.0, [2, 0xab, 0xcd, 0, 0x10, 0xff]);
        assert_eq!(m.to_string(), "02:ab:cd:00:10:ff");
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:0g",
            "01:00:00:00:00:00",
            "2:0:0:0:0:0",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad:?}");
        }
        let (a, b) = (MacAddr::random(), MacAddr::random());
        assert_ne!(a, b);
        assert_eq!(a.0[0] & 3, 2, "unicast, locally administered: {a}");
    }
}
