//! The nesting server's configuration: a TOML file (`--config`, else
//! `$KILN_NESTING_CONFIG`, else `/etc/kiln-gitlab/nesting.toml` if it exists), every key
//! optional. Command-line flags override the file's `socket` and `listen`.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use super::provider::Settings;

pub const DEFAULT_CONFIG: &str = "/etc/kiln-gitlab/nesting.toml";
pub const DEFAULT_SOCKET: &str = "/run/kiln/nesting.sock";

/// The file's keys.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NestingFile {
    /// The Unix socket to serve on. Default `$NESTING_SOCKET`, else `/run/kiln/nesting.sock`.
    pub socket: Option<PathBuf>,
    /// The socket's permission bits, octal. Default `0660`.
    pub socket_mode: Option<String>,
    /// The socket's group (name or number), e.g. the group of the user the runner SSHes in
    /// as. Default: the server's.
    pub socket_group: Option<String>,
    /// Also serve on TCP, `tcp://ADDR:PORT` (plaintext, no authentication: loopback only
    /// unless the network is trusted). Default: off.
    pub listen: Option<String>,
    /// The `kiln` binary. Default: `kiln` beside `kiln-gitlab`, else `kiln` on PATH.
    pub kiln: Option<PathBuf>,
    /// The server's VM records and each VM's sockets and logs. Default `/run/kiln/nesting`
    /// (cleared at boot, when no VM survives anyway).
    pub state_dir: Option<PathBuf>,
    /// kiln's image store; a Create's `name` is an image there. Default
    /// `$KILN_IMAGE_STORE`, else `/var/lib/kiln/images`.
    pub image_store: Option<PathBuf>,
    /// The kernel that boots store images. Default
    /// `/var/lib/kiln-gitlab/images/default/kernel`.
    pub image_kernel: Option<PathBuf>,
    /// Slots 0 … slots−1 (the runner's capacity_per_instance must not be larger); at most
    /// 256. Default 4.
    pub slots: Option<u32>,
    /// The VMs' addresses: a /16 (or larger) IPv4 network; slot N gets the /24 at offset
    /// N, with the host at .1 on TAP `<tap_prefix>N` and the VM at .2. Default
    /// `10.213.0.0/16`.
    pub network: Option<String>,
    /// TAP name prefix. Default `kilnn`.
    pub tap_prefix: Option<String>,
    /// Let the VMs reach the networks beyond the host (`kiln net setup --nat`, with its
    /// guest network policy). Default true.
    pub nat: Option<bool>,
    /// `kiln net setup --allow` networks (with nat). Default none.
    pub nat_allow: Option<Vec<String>>,
    /// DNS server given to the VMs. Default: the host's address on the VM's TAP is not a
    /// resolver, so none unless set.
    pub dns: Option<String>,
    /// Guest memory in MiB and vCPUs (nesting_config's memory_mib/vcpus override).
    /// Defaults 1024 and 1.
    pub memory_mib: Option<u64>,
    pub vcpus: Option<u64>,
    /// Keep, per image and slot, a snapshot of a VM booted to its guest agent, and make
    /// later Creates restore a clone of it instead of booting. Default true.
    pub warm_snapshots: Option<bool>,
    /// Where those snapshots are kept (each as large as the guest's memory). Default
    /// `/var/lib/kiln-gitlab/nesting-snapshots`.
    pub snapshot_dir: Option<PathBuf>,
    /// How long a Create waits for the VM's SSH port. Default 120 s.
    pub boot_timeout_secs: Option<u64>,
    /// The SSH login set in each VM (nesting_config's ssh_user/ssh_password override).
    /// Default user `ci`; no default password.
    pub ssh_user: Option<String>,
    pub ssh_password: Option<String>,
}

/// The resolved configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NestingConfig {
    pub socket: PathBuf,
    pub socket_mode: u32,
    pub socket_group: Option<String>,
    pub listen: Option<String>,
    pub kiln: PathBuf,
    pub state_dir: PathBuf,
    pub image_store: PathBuf,
    pub image_kernel: PathBuf,
    pub network: Ipv4Addr,
    pub tap_prefix: String,
    pub nat: bool,
    pub nat_allow: Vec<String>,
    pub dns: Option<String>,
    pub boot_timeout: Duration,
    /// The warm snapshots' directory, or `None` when Creates always boot.
    pub warm_dir: Option<PathBuf>,
    pub settings: Settings,
}

/// The environment variables that set defaults.
#[derive(Debug, Default, Clone)]
pub struct Env {
    pub nesting_socket: Option<String>,
    pub image_store: Option<String>,
    pub exe: Option<PathBuf>,
}

impl Env {
    pub fn from_process() -> Env {
        let var = |k| std::env::var(k).ok().filter(|v: &String| !v.is_empty());
        Env {
            nesting_socket: var("NESTING_SOCKET"),
            image_store: var("KILN_IMAGE_STORE"),
            exe: std::env::current_exe().ok(),
        }
    }
}

impl NestingConfig {
    /// Reads the config file (see the module docs for which one).
    pub fn load(explicit: Option<&Path>) -> Result<NestingConfig> {
        let from_env = std::env::var_os("KILN_NESTING_CONFIG").map(PathBuf::from);
        let path = explicit
            .map(Path::to_owned)
            .or(from_env)
            .or_else(|| Some(PathBuf::from(DEFAULT_CONFIG)).filter(|p| p.exists()));
        let file = match &path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read the nesting config {}", p.display()))?;
                toml::from_str(&text)
                    .with_context(|| format!("bad nesting config {}", p.display()))?
            }
            None => NestingFile::default(),
        };
        NestingConfig::from_file(file, &Env::from_process())
    }

    pub fn from_file(f: NestingFile, env: &Env) -> Result<NestingConfig> {
        let socket_mode = match &f.socket_mode {
            Some(m) => u32::from_str_radix(m.trim_start_matches("0o"), 8)
                .ok()
                .filter(|m| *m <= 0o777)
                .with_context(|| format!("socket_mode {m:?} is not octal permission bits"))?,
            None => 0o660,
        };
        if let Some(l) = &f.listen {
            listen_addr(l)?;
        }
        let network = parse_network(f.network.as_deref().unwrap_or("10.213.0.0/16"))?;
        let slots = f.slots.unwrap_or(4);
        if slots == 0 || slots > 256 {
            bail!("slots = {slots}: must be 1 to 256 (one /24 of `network` per slot)");
        }
        let tap_prefix = f.tap_prefix.unwrap_or_else(|| "kilnn".into());
        if tap_prefix.is_empty()
            || tap_prefix.len() > 12
            || !tap_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            bail!("tap_prefix {tap_prefix:?}: 1 to 12 letters, digits or `-` (a TAP name has at most 15)");
        }
        let exe_dir = env.exe.as_deref().and_then(Path::parent);
        let kiln = f
            .kiln
            .unwrap_or_else(|| match exe_dir.map(|d| d.join("kiln")) {
                Some(k) if k.is_file() => k,
                _ => PathBuf::from("kiln"),
            });
        let memory_mib = f.memory_mib.unwrap_or(1024);
        let vcpus = f.vcpus.unwrap_or(1);
        if memory_mib == 0 || vcpus == 0 {
            bail!("memory_mib and vcpus must be at least 1");
        }
        Ok(NestingConfig {
            socket: f
                .socket
                .or_else(|| env.nesting_socket.as_ref().map(PathBuf::from))
                .unwrap_or_else(|| DEFAULT_SOCKET.into()),
            socket_mode,
            socket_group: f.socket_group,
            listen: f.listen,
            kiln,
            state_dir: f.state_dir.unwrap_or_else(|| "/run/kiln/nesting".into()),
            image_store: f
                .image_store
                .or_else(|| env.image_store.as_ref().map(PathBuf::from))
                .unwrap_or_else(|| "/var/lib/kiln/images".into()),
            image_kernel: f
                .image_kernel
                .unwrap_or_else(|| "/var/lib/kiln-gitlab/images/default/kernel".into()),
            network,
            tap_prefix,
            nat: f.nat.unwrap_or(true),
            nat_allow: f.nat_allow.unwrap_or_default(),
            dns: f.dns,
            boot_timeout: Duration::from_secs(f.boot_timeout_secs.unwrap_or(120)),
            warm_dir: f.warm_snapshots.unwrap_or(true).then(|| {
                f.snapshot_dir
                    .unwrap_or_else(|| "/var/lib/kiln-gitlab/nesting-snapshots".into())
            }),
            settings: Settings {
                slots,
                memory_mib,
                vcpus,
                ssh_user: f.ssh_user.unwrap_or_else(|| "ci".into()),
                ssh_password: f.ssh_password,
            },
        })
    }

    /// The host's and the VM's address in `slot`'s /24.
    pub fn slot_addrs(&self, slot: u32) -> (Ipv4Addr, Ipv4Addr) {
        let base = u32::from(self.network) + (slot << 8);
        (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2))
    }

    pub fn tap(&self, slot: u32) -> String {
        format!("{}{slot}", self.tap_prefix)
    }
}

/// `A.B.C.D/N` with N ≤ 16 and no host bits.
fn parse_network(s: &str) -> Result<Ipv4Addr> {
    let err = || format!("network {s:?}: expected an IPv4 network A.B.0.0/N with N at most 16");
    let (ip, len) = s.split_once('/').with_context(err)?;
    let ip: Ipv4Addr = ip.parse().ok().with_context(err)?;
    let len: u32 = len.parse().ok().filter(|l| *l <= 16).with_context(err)?;
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    if u32::from(ip) & !mask != 0 || u32::from(ip) & 0xffff != 0 {
        bail!("{}", err());
    }
    Ok(ip)
}

/// The socket address of `tcp://ADDR:PORT`.
pub fn listen_addr(url: &str) -> Result<std::net::SocketAddr> {
    let Some(rest) = url.strip_prefix("tcp://") else {
        bail!("listen {url:?}: expected tcp://ADDR:PORT");
    };
    rest.parse()
        .with_context(|| format!("listen {url:?}: expected tcp://ADDR:PORT"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<NestingConfig> {
        NestingConfig::from_file(toml::from_str(text)?, &Env::default())
    }

    #[test]
    fn defaults_and_slot_addresses() {
        let env = Env {
            nesting_socket: Some("/tmp/n.sock".into()),
            ..Env::default()
        };
        let c = NestingConfig::from_file(NestingFile::default(), &env).unwrap();
        assert_eq!(c.socket, PathBuf::from("/tmp/n.sock"));
        let c = parse("").unwrap();
        assert_eq!(c.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(c.socket_mode, 0o660);
        assert_eq!(c.settings.slots, 4);
        assert_eq!(c.settings.ssh_user, "ci");
        assert_eq!(
            c.slot_addrs(3),
            ("10.213.3.1".parse().unwrap(), "10.213.3.2".parse().unwrap())
        );
        assert_eq!(c.tap(3), "kilnn3");
        assert_eq!(
            c.warm_dir.as_deref(),
            Some(Path::new("/var/lib/kiln-gitlab/nesting-snapshots"))
        );
        assert_eq!(parse("warm_snapshots = false").unwrap().warm_dir, None);
        let c = parse("network = \"172.20.0.0/14\"\nslots = 256\nsocket_mode = \"0600\"").unwrap();
        assert_eq!(
            c.slot_addrs(255).1,
            "172.20.255.2".parse::<Ipv4Addr>().unwrap()
        );
        assert_eq!(c.socket_mode, 0o600);
    }

    #[test]
    fn bad_settings_are_refused() {
        for bad in [
            "network = \"10.0.0.0/24\"",
            "network = \"10.0.1.0/16\"",
            "network = \"nope\"",
            "slots = 0",
            "slots = 300",
            "socket_mode = \"999\"",
            "listen = \"127.0.0.1:9000\"",
            "tap_prefix = \"a/b\"",
            "memory_mib = 0",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert!(toml::from_str::<NestingFile>("sockett = \"/x\"").is_err());
        assert_eq!(
            listen_addr("tcp://127.0.0.1:9000").unwrap(),
            "127.0.0.1:9000".parse().unwrap()
        );
    }

    #[test]
    fn the_documented_server_config_is_valid() {
        let doc = include_str!("../../../docs/gitlab-autoscaling.md");
        let block = doc
            .split("```toml\n")
            .nth(2)
            .and_then(|b| b.split("```").next())
            .expect("the server config is the document's second TOML block");
        let c = parse(block).unwrap();
        assert_eq!(c.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(c.socket_group.as_deref(), Some("runner"));
        assert_eq!(c.settings.slots, 4);
    }
}
