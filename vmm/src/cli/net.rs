//! `kiln net setup|teardown`: the host side of a VM network.

use clap::{Args, Subcommand};

#[derive(Subcommand, Debug)]
pub enum NetCommand {
    /// Create the persistent TAP NAME, give it the host's address and bring it up; with
    /// --nat also turn on IPv4 forwarding, masquerade the TAP's subnet and install the guest
    /// network policy (nft or iptables). VMs then attach with `--net tap=NAME,ip=<guest ip>/N,gw=<host ip>`.
    Setup(NetSetupArgs),
    /// Undo `kiln net setup`: the NAT and policy rules and forwarding setting it made, and
    /// the TAP.
    Teardown {
        /// The TAP to remove.
        #[arg(long, value_name = "NAME")]
        tap: String,
    },
}

#[derive(Args, Debug)]
pub struct NetSetupArgs {
    /// The TAP to create (must not exist).
    #[arg(long, value_name = "NAME")]
    pub tap: String,
    /// The host's address on it, with the prefix length (e.g. 10.0.0.1/24).
    #[arg(long, value_name = "A.B.C.D/N")]
    pub host_ip: String,
    /// Masquerade the TAP's subnet so that guests reach the networks beyond the host, and
    /// install the guest network policy: the guest may reach the host only at --host-ip,
    /// and nothing at link-local addresses (169.254.0.0/16, the cloud metadata service),
    /// other guests, or private ranges (10/8, 172.16/12, 192.168/16, 100.64/10) unless
    /// --allow lets it.
    #[arg(long)]
    pub nat: bool,
    /// With --nat: let the guest reach this network (A.B.C.D/N) although the policy would
    /// drop it, e.g. an internal package mirror. Repeatable.
    #[arg(long, value_name = "A.B.C.D/N", requires = "nat")]
    pub allow: Vec<String>,
    /// Only this user (and root) may attach VMs to the TAP (TUNSETOWNER); without it, any
    /// user who can open /dev/net/tun may.
    #[arg(long, value_name = "UID")]
    pub owner: Option<u32>,
}
