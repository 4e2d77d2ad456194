//! Guest initramfs images: `kiln-agent` as `/init`, busybox, and a job script.

use anyhow::{Context, Result};

use crate::{artifacts, busybox, cpio};

/// Where the agent looks for the job script.
pub const RC_PATH: &str = "/etc/kiln/rc";

/// Where Debian's `bash-static` installs its (static) bash.
pub const BASH_STATIC: &str = "/bin/bash-static";

/// Empty directories every guest image has (mount points and homes).
const DIRS: &[&str] = &["/proc", "/sys", "/dev", "/tmp", "/run", "/etc", "/root"];

/// A guest initramfs with `/init` = the static `kiln-agent` and `/etc/kiln/rc` =
/// `rc_script`, uncompressed.
pub fn build(rc_script: &str) -> Result<Vec<u8>> {
    GuestInitramfs::new().rc(rc_script).build()
}

/// A guest initramfs with more control than [`build`] gives.
#[derive(Debug, Clone)]
pub struct GuestInitramfs {
    init: Option<Vec<u8>>,
    rc: Option<String>,
    files: Vec<(String, u32, Vec<u8>)>,
    device_nodes: bool,
    bash: bool,
}

impl Default for GuestInitramfs {
    fn default() -> Self {
        Self::new()
    }
}

impl GuestInitramfs {
    /// The agent as `/init`, no rc script, `/dev/console` and `/dev/null` present.
    pub fn new() -> Self {
        GuestInitramfs {
            init: None,
            rc: None,
            files: Vec::new(),
            device_nodes: true,
            bash: false,
        }
    }

    /// Replaces the agent with `init` (e.g. a `#!/bin/sh` script) as `/init`.
    pub fn init(mut self, init: impl Into<Vec<u8>>) -> Self {
        self.init = Some(init.into());
        self
    }

    /// Sets `/etc/kiln/rc`.
    pub fn rc(mut self, script: &str) -> Self {
        self.rc = Some(script.to_string());
        self
    }

    /// Adds a regular file (parents are created).
    pub fn file(mut self, path: &str, mode: u32, data: impl Into<Vec<u8>>) -> Self {
        self.files.push((path.to_string(), mode, data.into()));
        self
    }

    /// Whether to add `/dev/console` and `/dev/null` nodes. Without them the kernel starts
    /// init with fds 0–2 closed, which the agent must repair itself.
    pub fn device_nodes(mut self, yes: bool) -> Self {
        self.device_nodes = yes;
        self
    }

    /// Whether to add a static bash as `/bin/bash` (from Debian's `bash-static`, which
    /// `cargo xtask setup` installs): GitLab Runner's job scripts are bash scripts.
    pub fn bash(mut self, yes: bool) -> Self {
        self.bash = yes;
        self
    }

    pub fn build(&self) -> Result<Vec<u8>> {
        let mut w = cpio::Writer::in_memory();
        for dir in DIRS {
            w.dir(dir, 0o755)?;
        }
        busybox::add_to(&mut w)?;
        if self.device_nodes {
            busybox::add_console_nodes(&mut w)?;
        }
        let init = match &self.init {
            Some(init) => init.clone(),
            None => {
                let agent = artifacts::static_binaries()?.kiln_agent;
                std::fs::read(&agent).with_context(|| format!("reading {}", agent.display()))?
            }
        };
        w.file("/init", 0o755, &init)?;
        // The agent run under this name is the job's snapshot helper (`kiln job
        // --snapshot-at`).
        w.symlink("/bin/kiln-snapshot", "/init")?;
        if let Some(rc) = &self.rc {
            w.file(RC_PATH, 0o755, rc.as_bytes())?;
        }
        if self.bash {
            let hint = "install Debian's bash-static (cargo xtask setup does)";
            let bash = std::fs::read(BASH_STATIC)
                .with_context(|| format!("reading {BASH_STATIC}; {hint}"))?;
            anyhow::ensure!(
                artifacts::is_static_elf(&bash),
                "{BASH_STATIC} is not a static executable; {hint}"
            );
            w.file("/bin/bash", 0o755, &bash)?;
        }
        for (path, mode, data) in &self.files {
            w.file(path, *mode, data)?;
        }
        Ok(w.finish()?)
    }
}
