//! `kiln net setup` and `kiln net teardown`: the host side of a VM's network.
//!
//! Setup creates a persistent TAP, gives it the host's address and brings it up (ioctls, so
//! nothing but the kernel is needed), and with `--nat` turns on IPv4 forwarding, adds a
//! MASQUERADE rule for the TAP's subnet and installs the guest network policy (nft, else
//! iptables). What it did is recorded in `/run/kiln/net/<tap>.json`, and teardown undoes
//! exactly that.
//!
//! The policy: a CI job is untrusted code, and NAT alone would hand it every network the
//! host can reach. With `--nat` the guest may reach
//! - the host only at the TAP's own address (`--host-ip`); every other host address is
//!   dropped (input hook), and IPv6 is off on the TAP (no link-local way around that);
//! - nothing at link-local addresses ([`BLOCKED`]: 169.254.0.0/16, the cloud metadata
//!   service) or in the private ranges (10/8, 172.16/12, 192.168/16, 100.64/10), except the
//!   networks named with `--allow` (forward hook);
//! - no other guest: no new connection is forwarded *into* the TAP, whatever its source
//!   (each TAP's rules say so for their own TAP, so two guests cannot meet).
//!
//! With nft every rule lives in the TAP's own table `kiln_<tap>`, removed whole; with
//! iptables the rules are listed, and teardown deletes the same list.

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
    /// The guest network policy installed with the NAT rule (absent in records of older
    /// kiln versions, which installed none).
    #[serde(default)]
    policy: Option<Policy>,
}

/// Destinations a guest behind `--nat` may not reach unless `--allow` names them:
/// link-local (with the cloud metadata address 169.254.169.254), then the private ranges.
pub const BLOCKED: &[&str] = &[
    "169.254.0.0/16",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
];

/// What the policy rules of one TAP depend on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Policy {
    /// The TAP's host-side address: the one host address the guest may reach.
    host: Ipv4Addr,
    /// Networks (`A.B.C.D/N`, normalized) the guest may reach despite [`BLOCKED`].
    allow: Vec<String>,
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
    let allow = args
        .allow
        .iter()
        .map(|cidr| {
            let (a, p) = netif::parse_cidr(cidr).map_err(|e| anyhow::anyhow!("--allow: {e}"))?;
            Ok(format!("{}/{p}", network(a, p)))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    // Find the NAT tool before changing anything, so that a missing one leaves no TAP.
    let nat_tool = if args.nat { Some(nat_tool()?) } else { None };
    tap::create_persistent(&args.tap, args.owner)?;
    let result = (|| -> anyhow::Result<Record> {
        netif::configure(&args.tap, addr, prefix)
            .with_context(|| format!("cannot give {} the address {}", args.tap, args.host_ip))?;
        let mut record = Record {
            nat: None,
            ip_forward_before: None,
            policy: None,
        };
        if let Some(tool) = nat_tool {
            disable_ipv6(&args.tap)?;
            let subnet = format!("{}/{prefix}", network(addr, prefix));
            let policy = Policy { host: addr, allow };
            // The rules before forwarding: no moment in which the guest is routed unfiltered.
            if let Err(e) = nat_rule(&tool, &args.tap, &subnet, Some(&policy), true) {
                let _ = nat_rule(&tool, &args.tap, &subnet, Some(&policy), false);
                return Err(e);
            }
            let forward = std::fs::read_to_string(IP_FORWARD)
                .with_context(|| format!("cannot read {IP_FORWARD}"))
                .and_then(|before| {
                    std::fs::write(IP_FORWARD, "1")
                        .with_context(|| format!("cannot write {IP_FORWARD}"))?;
                    Ok(before)
                });
            match forward {
                Ok(before) => record.ip_forward_before = Some(before),
                Err(e) => {
                    let _ = nat_rule(&tool, &args.tap, &subnet, Some(&policy), false);
                    return Err(e);
                }
            }
            record.nat = Some(Nat { tool, subnet });
            record.policy = Some(policy);
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
        if args.nat {
            ", NAT and guest network policy on"
        } else {
            ""
        }
    );
    Ok(())
}

fn teardown(name: &str) -> anyhow::Result<()> {
    let path = record_path(name);
    if let Ok(bytes) = std::fs::read(&path) {
        let record: Record = serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is corrupt", path.display()))?;
        if let Some(nat) = &record.nat {
            nat_rule(&nat.tool, name, &nat.subnet, record.policy.as_ref(), false)?;
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

/// Turns IPv6 off on the TAP: the host would otherwise get a link-local IPv6 address on it,
/// which the guest could reach (with every host service listening on `::`) around the IPv4
/// policy.
fn disable_ipv6(tap: &str) -> anyhow::Result<()> {
    let knob = format!("/proc/sys/net/ipv6/conf/{tap}/disable_ipv6");
    match std::fs::write(&knob, "1") {
        Ok(()) => Ok(()),
        // A host without IPv6 has no such file: nothing to turn off.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot write {knob}")),
    }
}

/// Add (or delete) the MASQUERADE rule for traffic from `subnet` leaving through any
/// interface but the TAP, and the policy rules (module docs). Adding stops at the first
/// failure; deleting tries every rule and reports the first failure.
fn nat_rule(
    tool: &str,
    tap: &str,
    subnet: &str,
    policy: Option<&Policy>,
    add: bool,
) -> anyhow::Result<()> {
    let mut first_error = None;
    for args in nat_commands(tool, tap, subnet, policy, add) {
        let result = Command::new(tool)
            .args(&args)
            .output()
            .with_context(|| format!("cannot run {tool}"))
            .and_then(|out| {
                if out.status.success() {
                    return Ok(());
                }
                bail!(
                    "{tool} {} failed: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                )
            });
        if let Err(e) = result {
            if add {
                return Err(e);
            }
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// The argument lists of [`nat_rule`]'s `tool` runs. `tap` is an interface name (no
/// whitespace) and `subnet` an address/prefix kiln formatted. (nft chain names avoid nft's
/// keywords, such as `fwd` and `in`.)
fn nat_commands(
    tool: &str,
    tap: &str,
    subnet: &str,
    policy: Option<&Policy>,
    add: bool,
) -> Vec<Vec<String>> {
    let table = format!("kiln_{tap}");
    let words =
        |line: String| -> Vec<String> { line.split_whitespace().map(String::from).collect() };
    // nft parses a chain's spec itself: one argument.
    let chain = |name: &str, spec: &str| -> Vec<String> {
        let mut args = words(format!("add chain ip {table} {name}"));
        args.push(spec.into());
        args
    };
    match (tool, add) {
        ("nft", true) => {
            let mut cmds = vec![
                words(format!("add table ip {table}")),
                chain("post", "{ type nat hook postrouting priority 100 ; }"),
                words(format!(
                    "add rule ip {table} post ip saddr {subnet} oifname != {tap} masquerade"
                )),
            ];
            if let Some(p) = policy {
                cmds.push(chain(
                    "from_guest",
                    "{ type filter hook forward priority 0 ; }",
                ));
                cmds.push(words(format!(
                    "add rule ip {table} from_guest oifname {tap} ct state new drop"
                )));
                for net in &p.allow {
                    cmds.push(words(format!(
                        "add rule ip {table} from_guest iifname {tap} ip daddr {net} accept"
                    )));
                }
                for net in BLOCKED {
                    cmds.push(words(format!(
                        "add rule ip {table} from_guest iifname {tap} ip daddr {net} drop"
                    )));
                }
                cmds.push(chain("to_host", "{ type filter hook input priority 0 ; }"));
                cmds.push(words(format!(
                    "add rule ip {table} to_host iifname {tap} ip daddr != {} drop",
                    p.host
                )));
            }
            cmds
        }
        ("nft", false) => vec![words(format!("delete table ip {table}"))],
        (_, add) => {
            let (append, insert) = if add { ("-A", "-I") } else { ("-D", "-D") };
            let mut cmds = vec![words(format!(
                "-t nat {append} POSTROUTING -s {subnet} ! -o {tap} -j MASQUERADE"
            ))];
            if let Some(p) = policy {
                let hooks = [
                    format!("{insert} FORWARD -i {tap} -j {table}"),
                    format!("{insert} FORWARD -o {tap} -m conntrack --ctstate NEW -j DROP"),
                    format!("{insert} INPUT -i {tap} ! -d {} -j DROP", p.host),
                ];
                if add {
                    cmds.push(words(format!("-N {table}")));
                    for net in &p.allow {
                        cmds.push(words(format!("-A {table} -d {net} -j RETURN")));
                    }
                    for net in BLOCKED {
                        cmds.push(words(format!("-A {table} -d {net} -j DROP")));
                    }
                    cmds.extend(hooks.into_iter().map(words));
                } else {
                    cmds.extend(hooks.into_iter().rev().map(words));
                    cmds.push(words(format!("-F {table}")));
                    cmds.push(words(format!("-X {table}")));
                }
            }
            cmds
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nat_commands_add_and_remove_the_same_rule() {
        let add = nat_commands("nft", "kiln0", "10.0.0.0/24", None, true);
        assert_eq!(add.len(), 3);
        assert_eq!(add[1][5], "{ type nat hook postrouting priority 100 ; }");
        assert_eq!(
            add[2].join(" "),
            "add rule ip kiln_kiln0 post ip saddr 10.0.0.0/24 oifname != kiln0 masquerade"
        );
        assert_eq!(
            nat_commands("nft", "kiln0", "10.0.0.0/24", None, false),
            [["delete", "table", "ip", "kiln_kiln0"]]
        );
        let rule = |add| nat_commands("iptables", "kiln0", "10.0.0.0/24", None, add)[0].join(" ");
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
    #[test]
    fn policy_rules_drop_the_blocked_ranges_after_the_allowed_ones() {
        let policy = Policy {
            host: Ipv4Addr::new(10, 0, 0, 1),
            allow: vec!["10.9.0.0/16".into()],
        };
        let nft: Vec<String> = nat_commands("nft", "k0", "10.0.0.0/24", Some(&policy), true)
            .iter()
            .map(|a| a.join(" "))
            .collect();
        let at = |needle: &str| {
            nft.iter()
                .position(|l| l.contains(needle))
                .unwrap_or_else(|| panic!("no {needle:?} in {nft:#?}"))
        };
        assert!(at("ip daddr 10.9.0.0/16 accept") < at("ip daddr 10.0.0.0/8 drop"));
        for net in BLOCKED {
            at(&format!("iifname k0 ip daddr {net} drop"));
        }
        at("from_guest oifname k0 ct state new drop");
        at("to_host iifname k0 ip daddr != 10.0.0.1 drop");
        assert_eq!(
            nat_commands("nft", "k0", "10.0.0.0/24", Some(&policy), false),
            [["delete", "table", "ip", "kiln_k0"]]
        );

        // iptables: teardown deletes what setup added, hooks first, then the chain.
        let ipt = |add| -> Vec<String> {
            nat_commands("iptables", "k0", "10.0.0.0/24", Some(&policy), add)
                .iter()
                .map(|a| a.join(" "))
                .collect()
        };
        let (add, del) = (ipt(true), ipt(false));
        for hook in add.iter().filter(|l| l.starts_with("-I ")) {
            assert!(
                del.contains(&hook.replacen("-I", "-D", 1)),
                "{hook} never deleted"
            );
        }
        assert_eq!(del[del.len() - 2..], ["-F kiln_k0", "-X kiln_k0"]);
        assert!(add.contains(&"-A kiln_k0 -d 169.254.0.0/16 -j DROP".to_string()));
    }
}
