//! The guest network policy of `kiln net setup --nat`, end to end on this machine's kernel,
//! in two network namespaces the test makes ("host" and "outside", joined by a veth pair;
//! no address outside them is ever used).
//!
//! The "guest" is the test itself, writing IPv4/UDP frames into the TAP as a VM's virtio-net
//! device would; UDP servers in both namespaces and a reader on a second TAP say which
//! datagrams arrived. The test-bed kernel has no netfilter, so this runs on the direct path.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_devices::virtio::net::{Tap, VNET_HDR_LEN};

const PORT: u16 = 7461;
/// The guest's address behind TAP A, and the host's on it.
const GUEST_A: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const HOST_A: &str = "10.77.0.1/24";
/// The second VM's TAP: its host address and the guest behind it.
const HOST_B: &str = "10.78.0.1/24";
const GUEST_B: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 2);
/// The veth pair: the host's end (one of "the host's other addresses") and the outside's
/// (a server beyond the NAT; 198.18.0.0/15 is not in a blocked range).
const HOST_VETH: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// On the outside's loopback: the metadata address, an internal network `--allow` lets
/// through, and one it does not.
const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
const ALLOWED: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 9);
const PRIVATE: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 9);

/// The namespaces and TAPs; torn down on drop.
struct Net {
    host: String,
    outside: String,
    taps: Vec<String>,
}

impl Net {
    fn ip(&self, ns: &str, args: &str) {
        sh("ip", &format!("-n {ns} {args}"));
    }

    fn kiln(&self, args: &str) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.host, env!("CARGO_BIN_EXE_kiln")])
            .args(args.split_whitespace())
            .output()
            .unwrap()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for tap in &self.taps {
            let _ = self.kiln(&format!("net teardown --tap {tap}"));
        }
        for ns in [&self.host, &self.outside] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn sh(tool: &str, args: &str) {
    let out = Command::new(tool)
        .args(args.split_whitespace())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{tool} {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs `f` on a thread that joined network namespace `ns`; what it opens stays there.
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
    std::thread::spawn(move || {
        // SAFETY: setns takes an fd this closure owns; it moves only this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap()
}

fn udp_server(ns: &str) -> UdpSocket {
    in_ns(ns, || {
        let s = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        s
    })
}

/// What a server received: (payload, sender) pairs, until `want` all arrived (or 5 s), then
/// what else comes within the read timeout.
fn received(s: &UdpSocket, want: &[&str]) -> Vec<(String, Ipv4Addr)> {
    let mut got: Vec<(String, Ipv4Addr)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 256];
    loop {
        let done = want.iter().all(|w| got.iter().any(|(p, _)| p == w));
        match s.recv_from(&mut buf) {
            Ok((n, std::net::SocketAddr::V4(from))) => {
                got.push((String::from_utf8_lossy(&buf[..n]).into(), *from.ip()))
            }
            Ok(_) => {}
            Err(_) if done || Instant::now() > deadline => return got,
            Err(_) => {}
        }
    }
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).unwrap()
}

/// A vnet header and an Ethernet frame from the guest to `dst_mac` carrying a UDP datagram
/// from `src` to `dst`:PORT whose payload is `dst` as text.
fn frame(dst_mac: [u8; 6], src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let payload = dst.to_string().into_bytes();
    let udp_len = 8 + payload.len();
    let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&u16::try_from(20 + udp_len).unwrap().to_be_bytes());
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x0a, 0x08, 0x00]);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&PORT.to_be_bytes());
    f.extend_from_slice(&u16::try_from(udp_len).unwrap().to_be_bytes());
    f.extend_from_slice(&[0, 0]); // no UDP checksum
    f.extend_from_slice(&payload);
    f
}

fn mac_of(ns: &str, dev: &str) -> [u8; 6] {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "cat"])
        .arg(format!("/sys/class/net/{dev}/address"))
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let mut mac = [0u8; 6];
    for (b, part) in mac.iter_mut().zip(text.trim().split(':')) {
        *b = u8::from_str_radix(part, 16).unwrap();
    }
    mac
}

#[test]
fn net_nat_guest_reaches_only_the_outside_and_its_own_host_address() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !have("ip") || !have("nft") {
        eprintln!("skipped: needs root, iproute2 and nftables (cargo xtask setup)");
        return;
    }
    let id = std::process::id() % 100_000;
    let net = Net {
        host: format!("kph{id}"),
        outside: format!("kpo{id}"),
        taps: vec![format!("kpa{id}"), format!("kpb{id}")],
    };
    let (h, o) = (net.host.as_str(), net.outside.as_str());
    let (tap_a, tap_b) = (net.taps[0].as_str(), net.taps[1].as_str());
    sh("ip", &format!("netns add {h}"));
    sh("ip", &format!("netns add {o}"));
    let (veth_h, veth_o) = (format!("kvh{id}"), format!("kvo{id}"));
    for (ns, args) in [
        (h, "link set lo up".to_string()),
        (o, "link set lo up".to_string()),
        (
            h,
            format!("link add {veth_h} type veth peer name {veth_o} netns {o}"),
        ),
        (h, format!("addr add {HOST_VETH}/24 dev {veth_h}")),
        (h, format!("link set {veth_h} up")),
        (o, format!("addr add {OUTSIDE}/24 dev {veth_o}")),
        (o, format!("link set {veth_o} up")),
        (o, format!("addr add {METADATA}/32 dev lo")),
        (o, format!("addr add {ALLOWED}/32 dev lo")),
        (o, format!("addr add {PRIVATE}/32 dev lo")),
        (o, format!("route add default via {HOST_VETH}")),
        (h, format!("route add {METADATA}/32 via {OUTSIDE}")),
        (h, format!("route add 10.9.0.0/16 via {OUTSIDE}")),
        (h, format!("route add 10.99.0.0/16 via {OUTSIDE}")),
    ] {
        net.ip(ns, &args);
    }
    // TAP A allows the internal network and even the other TAP's subnet: the guest-to-guest
    // rule must hold on its own.
    for args in [
        format!("net setup --tap {tap_a} --host-ip {HOST_A} --nat --allow 10.9.0.0/16 --allow 10.78.0.0/16"),
        format!("net setup --tap {tap_b} --host-ip {HOST_B} --nat"),
    ] {
        let out = net.kiln(&args);
        assert!(out.status.success(), "kiln {args}: {}", String::from_utf8_lossy(&out.stderr));
    }
    net.ip(
        h,
        &format!("neigh add {GUEST_B} lladdr 02:00:00:00:00:0b dev {tap_b} nud permanent"),
    );

    let host_server = udp_server(h);
    let outside_server = udp_server(o);
    let (a, b) = (tap_a.to_string(), tap_b.to_string());
    let mut guest_a = in_ns(h, move || Tap::open(&a).unwrap());
    let mut guest_b = in_ns(h, move || Tap::open(&b).unwrap());
    let mac_a = mac_of(h, tap_a);

    // What must not arrive first, then what must: once those are in, the others had their
    // chance on the same paths.
    let denied = [HOST_VETH, METADATA, PRIVATE, GUEST_B];
    let allowed = [OUTSIDE, ALLOWED, Ipv4Addr::new(10, 77, 0, 1)];
    for dst in denied.iter().chain(&allowed) {
        guest_a.write_frame(&frame(mac_a, GUEST_A, *dst)).unwrap();
    }
    let at_host = received(&host_server, &["10.77.0.1"]);
    let at_outside = received(
        &outside_server,
        &[&OUTSIDE.to_string(), &ALLOWED.to_string()],
    );
    let payloads = |got: &[(String, Ipv4Addr)]| -> Vec<String> {
        got.iter().map(|(p, _)| p.clone()).collect()
    };
    assert_eq!(
        payloads(&at_host),
        ["10.77.0.1"],
        "the host received {at_host:?}"
    );
    let mut outside = payloads(&at_outside);
    outside.sort();
    assert_eq!(
        outside,
        [ALLOWED.to_string(), OUTSIDE.to_string()],
        "{at_outside:?}"
    );
    assert!(
        at_outside.iter().all(|(_, from)| *from == HOST_VETH),
        "the outside saw the guest's own address, not the NAT's: {at_outside:?}"
    );
    // The second guest's TAP: no frame for GUEST_B (the kernel may send other traffic,
    // such as IPv6 router solicitations; IPv6 is off, so only IPv4 would show).
    let mut buf = [0u8; 2048];
    let mut to_b = Vec::new();
    while let Ok(n) = guest_b.read_frame(&mut buf) {
        let eth = &buf[VNET_HDR_LEN..n];
        if eth.len() >= 34 && eth[12..14] == [0x08, 0x00] && eth[30..34] == GUEST_B.octets() {
            to_b.push(n);
        }
    }
    assert!(
        to_b.is_empty(),
        "guest B received {} datagrams from guest A",
        to_b.len()
    );

    // Teardown removes every rule: the host's namespace has no kiln table left. (A TAP
    // with a VM attached cannot be deleted: the guests go first.)
    drop((guest_a, guest_b));
    for tap in &net.taps {
        let out = net.kiln(&format!("net teardown --tap {tap}"));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let rules = Command::new("ip")
        .args(["netns", "exec", h, "nft", "list", "ruleset"])
        .output()
        .unwrap();
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(!rules.contains("kiln_"), "left behind:\n{rules}");
}
