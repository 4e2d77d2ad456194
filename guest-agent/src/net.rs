//! The guest's network, as the kernel command line asks (`kiln.ip=`, `kiln.gw=`,
//! `kiln.dns=`; see `kiln_agent::netif`): `lo` and `eth0` up with the address, the default
//! route, and /etc/resolv.conf only when a DNS server is given.

use kiln_agent::netif::{self, GuestNet};

/// The interface of kiln's one virtio-net device.
const IFACE: &str = "eth0";

/// Configure the network if the command line asks for it. Failures are reported; the
/// agent goes on (a job that needs no network still runs).
pub fn setup() {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let Some(net) = GuestNet::from_cmdline(&cmdline) else {
        return;
    };
    if let Err(e) = netif::set_up("lo") {
        say!("bringing up lo: {e}");
    }
    if let Err(e) = netif::configure(IFACE, net.addr, net.prefix) {
        say!("configuring {IFACE} as {}/{}: {e}", net.addr, net.prefix);
        return;
    }
    if let Some(gw) = net.gw {
        if let Err(e) = netif::add_default_route(gw) {
            say!("adding the default route via {gw}: {e}");
        }
    }
    if let Some(dns) = net.dns {
        let _ = std::fs::create_dir_all("/etc");
        if let Err(e) = std::fs::write("/etc/resolv.conf", format!("nameserver {dns}\n")) {
            say!("writing /etc/resolv.conf: {e}");
        }
    }
}
