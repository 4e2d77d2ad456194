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
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    Ipv4Addr::from(u32::from(addr) & mask)
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
    let table = format!("kiln_{tap}");
    let scripts: Vec<Vec<String>> = match (tool, add) {
        ("nft", true) => vec![
            vec!["add", "table", "ip", &table]
                .into_iter()
                .map(String::from)
                .collect(),
            [
                "add",
                "chain",
                "ip",
                &table,
                "post",
                "{ type nat hook postrouting priority 100 ; }",
            ]
            .map(String::from)
            .to_vec(),
            [
                "add",
                "rule",
                "ip",
                &table,
                "post",
                "ip",
                "saddr",
                subnet,
                "oifname",
                "!=",
                tap,
                "masquerade",
            ]
            .map(String::from)
            .to_vec(),
        ],
        ("nft", false) => vec![["delete", "table", "ip", &table].map(String::from).to_vec()],
        (_, add) => vec![[
            "-t",
            "nat",
            if add { "-A" } else { "-D" },
            "POSTROUTING",
            "-s",
            subnet,
            "!",
            "-o",
            tap,
            "-j",
            "MASQUERADE",
        ]
        .map(String::from)
        .to_vec()],
    };
    for args in scripts {
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
