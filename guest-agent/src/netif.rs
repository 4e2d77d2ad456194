//! IPv4 set-up of a network interface with plain ioctls, shared by the agent (the guest's
//! `eth0`, from `kiln.ip=` on the kernel command line) and the host (`kiln net setup` on a
//! TAP). Ioctls rather than `ip` or netlink: nothing to install in the guest or in a busybox
//! test host, and a handful of calls.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// What the kernel command line asks of the guest's network: `kiln.ip=A.B.C.D/N`, and
/// optionally `kiln.gw=A.B.C.D` and `kiln.dns=A.B.C.D`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestNet {
    /// The guest's address.
    pub addr: Ipv4Addr,
    /// Its prefix length.
    pub prefix: u8,
    /// The default gateway.
    pub gw: Option<Ipv4Addr>,
    /// A DNS server for /etc/resolv.conf.
    pub dns: Option<Ipv4Addr>,
}

impl GuestNet {
    /// The `kiln.*` words for the kernel command line.
    pub fn cmdline(&self) -> String {
        let mut s = format!("kiln.ip={}/{}", self.addr, self.prefix);
        if let Some(gw) = self.gw {
            s.push_str(&format!(" kiln.gw={gw}"));
        }
        if let Some(dns) = self.dns {
            s.push_str(&format!(" kiln.dns={dns}"));
        }
        s
    }

    /// What a kernel command line says, if it names an address (malformed words are
    /// ignored: the command line came from kiln, which checked them).
    pub fn from_cmdline(cmdline: &str) -> Option<Self> {
        let word = |key: &str| {
            cmdline
                .split_whitespace()
                .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        };
        let (addr, prefix) = parse_cidr(word("kiln.ip")?).ok()?;
        Some(GuestNet {
            addr,
            prefix,
            gw: word("kiln.gw").and_then(|g| g.parse().ok()),
            dns: word("kiln.dns").and_then(|d| d.parse().ok()),
        })
    }
}

/// `A.B.C.D/N` with N in 0..=32.
pub fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let bad = || format!("{s:?} is not an IPv4 address with a prefix length, like 10.0.0.2/24");
    let (a, n) = s.split_once('/').ok_or_else(bad)?;
    let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
    let prefix: u8 = n.parse().map_err(|_| bad())?;
    if prefix > 32 {
        return Err(bad());
    }
    Ok((addr, prefix))
}

/// The netmask of a prefix length (0..=32).
pub fn netmask(prefix: u8) -> Ipv4Addr {
    Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0))
}

/// An Ethernet address written `aa:bb:cc:dd:ee:ff` (or with `-`), two hex digits each.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split([':', '-']);
    for b in &mut mac {
        let p = parts.next().filter(|p| p.len() == 2)?;
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Whether `name` can be an interface name (1 to 15 bytes, no '/', ':', whitespace, NUL).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
}

/// An `ifreq` naming `name` (which must be [`valid_name`]), the rest zero.
pub fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    if !valid_name(name) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not an interface name"),
        ));
    }
    // SAFETY: ifreq is plain old data (a name array and a union of integers and arrays),
    // for which all zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = libc::c_char::from_ne_bytes([s]);
    }
    Ok(req)
}

fn sockaddr(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        // AF_INET is 2: it fits.
        sin_family: libc::sa_family_t::try_from(libc::AF_INET).unwrap_or(2),
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16-byte plain-old-data socket addresses;
    // the kernel reads this one as the AF_INET address it says it is.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket() takes no pointers; the descriptor it returns is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ioctl<T>(sock: &OwnedFd, request: libc::Ioctl, arg: &mut T, what: &str) -> io::Result<()> {
    // SAFETY: every request used here reads (and may write) one `T` through the pointer,
    // which is valid for the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), request, std::ptr::from_mut(arg)) } < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

/// Give interface `name` the address `addr/prefix` and bring it up.
pub fn configure(name: &str, addr: Ipv4Addr, prefix: u8) -> io::Result<()> {
    let sock = inet_socket()?;
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_addr = sockaddr(addr);
    ioctl(&sock, libc::SIOCSIFADDR, &mut req, "SIOCSIFADDR")?;
    req.ifr_ifru.ifru_netmask = sockaddr(netmask(prefix));
    ioctl(&sock, libc::SIOCSIFNETMASK, &mut req, "SIOCSIFNETMASK")?;
    set_up(name)
}

/// Bring interface `name` up.
pub fn set_up(name: &str) -> io::Result<()> {
    let sock = inet_socket()?;
    let mut req = ifreq(name)?;
    ioctl(&sock, libc::SIOCGIFFLAGS, &mut req, "SIOCGIFFLAGS")?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    // IFF_UP is 1: it fits.
    req.ifr_ifru.ifru_flags = flags | libc::c_short::try_from(libc::IFF_UP).unwrap_or(1);
    ioctl(&sock, libc::SIOCSIFFLAGS, &mut req, "SIOCSIFFLAGS")
}

/// Whether interface `name` is up.
pub fn is_up(name: &str) -> io::Result<bool> {
    let sock = inet_socket()?;
    let mut req = ifreq(name)?;
    ioctl(&sock, libc::SIOCGIFFLAGS, &mut req, "SIOCGIFFLAGS")?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    Ok(i32::from(flags) & libc::IFF_UP != 0)
}

/// Take interface `name` down (which also drops its neighbour entries and routes).
pub fn set_down(name: &str) -> io::Result<()> {
    let sock = inet_socket()?;
    let mut req = ifreq(name)?;
    ioctl(&sock, libc::SIOCGIFFLAGS, &mut req, "SIOCGIFFLAGS")?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags & !libc::c_short::try_from(libc::IFF_UP).unwrap_or(1);
    ioctl(&sock, libc::SIOCSIFFLAGS, &mut req, "SIOCSIFFLAGS")
}

/// Give interface `name` the Ethernet address `mac`.
pub fn set_mac(name: &str, mac: [u8; 6]) -> io::Result<()> {
    let sock = inet_socket()?;
    let mut req = ifreq(name)?;
    // SAFETY: sockaddr is plain old data; all zeros is a valid value.
    let mut hw: libc::sockaddr = unsafe { std::mem::zeroed() };
    hw.sa_family = libc::ARPHRD_ETHER;
    for (d, s) in hw.sa_data.iter_mut().zip(mac) {
        *d = libc::c_char::from_ne_bytes([s]);
    }
    req.ifr_ifru.ifru_hwaddr = hw;
    ioctl(&sock, libc::SIOCSIFHWADDR, &mut req, "SIOCSIFHWADDR")
}

/// glibc's `struct rtentry` (the libc crate has it only for musl and uclibc).
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_tos: libc::c_uchar,
    rt_class: libc::c_uchar,
    rt_pad4: [libc::c_short; 3],
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

/// Add a default route through `gw`.
pub fn add_default_route(gw: Ipv4Addr) -> io::Result<()> {
    let sock = inet_socket()?;
    let mut rt = RtEntry {
        rt_pad1: 0,
        rt_dst: sockaddr(Ipv4Addr::UNSPECIFIED),
        rt_gateway: sockaddr(gw),
        rt_genmask: sockaddr(Ipv4Addr::UNSPECIFIED),
        rt_flags: (libc::RTF_UP | libc::RTF_GATEWAY),
        rt_pad2: 0,
        rt_pad3: 0,
        rt_tos: 0,
        rt_class: 0,
        rt_pad4: [0; 3],
        rt_metric: 0,
        rt_dev: std::ptr::null_mut(),
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    };
    ioctl(&sock, libc::SIOCADDRT, &mut rt, "SIOCADDRT")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_round_trips() {
        let n = GuestNet {
            addr: Ipv4Addr::new(10, 0, 0, 2),
            prefix: 24,
            gw: Some(Ipv4Addr::new(10, 0, 0, 1)),
            dns: None,
        };
        let line = format!("console=ttyS0 {} quiet", n.cmdline());
        assert_eq!(GuestNet::from_cmdline(&line), Some(n));
        assert_eq!(GuestNet::from_cmdline("console=ttyS0 kiln.ipx=1"), None);
        assert!(parse_cidr("10.0.0.1/33").is_err());
        assert!(parse_cidr("10.0.0.1").is_err());
        assert!(!valid_name("a/b") && !valid_name("") && valid_name("kiln0"));
        assert_eq!(parse_mac("02:0a:FF:00:00:01"), Some([2, 10, 255, 0, 0, 1]));
        assert_eq!(parse_mac("02-0a-ff-00-00-01"), Some([2, 10, 255, 0, 0, 1]));
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:00:00",
            "2:0:0:0:0:0",
            "zz:00:00:00:00:00",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad:?}");
        }
    }
}
