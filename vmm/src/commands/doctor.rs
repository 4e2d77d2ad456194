//! `kiln doctor`: what kiln needs on this host, one line each — ok, or what is wrong and
//! what to do. Exits 1 when something a default `kiln job` needs is missing.

use std::path::Path;
use std::process::ExitCode;

use crate::defaults;

/// Where `kiln-gitlab nesting serve` reads its configuration by default (the systemd unit's).
const NESTING_CONFIG: &str = "/etc/kiln-gitlab/nesting.toml";

/// One check's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    /// Whether a default `kiln job` needs it.
    pub needed: bool,
    /// What was found, or what is wrong and what to do.
    pub detail: String,
}

impl Check {
    fn new(name: &'static str, needed: bool, result: Result<String, String>) -> Self {
        let (ok, detail) = match result {
            Ok(d) => (true, d),
            Err(d) => (false, d),
        };
        Check {
            name,
            ok,
            needed,
            detail,
        }
    }

    /// `ok    name  detail`, or `FAIL` (needed) / `warn` (optional) in its place.
    pub fn line(&self) -> String {
        let verdict = match (self.ok, self.needed) {
            (true, _) => "ok",
            (false, true) => "FAIL",
            (false, false) => "warn",
        };
        format!("{verdict:<5} {:<15} {}", self.name, self.detail)
    }
}

pub fn doctor() -> anyhow::Result<ExitCode> {
    let checks = checks();
    for check in &checks {
        println!("{}", check.line());
    }
    let missing = checks.iter().filter(|c| c.needed && !c.ok).count();
    if missing > 0 {
        println!("kiln doctor: {missing} thing(s) a default `kiln job` needs are missing");
        return Ok(ExitCode::FAILURE);
    }
    println!("kiln doctor: this host can run kiln jobs");
    Ok(ExitCode::SUCCESS)
}

/// Every check, in the order a user fixes them.
pub fn checks() -> Vec<Check> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    vec![
        Check::new("kvm", true, kvm_access()),
        Check::new(
            "virtualization",
            true,
            virtualization(&cpuinfo, Path::new("/sys/module")),
        ),
        Check::new("guest kernel", true, found(defaults::guest_kernel())),
        Check::new("initramfs", true, found(defaults::agent_initramfs())),
        Check::new("cgroup v2", false, cgroup2(Path::new("/sys/fs/cgroup"))),
        Check::new("tun", false, tun()),
        Check::new(
            "nesting socket",
            false,
            nesting_socket(Path::new(NESTING_CONFIG)),
        ),
    ]
}

/// A default file's check: its path, or where it was looked for.
fn found<E: std::fmt::Display>(path: Result<std::path::PathBuf, E>) -> Result<String, String> {
    path.map(|p| p.display().to_string())
        .map_err(|e| e.to_string())
}

fn kvm_access() -> Result<String, String> {
    let kvm = kvm_ioctls::Kvm::new().map_err(|e| {
        format!(
            "cannot open /dev/kvm ({e}): load kvm_intel or kvm_amd, and run as root or as a \
             member of the group that owns /dev/kvm (usually `kvm`)"
        )
    })?;
    Ok(format!(
        "/dev/kvm opened, KVM API {}",
        kvm.get_api_version()
    ))
}

/// Whether this KVM can boot an unmodified Linux guest: the CPU must offer hardware
/// virtualization. `modules` is `/sys/module`, where a software hypervisor shows itself.
pub fn virtualization(cpuinfo: &str, modules: &Path) -> Result<String, String> {
    let flags: Vec<&str> = cpuinfo
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| k.trim() == "flags")
        .flat_map(|(_, v)| v.split_whitespace())
        .collect();
    if let Some(flag) = ["vmx", "svm"].into_iter().find(|f| flags.contains(f)) {
        return Ok(format!("hardware virtualization ({flag})"));
    }
    let cause = if modules.join("kvm_pvm").exists() {
        "/dev/kvm is PVM (kvm_pvm), a software hypervisor that runs only guests built for it"
    } else {
        "/dev/kvm has no hardware virtualization under it"
    };
    Err(format!(
        "cannot boot a Linux guest: {cause}, and the CPU offers no vmx or svm \
         (/proc/cpuinfo); run kiln on a host with VT-x or AMD-V, or a VM with nested \
         virtualization"
    ))
}

fn cgroup2(root: &Path) -> Result<String, String> {
    let controllers = std::fs::read_to_string(root.join("cgroup.controllers")).map_err(|_| {
        format!(
            "no cgroup v2 at {} (needed for --slot): mount it (mount -t cgroup2 none {})",
            root.display(),
            root.display()
        )
    })?;
    let have: Vec<&str> = controllers.split_whitespace().collect();
    let missing: Vec<&str> = ["cpu", "memory", "pids"]
        .into_iter()
        .filter(|c| !have.contains(c))
        .collect();
    if missing.is_empty() {
        Ok(format!("{} ({})", root.display(), have.join(" ")))
    } else {
        Err(format!(
            "cgroup v2 at {} lacks the {} controller(s) --slot limits with",
            root.display(),
            missing.join(", ")
        ))
    }
}

fn tun() -> Result<String, String> {
    std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map(|_| "/dev/net/tun opened (--net)".to_string())
        .map_err(|e| {
            format!("cannot open /dev/net/tun ({e}; needed for --net): load the tun module")
        })
}

/// The nesting server's socket group, if its configuration names one, must exist.
fn nesting_socket(config: &Path) -> Result<String, String> {
    let Ok(text) = std::fs::read_to_string(config) else {
        return Ok(format!(
            "{} not present (only kiln-gitlab nesting serve needs it)",
            config.display()
        ));
    };
    let table: toml::Table = text
        .parse()
        .map_err(|e| format!("{} is not valid TOML: {e}", config.display()))?;
    match table.get("socket_group").and_then(|g| g.as_str()) {
        None => Ok(format!(
            "{}: the socket keeps the server's group",
            config.display()
        )),
        Some(group) => kiln_devices::private::group_id(group)
            .map(|gid| format!("socket group {group} (gid {gid})"))
            .map_err(|_| {
                format!(
                    "{} names socket_group {group:?}, which does not exist: groupadd {group}, \
                     and add the runner's SSH user to it",
                    config.display()
                )
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtualization_is_read_from_cpuinfo_and_pvm_is_named() {
        let none = std::env::temp_dir().join(format!("kiln-doctor-{}", std::process::id()));
        let pvm = none.join("pvm");
        std::fs::create_dir_all(pvm.join("kvm_pvm")).unwrap();
        let amd = "processor\t: 0\nflags\t\t: fpu svm sse\n";
        assert_eq!(
            virtualization(amd, &none),
            Ok("hardware virtualization (svm)".into())
        );
        let plain = "flags\t\t: fpu sse hypervisor\n";
        let e = virtualization(plain, &pvm).unwrap_err();
        assert!(
            e.starts_with("cannot boot a Linux guest: /dev/kvm is PVM"),
            "{e}"
        );
        let e = virtualization(plain, &none).unwrap_err();
        assert!(e.contains("no hardware virtualization"), "{e}");
        std::fs::remove_dir_all(&none).unwrap();
    }

    #[test]
    fn lines_say_ok_fail_or_warn() {
        let ok = Check::new("tun", false, Ok("x".into()));
        let fail = Check::new("kvm", true, Err("y".into()));
        let warn = Check::new("tun", false, Err("z".into()));
        assert!(ok.line().starts_with("ok    tun"));
        assert!(fail.line().starts_with("FAIL  kvm"));
        assert!(warn.line().starts_with("warn  tun"));
    }

    #[test]
    fn a_nesting_config_naming_a_missing_group_is_reported() {
        let dir = std::env::temp_dir().join(format!("kiln-doctor-n-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("nesting.toml");
        assert!(nesting_socket(&config).unwrap().contains("not present"));
        std::fs::write(&config, "socket_group = \"kiln-no-such-group\"\n").unwrap();
        let e = nesting_socket(&config).unwrap_err();
        assert!(e.contains("does not exist"), "{e}");
        std::fs::write(&config, "socket_group = \"root\"\n").unwrap();
        assert_eq!(
            nesting_socket(&config),
            Ok("socket group root (gid 0)".into())
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
