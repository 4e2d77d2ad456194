//! Debian's static busybox (package `busybox-static`), the userland of test images.

use std::io::Write;
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};

use crate::artifacts::is_static_elf;
use crate::cpio;

/// Where Debian's `busybox-static` installs the binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// Applets that are not linked into `/bin`: the images bring their own init.
const SKIPPED: &[&str] = &["busybox", "init", "linuxrc"];

/// The binary and the names of its applets.
pub struct Busybox {
    pub binary: Vec<u8>,
    pub applets: Vec<String>,
}

/// Reads `/bin/busybox` (once per process) and checks that it is the static build.
pub fn busybox() -> Result<&'static Busybox> {
    static BUSYBOX_FILE: OnceLock<Result<Busybox, String>> = OnceLock::new();
    BUSYBOX_FILE
        .get_or_init(|| load().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

fn load() -> Result<Busybox> {
    let hint = "install Debian's busybox-static (apt-get install busybox-static)";
    let binary = std::fs::read(BUSYBOX).with_context(|| format!("reading {BUSYBOX}; {hint}"))?;
    if !is_static_elf(&binary) {
        bail!("{BUSYBOX} is dynamically linked; {hint}");
    }
    let out = Command::new(BUSYBOX)
        .arg("--list")
        .output()
        .with_context(|| format!("running {BUSYBOX} --list"))?;
    if !out.status.success() {
        bail!("{BUSYBOX} --list failed ({})", out.status);
    }
    let applets: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && !a.contains('/') && !SKIPPED.contains(a))
        .map(String::from)
        .collect();
    if !applets.iter().any(|a| a == "sh") {
        bail!("{BUSYBOX} has no `sh` applet; {hint}");
    }
    Ok(Busybox { binary, applets })
}

/// Adds `/bin/busybox` and a `/bin/<applet>` symlink for each applet.
pub fn add_to<W: Write>(archive: &mut cpio::Writer<W>) -> Result<()> {
    let bb = busybox()?;
    archive.file(BUSYBOX, 0o755, &bb.binary)?;
    for applet in &bb.applets {
        archive.symlink(&format!("/bin/{applet}"), "busybox")?;
    }
    Ok(())
}

/// Adds the `/dev/console` and `/dev/null` nodes: with them in the image the kernel opens a
/// console for init's fds 0–2 before anything mounts /dev.
pub fn add_console_nodes<W: Write>(archive: &mut cpio::Writer<W>) -> Result<()> {
    archive.char_device("/dev/console", 0o600, 5, 1)?;
    archive.char_device("/dev/null", 0o666, 1, 3)?;
    Ok(())
}
