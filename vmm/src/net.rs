//! A VM's network: what `--net tap=NAME[,mac=MAC][,ip=A.B.C.D/N][,gw=A.B.C.D][,dns=A.B.C.D]`
//! and `net = "…"` in a config file (the same string) say.
//!
//! The VM gets one virtio-net device attached to the existing host TAP `NAME` (see
//! `kiln net setup`). With `ip=`, the guest agent configures `eth0` from `kiln.ip=` (and
//! `kiln.gw=`, `kiln.dns=`) on the kernel command line; without it the guest's network is
//! left to the guest.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::os::fd::{FromRawFd, RawFd};
use std::sync::{Mutex, OnceLock};

use kiln_agent::netif::{parse_cidr, GuestNet};
use kiln_devices::virtio::net::{MacAddr, Net, NetError, Tap};
use serde::{Deserialize, Serialize};

/// The VM's network device. In a config file it is the same string as on the command
/// line: `net = "tap=kiln0,ip=10.0.0.2/24,gw=10.0.0.1"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NetConfig {
    /// The host TAP device (must exist).
    pub tap: String,
    /// The guest's MAC address; default: a random locally administered one.
    pub mac: Option<MacAddr>,
    /// The guest's address and prefix length, set by the agent.
    pub ip: Option<(Ipv4Addr, u8)>,
    /// The guest's default gateway (needs `ip`).
    pub gw: Option<Ipv4Addr>,
    /// A DNS server for the guest's /etc/resolv.conf (needs `ip`).
    pub dns: Option<Ipv4Addr>,
}

impl TryFrom<String> for NetConfig {
    type Error = NetArgError;
    fn try_from(s: String) -> Result<Self, NetArgError> {
        s.parse()
    }
}

impl From<NetConfig> for String {
    fn from(n: NetConfig) -> String {
        n.to_string()
    }
}

impl std::fmt::Display for NetConfig {
    /// The `--net` form, which [`str::parse`] reads back.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "tap={}", self.tap)?;
        if let Some(mac) = self.mac {
            write!(f, ",mac={mac}")?;
        }
        if let Some((addr, prefix)) = self.ip {
            write!(f, ",ip={addr}/{prefix}")?;
        }
        if let Some(gw) = self.gw {
            write!(f, ",gw={gw}")?;
        }
        if let Some(dns) = self.dns {
            write!(f, ",dns={dns}")?;
        }
        Ok(())
    }
}

const FORMAT: &str = "tap=NAME[,mac=MAC][,ip=A.B.C.D/N][,gw=A.B.C.D][,dns=A.B.C.D]";

/// Why a `--net` value (or a config file's `net`) is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetArgError {
    #[error("--net {spec:?}: {name:?} is not an interface name (1 to 15 bytes)")]
    TapName { spec: String, name: String },
    #[error("--net: {0}")]
    Mac(#[from] kiln_devices::virtio::net::MacParseError),
    #[error("--net: {0}")]
    Ip(String),
    #[error("--net {spec:?}: {what} {value:?} is not an IPv4 address")]
    Address {
        spec: String,
        what: &'static str,
        value: String,
    },
    #[error("--net {spec:?}: unknown option {option:?}; expected {FORMAT}")]
    UnknownOption { spec: String, option: String },
    #[error("--net {0:?}: no tap=NAME; expected {FORMAT}")]
    NoTap(String),
    #[error("--net {0:?}: gw= and dns= need ip=")]
    NeedsIp(String),
}

impl std::str::FromStr for NetConfig {
    type Err = NetArgError;

    fn from_str(s: &str) -> Result<Self, NetArgError> {
        let mut net = NetConfig {
            tap: String::new(),
            mac: None,
            ip: None,
            gw: None,
            dns: None,
        };
        for opt in s.split(',') {
            let addr = |v: &str, what: &'static str| {
                v.parse::<Ipv4Addr>().map_err(|_| NetArgError::Address {
                    spec: s.into(),
                    what,
                    value: v.into(),
                })
            };
            match opt.split_once('=') {
                Some(("tap", v)) if kiln_agent::netif::valid_name(v) => net.tap = v.into(),
                Some(("tap", v)) => {
                    return Err(NetArgError::TapName {
                        spec: s.into(),
                        name: v.into(),
                    })
                }
                Some(("mac", v)) => net.mac = Some(v.parse()?),
                Some(("ip", v)) => net.ip = Some(parse_cidr(v).map_err(NetArgError::Ip)?),
                Some(("gw", v)) => net.gw = Some(addr(v, "gw")?),
                Some(("dns", v)) => net.dns = Some(addr(v, "dns")?),
                _ => {
                    return Err(NetArgError::UnknownOption {
                        spec: s.into(),
                        option: opt.into(),
                    })
                }
            }
        }
        if net.tap.is_empty() {
            return Err(NetArgError::NoTap(s.into()));
        }
        if net.ip.is_none() && (net.gw.is_some() || net.dns.is_some()) {
            return Err(NetArgError::NeedsIp(s.into()));
        }
        Ok(net)
    }
}

impl NetConfig {
    /// The `kiln.*` kernel command-line words the agent reads, if an address is given.
    pub fn cmdline(&self) -> Option<String> {
        let (addr, prefix) = self.ip?;
        Some(
            GuestNet {
                addr,
                prefix,
                gw: self.gw,
                dns: self.dns,
            }
            .cmdline(),
        )
    }

    /// This config with a MAC: the given one, else a new random one (a restored clone's,
    /// which the host must know to tell the guest).
    pub fn with_fresh_mac(mut self) -> Self {
        self.mac.get_or_insert_with(MacAddr::random);
        self
    }

    /// The device: attached to the TAP, with the given or a fresh random MAC.
    pub fn device(&self) -> Result<Net, NetError> {
        let tap = open_tap(&self.tap)?;
        Net::new(tap, self.mac.unwrap_or_else(MacAddr::random))
    }
}

/// How `kiln jail --tap NAME` hands the VMM a TAP it attached in the host's network
/// namespace (the jail's own namespace has no such device, and the VMM no right to make
/// one): `NAME=FD[,NAME=FD]…`, each FD open across the `execve`.
pub const INHERITED_TAPS_ENV: &str = "KILN_TAP_FDS";

/// Attaches to the TAP `name`: the one the jailer handed over under that name, else the
/// host's device of that name.
pub fn open_tap(name: &str) -> Result<Tap, NetError> {
    match take_inherited(name) {
        Some(file) => Ok(Tap::from_attached(file, name)?),
        None => Ok(Tap::open(name)?),
    }
}

/// The fd handed over for `name`, at most once (after that the device owns it).
fn take_inherited(name: &str) -> Option<std::fs::File> {
    static INHERITED: OnceLock<Mutex<HashMap<String, RawFd>>> = OnceLock::new();
    let inherited = INHERITED.get_or_init(|| {
        let list = std::env::var(INHERITED_TAPS_ENV).unwrap_or_default();
        Mutex::new(parse_inherited(&list))
    });
    let fd = inherited.lock().ok()?.remove(name)?;
    // SAFETY: fcntl(F_GETFD) takes no pointers; it only asks whether the fd is open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        tracing::warn!("{INHERITED_TAPS_ENV} names fd {fd} for TAP {name}, but it is not open");
        return None;
    }
    // SAFETY: the jailer opened this fd for this process and named it in the environment;
    // it has just been taken out of the table, so this File is its only owner.
    Some(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// `NAME=FD,…` as a table; malformed entries are skipped (and logged).
fn parse_inherited(list: &str) -> HashMap<String, RawFd> {
    list.split(',')
        .filter(|entry| !entry.is_empty())
        .filter_map(|entry| {
            let parsed = entry
                .split_once('=')
                .and_then(|(name, fd)| Some((name.to_string(), fd.parse::<RawFd>().ok()?)))
                .filter(|&(_, fd)| fd > 2);
            if parsed.is_none() {
                tracing::warn!("{INHERITED_TAPS_ENV}: ignoring {entry:?} (want NAME=FD, FD > 2)");
            }
            parsed
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inherited_taps_parse() {
        let t = parse_inherited("kt0=3,kt1=17,bad,x=1,y=z,");
        assert_eq!(t.len(), 2);
        assert_eq!(t["kt0"], 3);
        assert_eq!(t["kt1"], 17);
        assert!(parse_inherited("").is_empty());
    }

    #[test]
    fn parses_and_refuses() {
        let n: NetConfig = "tap=kiln0,mac=02:00:00:00:00:05,ip=10.0.0.2/24,gw=10.0.0.1"
            .parse()
            .unwrap();
        assert_eq!(n.tap, "kiln0");
        assert_eq!(n.mac, Some(MacAddr([2, 0, 0, 0, 0, 5])));
        assert_eq!(n.cmdline().unwrap(), "kiln.ip=10.0.0.2/24 kiln.gw=10.0.0.1");
        assert_eq!(n.to_string().parse::<NetConfig>().unwrap(), n);
        let plain: NetConfig = "tap=t".parse().unwrap();
        assert_eq!(plain.cmdline(), None);
        let c: crate::config::VmConfig =
            toml::from_str("kernel = \"k\"\nnet = \"tap=kiln0,ip=10.0.0.2/24\"\n").unwrap();
        assert_eq!(c.net.map(|n| n.ip), Some(Some(([10, 0, 0, 2].into(), 24))));
        let bad = toml::from_str::<crate::config::VmConfig>("kernel = \"k\"\nnet = \"tap=\"\n");
        assert!(bad
            .unwrap_err()
            .to_string()
            .contains("not an interface name"));
        for bad in [
            "",
            "kiln0",
            "tap=a/b",
            "tap=t,ip=10.0.0.2",
            "tap=t,gw=10.0.0.1",
            "tap=t,mac=01:00:00:00:00:00",
            "tap=t,speed=10",
        ] {
            assert!(bad.parse::<NetConfig>().is_err(), "{bad:?}");
        }
    }
}
