//! The guest's network: `lo` always up (the kernel gives it 127.0.0.1/8 and ::1 as it
//! comes up), and as the kernel command line asks (`kiln.ip=`, `kiln.gw=`, `kiln.dns=`;
//! see `kiln_agent::netif`): `eth0` up with the address, the default route, and
//! /etc/resolv.conf only when a DNS server is given.

use kiln_agent::netif::{self, GuestNet};

/// The interface of kiln's one virtio-net device.
const IFACE: &str = "eth0";

/// Run as `/proc/1/exe net-refresh MAC` by the host after a restore: the clone's device has
/// a new MAC, so eth0 takes it, going down and up (if it was up) so that no neighbour entry
/// of the original's network survives; then the address and routes from the command line
/// are set again. Returns the exit code.
pub fn refresh(mac: Option<&std::ffi::OsStr>) -> i32 {
    let Some(mac) = mac.and_then(|m| netif::parse_mac(&m.to_string_lossy())) else {
        say!("net-refresh: give the new MAC address, like 02:00:00:00:00:01");
        return 2;
    };
    let steps = netif::is_up(IFACE).and_then(|was_up| {
        netif::set_down(IFACE)?;
        netif::set_mac(IFACE, mac)?;
        // Without kiln.ip the guest configured eth0 itself: leave it as it was.
        if was_up {
            netif::set_up(IFACE)?;
        }
        Ok(())
    });
    if let Err(e) = steps {
        say!("net-refresh: {IFACE}: {e}");
        return 1;
    }
    if setup() {
        0
    } else {
        1
    }
}

/// Configure the network if the command line asks for it. Failures are reported; the
/// agent goes on (a job that needs no network still runs).
/// Returns false if a step failed.
pub fn setup() -> bool {
    // Every CI machine has a loopback, network device or not: local servers and their
    // tests (PostgreSQL, a test suite's HTTP server) listen on 127.0.0.1 or ::1.
    if let Err(e) = netif::set_up("lo") {
        say!("bringing up lo: {e}");
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let Some(net) = GuestNet::from_cmdline(&cmdline) else {
        return true;
    };
    if let Err(e) = netif::configure(IFACE, net.addr, net.prefix) {
        say!("configuring {IFACE} as {}/{}: {e}", net.addr, net.prefix);
        return false;
    }
    let mut ok = true;
    if let Some(gw) = net.gw {
        if let Err(e) = netif::add_default_route(gw) {
            say!("adding the default route via {gw}: {e}");
            ok = false;
        }
    }
    if let Some(dns) = net.dns {
        let _ = std::fs::create_dir_all("/etc");
        if let Err(e) = std::fs::write("/etc/resolv.conf", format!("nameserver {dns}\n")) {
            say!("writing /etc/resolv.conf: {e}");
            ok = false;
        }
    }
    ok
}
