//! `kiln net setup` and `kiln net teardown`: the host side of a VM's network.
//!
//! Setup creates a persistent TAP, gives it the host's address and brings it up (ioctls, so
//! nothing but the kernel is needed), and with `--nat` turns on IPv4 forwarding and adds a
//! MASQUERADE rule for the TAP's subnet (nft, else iptables). What it did is recorded in
//! `/run/kiln/net/<tap>.json`, and teardown undoes exactly that.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context};
use kiln_agent::netif;
use kiln_devices::virtio::net::tap;
use serde::{Deserialize, Serialize};

use crate::cli::{NetCommand, NetSetupArgs};

const STATE_DIR: &str = "/run/kiln/net";
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// What setup changed beyond the TAP itself.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    /// The masquerading rule, if any: the tool that added it and the subnet.
    nat: Option<Nat>,
    /// ip_forward's value before setup turned it on.
    ip_forward_before: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Nat {
    tool: String,
    subnet: String,
}

pub fn net(cmd: &NetCommand) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("kiln net must run as root: it creates and configures network devices");
    }
    match cmd {
        NetCommand::Setup(args) => setup(args),
        NetCommand::Teardown { tap } => teardown(tap),
    }
}

fn record_path(name: &str) -> PathBuf {
    PathBuf::from(STATE_DIR).join(format!("{name}.json"))
}

fn setup(args: &NetSetupArgs) -> anyhow::Result<()> {
    let (addr, prefix) = netif::parse_cidr(&args.host_ip).map_err(anyhow::Error::msg)?;
    // Find the NAT tool before changing anything, so that a missing one leaves no TAP.
    let nat_tool = if args.nat { Some(nat_tool()?) } else { None };
    tap::create_persistent(&args.tap, args.owner)?;
    let result = (|| -> anyhow::Result<Record> {
        netif::configure(&args.tap, addr, prefix)
            .with_context(|| format!("cannot give {} the address {}", args.tap, args.host_ip))?;
        let mut record = Record {
            nat: None,
            ip_forward_before: None,
        };
        if let Some(tool) = nat_tool {
            record.ip_forward_before = Some(
                std::fs::read_to_string(IP_FORWARD)
                    .with_context(|| format!("cannot read {IP_FORWARD}"))?,
            );
            std::fs::write(IP_FORWARD, "1")
                .with_context(|| format!("cannot write {IP_FORWARD}"))?;
            let subnet = format!("{}/{prefix}", network(addr, prefix));
            nat_rule(&tool, &args.tap, &subnet, true)?;
            record.nat = Some(Nat { tool, subnet });
        }
        Ok(record)
    })();
    let record = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = tap::delete_persistent(&args.tap);
            return Err(e);
        }
    };
    std::fs::create_dir_all(STATE_DIR).with_context(|| format!("cannot create {STATE_DIR}"))?;
    std::fs::write(record_path(&args.tap), serde_json::to_vec(&record)?)
        .with_context(|| format!("cannot write {}", record_path(&args.tap).display()))?;
    eprintln!(
        "kiln: TAP {} is up with {}{}",
        args.tap,
        args.host_ip,
        if args.nat { ", NAT on" } else { "" }
    );
    Ok(())
}

fn teardown(name: &str) -> anyhow::Result<()> {
    let path = record_path(name);
    if let Ok(bytes) = std::fs::read(&path) {
        let record: Record = serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is corrupt", path.display()))?;
        if let Some(nat) = &record.nat {
            nat_rule(&nat.tool, name, &nat.subnet, false)?;
        }
        if let Some(before) = &record.ip_forward_before {
            std::fs::write(IP_FORWARD, before.trim())
                .with_context(|| format!("cannot restore {IP_FORWARD}"))?;
        }
    }
    tap::delete_persistent(name)?;
    let _ = std::fs::remove_file(&path);
    eprintln!("kiln: TAP {name} removed");
    Ok(())
}

fn network(addr: Ipv4Addr, prefix: u8) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(addr) & u32::from(netif::netmask(prefix)))
}

/// `nft` if the host has it, else `iptables`.
fn nat_tool() -> anyhow::Result<String> {
    for tool in ["nft", "iptables"] {
        let found = Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if found {
            return Ok(tool.into());
        }
    }
    bail!("--nat needs nft or iptables on this host (neither was found in PATH)")
}

/// Add (or delete) the MASQUERADE rule for traffic from `subnet` leaving through any
/// interface but the TAP. With nft the rule lives in its own table `kiln_<tap>`, so that
/// deleting the table removes exactly it.
fn nat_rule(tool: &str, tap: &str, subnet: &str, add: bool) -> anyhow::Result<()> {
    for args in nat_commands(tool, tap, subnet, add) {
        let out = Command::new(tool)
            .args(&args)
            .output()
            .with_context(|| format!("cannot run {tool}"))?;
        if !out.status.success() {
            bail!(
                "{tool} {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    Ok(())
}

/// The argument lists of [`nat_rule`]'s `tool` runs. `tap` is an interface name (no
/// whitespace) and `subnet` an address/prefix kiln formatted.
fn nat_commands(tool: &str, tap: &str, subnet: &str, add: bool) -> Vec<Vec<String>> {
    let table = format!("kiln_{tap}");
    let words =
        |line: String| -> Vec<String> { line.split_whitespace().map(String::from).collect() };
    match (tool, add) {
        ("nft", true) => vec![
            words(format!("add table ip {table}")),
            // One argument: nft parses the chain's spec itself.
            vec![
                "add".into(),
                "chain".into(),
                "ip".into(),
                table.clone(),
                "post".into(),
                "{ type nat hook postrouting priority 100 ; }".into(),
            ],
            words(format!(
                "add rule ip {table} post ip saddr {subnet} oifname != {tap} masquerade"
            )),
        ],
        ("nft", false) => vec![words(format!("delete table ip {table}"))],
        (_, add) => vec![words(format!(
            "-t nat {} POSTROUTING -s {subnet} ! -o {tap} -j MASQUERADE",
            if add { "-A" } else { "-D" }
        ))],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nat_commands_add_and_remove_the_same_rule() {
        let add = nat_commands("nft", "kiln0", "10.0.0.0/24", true);
        assert_eq!(add.len(), 3);
        assert_eq!(add[1][5], "{ type nat hook postrouting priority 100 ; }");
        assert_eq!(
            add[2].join(" "),
            "add rule ip kiln_kiln0 post ip saddr 10.0.0.0/24 oifname != kiln0 masquerade"
        );
        assert_eq!(
            nat_commands("nft", "kiln0", "10.0.0.0/24", false),
            [["delete", "table", "ip", "kiln_kiln0"]]
        );
        let rule = |add| nat_commands("iptables", "kiln0", "10.0.0.0/24", add)[0].join(" ");
        assert_eq!(
            rule(true),
            "-t nat -A POSTROUTING -s 10.0.0.0/24 ! -o kiln0 -j MASQUERADE"
        );
        assert_eq!(rule(false), rule(true).replace("-A", "-D"));
        assert_eq!(
            network(Ipv4Addr::new(10, 0, 0, 1), 24),
            Ipv4Addr::new(10, 0, 0, 0)
        );
        assert_eq!(
            network(Ipv4Addr::new(10, 1, 2, 3), 0),
            Ipv4Addr::UNSPECIFIED
        );
    }
}
