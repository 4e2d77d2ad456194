//! `kiln cp`: copy a file into or out of a running VM. The guest side is written
//! `vm:/path`.
//!
//! A file copied out is guest data landing on the host, possibly as root, so:
//! - it never gets the setuid, setgid or sticky bit: its mode is the guest's permission
//!   bits less the umask (as cp(1) gives a new file), or with `--preserve-mode` the guest's
//!   permission bits as they are;
//! - it is written to a new temporary file in the destination's directory, created
//!   exclusively (`O_EXCL | O_NOFOLLOW`, random name, 0600 until complete), then renamed
//!   over the destination, so a failed copy leaves nothing under the destination's name;
//! - a destination that is a symbolic link is refused unless `--follow-symlinks`, and then
//!   the link's target is replaced, not the link.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};

use super::common::connect_agent;
use crate::cli::CpArgs;

const GUEST_PREFIX: &str = "vm:";

/// Permission bits a copied-out file may get: never setuid, setgid or sticky.
const PERMISSION_BITS: u32 = 0o777;

pub fn cp(args: &CpArgs) -> anyhow::Result<ExitCode> {
    match (
        args.src.strip_prefix(GUEST_PREFIX),
        args.dst.strip_prefix(GUEST_PREFIX),
    ) {
        (None, Some(guest)) => {
            let mut file =
                File::open(&args.src).with_context(|| format!("cannot read {}", args.src))?;
            let mode = match args.mode {
                Some(m) => m,
                None => {
                    use std::os::unix::fs::PermissionsExt;
                    file.metadata()?.permissions().mode() & 0o7777
                }
            };
            let mut client = connect_agent(&args.vsock)?;
            let sent = client
                .put_file(guest, mode, &mut file)
                .with_context(|| format!("cannot write {guest} in the guest"))?;
            tracing::debug!("copied {sent} bytes to {guest}");
        }
        (Some(guest), None) => {
            let options = HostWrite {
                preserve_mode: args.preserve_mode,
                follow_symlinks: args.follow_symlinks,
            };
            // Checked before the guest is asked for anything.
            let target = options.target(Path::new(&args.dst))?;
            let mut client = connect_agent(&args.vsock)?;
            write_host_file(&target, options, |out| {
                let info = client
                    .get_file(guest, out)
                    .with_context(|| format!("cannot read {guest} from the guest"))?;
                Ok(info.mode)
            })?;
        }
        _ => bail!("exactly one of SRC and DST must be a guest path, written {GUEST_PREFIX}/path"),
    }
    Ok(ExitCode::SUCCESS)
}

/// How a file from the guest is written on the host.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostWrite {
    /// Keep the guest's permission bits (rwx only) instead of applying the umask.
    pub preserve_mode: bool,
    /// Replace the target of a destination that is a symbolic link, instead of refusing.
    pub follow_symlinks: bool,
}

impl HostWrite {
    /// The file to replace for destination `dst`: `dst` itself, or, with
    /// `follow_symlinks`, the file a link at `dst` resolves to.
    pub fn target(&self, dst: &Path) -> anyhow::Result<PathBuf> {
        match std::fs::symlink_metadata(dst) {
            Ok(m) if m.file_type().is_symlink() => {
                if !self.follow_symlinks {
                    bail!(
                        "{} is a symbolic link; kiln cp does not write through it \
                         (pass --follow-symlinks to replace its target)",
                        dst.display()
                    );
                }
                std::fs::canonicalize(dst)
                    .with_context(|| format!("cannot resolve the symbolic link {}", dst.display()))
            }
            Ok(m) if m.is_dir() => bail!(
                "{} is a directory; give the file's full destination path",
                dst.display()
            ),
            _ => Ok(dst.to_owned()),
        }
    }

    /// The mode a copied-out file gets, from the guest's mode.
    pub fn mode(&self, guest_mode: u32) -> u32 {
        let bits = guest_mode & PERMISSION_BITS;
        if self.preserve_mode {
            bits
        } else {
            bits & !current_umask()
        }
    }
}

/// The process's umask: the `Umask:` line of /proc/self/status, which reads it without
/// changing it (setting it and putting it back would change it for a moment for every
/// thread, e.g. under one binding a private socket); on a kernel without that line, it is
/// swapped and put back.
fn current_umask() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let listed = status
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .and_then(|v| u32::from_str_radix(v.trim(), 8).ok());
    if let Some(mask) = listed {
        return mask;
    }
    // SAFETY: umask only swaps the process's file mode mask; it cannot fail.
    let mask = unsafe { libc::umask(0o077) };
    // SAFETY: as above, putting the mask back.
    unsafe { libc::umask(mask) };
    mask
}

/// Writes a file to `target` (already resolved by [`HostWrite::target`]): `fill` writes
/// the contents into a new private temporary file next to it and returns the guest's
/// mode; the file then gets its mode and is renamed into place. On any error the
/// temporary file is removed and `target` is untouched.
pub fn write_host_file(
    target: &Path,
    options: HostWrite,
    fill: impl FnOnce(&mut dyn Write) -> anyhow::Result<u32>,
) -> anyhow::Result<()> {
    let name = target
        .file_name()
        .with_context(|| format!("{} does not name a file", target.display()))?;
    let dir = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(
        ".kiln-cp-{}",
        kiln_devices::private::random_suffix()
    ));
    let tmp = dir.join(tmp_name);
    let mut file = kiln_devices::private::create_file(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    let result = (|| {
        let guest_mode = {
            let mut out = std::io::BufWriter::new(&mut file);
            let mode = fill(&mut out)?;
            out.flush()
                .with_context(|| format!("cannot write {}", tmp.display()))?;
            mode
        };
        use std::os::unix::fs::PermissionsExt;
        // On the open file, so it is the file just written that gets the mode.
        file.set_permissions(std::fs::Permissions::from_mode(options.mode(guest_mode)))
            .with_context(|| format!("cannot set the mode of {}", tmp.display()))?;
        std::fs::rename(&tmp, target)
            .with_context(|| format!("cannot move the copy to {}", target.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::scratch;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    /// What the guest would send: these bytes, with this mode.
    fn guest_file(
        bytes: &'static [u8],
        mode: u32,
    ) -> impl FnOnce(&mut dyn Write) -> anyhow::Result<u32> {
        move |out| {
            out.write_all(bytes)?;
            Ok(mode)
        }
    }

    fn entries(d: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn hostile_cp_setuid_guest_file_loses_its_special_bits() {
        let d = scratch("cp-setuid");
        let dst = d.join("out");
        for (options, want) in [
            (HostWrite::default(), 0o4755 & 0o777 & !current_umask()),
            (
                HostWrite {
                    preserve_mode: true,
                    ..HostWrite::default()
                },
                0o755,
            ),
        ] {
            let _ = std::fs::remove_file(&dst);
            let target = options.target(&dst).unwrap();
            write_host_file(
                &target,
                options,
                guest_file(b"#!/bin/sh\n", 0o6755 | 0o1000),
            )
            .unwrap();
            assert_eq!(mode(&dst), want, "{options:?}");
            assert_eq!(mode(&dst) & 0o7000, 0, "no setuid/setgid/sticky");
            assert_eq!(std::fs::read(&dst).unwrap(), b"#!/bin/sh\n");
        }
        assert_eq!(entries(&d), ["out"], "no temporary file left");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn hostile_cp_symlink_at_the_destination_is_refused() {
        let d = scratch("cp-symlink");
        let victim = d.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
        let link = d.join("link");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let e = HostWrite::default().target(&link).unwrap_err().to_string();
        assert!(
            e.contains("symbolic link") && e.contains("--follow-symlinks"),
            "{e}"
        );
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());

        // Told to, it replaces the link's target (the link stays a link).
        let follow = HostWrite {
            follow_symlinks: true,
            ..HostWrite::default()
        };
        let target = follow.target(&link).unwrap();
        assert_eq!(target, std::fs::canonicalize(&victim).unwrap());
        write_host_file(&target, follow, guest_file(b"new", 0o644)).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"new");
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_failed_copy_leaves_the_destination_and_no_temporary_file() {
        let d = scratch("cp-failed");
        let dst = d.join("out");
        std::fs::write(&dst, b"before").unwrap();
        let e = write_host_file(&dst, HostWrite::default(), |out| {
            out.write_all(b"half")?;
            bail!("the guest went away")
        })
        .unwrap_err();
        assert!(e.to_string().contains("went away"), "{e}");
        assert_eq!(std::fs::read(&dst).unwrap(), b"before");
        assert_eq!(entries(&d), ["out"]);
        // A directory destination is refused up front.
        assert!(HostWrite::default().target(&d).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
