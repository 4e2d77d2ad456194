//! The command line that starts a job's VM: `kiln run` or `kiln restore`, inside `kiln
//! jail` unless the config turns jailing off.
//!
//! A jailed kiln sees only its jail's root (`<jail_base>/job-<id>/root`): each file the VM
//! needs (kernel, initrd, an image directory holding `vm.toml`, a snapshot directory) is
//! put there under its file name with `--file`, a store image with `--image`, and the TAP
//! is handed over already attached with `--tap`. The inner kiln's paths are then
//! `/<file name>`, and its sockets and console are made in the root, which the job's state
//! directory links to (`vsock.sock` → `<root>/vsock.sock`, …) so that the rest of the
//! driver finds them where an unjailed VM has them.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use crate::config::{Config, JailConfig};
use crate::identity::Identity;
use crate::prepare::Source;
use crate::state::JobDir;

/// Inside a snapshot taken by a jailed VM of a store image: the image's name, which a
/// jailed restore must place at the same path again (`/images/<name>`).
pub const SNAPSHOT_IMAGE_FILE: &str = "kiln-gitlab-image";
/// The socket and console names inside a jail's root.
const JAIL_VSOCK: &str = "/vsock.sock";
const JAIL_API: &str = "/api.sock";
const JAIL_CONSOLE: &str = "/console.log";

/// How to start the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub args: Vec<OsString>,
    /// The jail's root on the host, if jailed.
    pub jail_root: Option<PathBuf>,
}

/// The jail's name for a job (its directory under the base and the VMM's hostname).
pub fn jail_id(identity: &Identity) -> String {
    format!("job-{}", identity.job_id)
}

/// The arguments of the job's `kiln`: `kiln jail … -- run|restore …`, or the inner command
/// alone without a jail.
pub fn launch(
    config: &Config,
    job: &JobDir,
    source: &Source,
    identity: &Identity,
    slot: u32,
) -> Result<Launch> {
    let net = config
        .net
        .as_ref()
        .map(|n| n.replace("{id}", &slot.to_string()));
    let mut outer: Vec<OsString> = Vec::new();
    let mut inner: Vec<OsString> = Vec::new();
    let jail = config.jail.as_ref();
    // A file the VM needs: its path for the inner kiln (and, jailed, a --file for it).
    let file = |outer: &mut Vec<OsString>, host: &Path| -> Result<OsString> {
        if jail.is_none() {
            return Ok(host.as_os_str().to_owned());
        }
        let Some(name) = host.file_name() else {
            bail!("{} has no file name to put into the jail", host.display());
        };
        outer.push("--file".into());
        outer.push(host.as_os_str().to_owned());
        let mut inside = OsString::from("/");
        inside.push(name);
        Ok(inside)
    };
    let arg = |v: &mut Vec<OsString>, a: &dyn AsRef<OsStr>| v.push(a.as_ref().to_owned());
    match source {
        Source::Image(image) => {
            arg(&mut inner, &"run");
            if let Some(vm) = &image.vm_config {
                arg(&mut inner, &"--config");
                if jail.is_some() {
                    // The whole image directory goes in: vm.toml's relative paths stay
                    // valid beside it.
                    let dir = vm.parent().unwrap_or(Path::new("/"));
                    let inside = PathBuf::from(file(&mut outer, dir)?).join("vm.toml");
                    arg(&mut inner, &inside);
                } else {
                    arg(&mut inner, vm);
                }
            }
            if let Some(kernel) = &image.kernel {
                arg(&mut inner, &"--kernel");
                let k = file(&mut outer, kernel)?;
                arg(&mut inner, &k);
            }
            if let Some(initrd) = &image.initrd {
                arg(&mut inner, &"--initrd");
                let i = file(&mut outer, initrd)?;
                arg(&mut inner, &i);
            }
            if let Some(store) = &image.store {
                // The store's image is the root disk; kiln gives the VM an overlay for it.
                arg(&mut inner, &"--image");
                arg(&mut inner, &image.name);
                if jail.is_some() {
                    // The jail links it in as /images/<name>, the inner kiln's store.
                    outer.extend(["--image".into(), image.name.clone().into()]);
                    outer.extend(["--store".into(), store.into()]);
                } else {
                    arg(&mut inner, &"--store");
                    arg(&mut inner, store);
                }
            }
            if image.vm_config.is_none() {
                arg(&mut inner, &"--memory");
                arg(&mut inner, &config.memory_mib.to_string());
                arg(&mut inner, &"--vcpus");
                arg(&mut inner, &config.vcpus.to_string());
            }
        }
        Source::Snapshot { dir, .. } => {
            arg(&mut inner, &"restore");
            arg(&mut inner, &"--snapshot");
            let d = file(&mut outer, dir)?;
            arg(&mut inner, &d);
            arg(&mut inner, &"--hostname");
            arg(&mut inner, &format!("kiln-job-{}", identity.job_id));
            if jail.is_some() {
                if let Ok(name) = std::fs::read_to_string(dir.join(SNAPSHOT_IMAGE_FILE)) {
                    crate::store::check_name("the snapshot's store image", name.trim())?;
                    outer.extend(["--image".into(), name.trim().into()]);
                    outer.extend(["--store".into(), config.image_store.clone().into()]);
                }
            }
        }
    }
    let (vsock, api, console): (OsString, OsString, OsString) = match jail {
        Some(_) => (JAIL_VSOCK.into(), JAIL_API.into(), JAIL_CONSOLE.into()),
        None => (job.vsock().into(), job.api().into(), job.console().into()),
    };
    inner.extend(["--vsock".into(), vsock, "--api".into(), api]);
    inner.extend(["--serial".into(), console]);
    if let Some(net) = &net {
        // A restored clone needs a TAP of its own just as a new VM does, but keeps the
        // guest's address: only tap= and mac= apply to it.
        let net = match source {
            Source::Image(_) => net.clone(),
            Source::Snapshot { .. } => net
                .split(',')
                .filter(|part| part.starts_with("tap=") || part.starts_with("mac="))
                .collect::<Vec<_>>()
                .join(","),
        };
        if jail.is_some() {
            if let Some(tap) = tap_name(&net) {
                outer.extend(["--tap".into(), tap.into()]);
            }
        }
        inner.extend(["--net".into(), net.into()]);
    }
    Ok(match jail {
        None => Launch {
            args: inner,
            jail_root: None,
        },
        Some(JailConfig {
            base,
            uid,
            gid,
            uid_range,
        }) => {
            let id = jail_id(identity);
            let mut args: Vec<OsString> = vec!["jail".into(), "--id".into(), id.clone().into()];
            if let Some(uid) = uid {
                args.extend(["--uid".into(), uid.to_string().into()]);
            }
            args.extend(["--gid".into(), gid.to_string().into()]);
            if let Some(range) = uid_range {
                args.extend(["--uid-range".into(), range.into()]);
            }
            args.extend(["--base".into(), base.clone().into()]);
            args.extend(outer);
            args.push("--".into());
            args.extend(inner);
            Launch {
                args,
                jail_root: Some(base.join(id).join("root")),
            }
        }
    })
}

/// The `tap=NAME` of a `--net` string.
fn tap_name(net: &str) -> Option<&str> {
    net.split(',').find_map(|part| part.strip_prefix("tap="))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConfigFile, Env};
    use crate::store;

    fn config(jail: bool, net: Option<&str>) -> Config {
        Config::from_file(
            ConfigFile {
                jail: Some(jail),
                jail_base: Some("/jails".into()),
                net: net.map(str::to_string),
                ..ConfigFile::default()
            },
            &Env::default(),
        )
    }

    fn args(config: &Config, source: &Source, slot: u32) -> String {
        let job = JobDir { dir: "/s/j".into() };
        let identity = crate::state::tests::identity(9, "t");
        let launch = launch(config, &job, source, &identity, slot).unwrap();
        let args: Vec<_> = launch.args.iter().map(|a| a.to_string_lossy()).collect();
        args.join(" ")
    }

    fn image() -> store::Image {
        store::Image {
            name: "default".into(),
            kernel: Some("/i/kernel".into()),
            initrd: Some("/i/initrd".into()),
            vm_config: None,
            store: None,
        }
    }

    fn snapshot() -> Source {
        Source::Snapshot {
            name: "warm".into(),
            dir: "/snaps/warm".into(),
        }
    }

    #[test]
    fn unjailed_kiln_is_run_with_the_jobs_sockets() {
        let c = config(false, None);
        let tail = "--vsock /s/j/vsock.sock --api /s/j/api.sock --serial /s/j/console.log";
        assert_eq!(
            args(&c, &Source::Image(image()), 0),
            format!("run --kernel /i/kernel --initrd /i/initrd --memory 512 --vcpus 1 {tail}")
        );
        let sized = store::Image {
            kernel: None,
            initrd: None,
            vm_config: Some("/i/vm.toml".into()),
            ..image()
        };
        assert_eq!(
            args(&c, &Source::Image(sized.clone()), 0),
            format!("run --config /i/vm.toml {tail}")
        );
        let stored = store::Image {
            name: "deb".into(),
            kernel: Some("/k".into()),
            vm_config: None,
            store: Some("/st".into()),
            ..sized
        };
        assert_eq!(
            args(&c, &Source::Image(stored), 0),
            format!("run --kernel /k --image deb --store /st --memory 512 --vcpus 1 {tail}")
        );
        assert_eq!(
            args(&c, &snapshot(), 0),
            format!("restore --snapshot /snaps/warm --hostname kiln-job-9 {tail}")
        );
    }

    #[test]
    fn jailed_kiln_gets_its_files_and_tap_from_the_jail() {
        let c = config(true, Some("tap=kiln{id},ip=10.0.{id}.2/24,gw=10.0.{id}.1"));
        let jail = "jail --id job-9 --gid 1799999999 --base /jails";
        let tail = "--vsock /vsock.sock --api /api.sock --serial /console.log";
        assert_eq!(
            args(&c, &Source::Image(image()), 3),
            format!(
                "{jail} --file /i/kernel --file /i/initrd --tap kiln3 -- run --kernel /kernel \
                 --initrd /initrd --memory 512 --vcpus 1 {tail} \
                 --net tap=kiln3,ip=10.0.3.2/24,gw=10.0.3.1"
            )
        );
        // A clone keeps the guest's address: only its TAP is named.
        assert_eq!(
            args(&c, &snapshot(), 7),
            format!(
                "{jail} --file /snaps/warm --tap kiln7 -- restore --snapshot /warm \
                 --hostname kiln-job-9 {tail} --net tap=kiln7"
            )
        );
        let stored = store::Image {
            name: "deb".into(),
            kernel: Some("/k/vmlinux".into()),
            initrd: None,
            vm_config: None,
            store: Some("/st".into()),
        };
        let c = config(true, None);
        assert_eq!(
            args(&c, &Source::Image(stored), 0),
            format!(
                "{jail} --file /k/vmlinux --image deb --store /st -- run --kernel /vmlinux \
                 --image deb --memory 512 --vcpus 1 {tail}"
            )
        );
        let sized = store::Image {
            vm_config: Some("/imgs/big/vm.toml".into()),
            kernel: None,
            initrd: None,
            ..image()
        };
        assert_eq!(
            args(&c, &Source::Image(sized), 0),
            format!("{jail} --file /imgs/big -- run --config /big/vm.toml {tail}")
        );
        let job = JobDir { dir: "/s/j".into() };
        let identity = crate::state::tests::identity(9, "t");
        let l = launch(&c, &job, &snapshot(), &identity, 0).unwrap();
        assert_eq!(l.jail_root, Some(PathBuf::from("/jails/job-9/root")));
    }

    #[test]
    fn the_slot_is_the_tap_id() {
        let c = config(false, Some("tap=kiln{id},ip=10.0.{id}.2/24"));
        for slot in [0, 5] {
            let a = args(&c, &Source::Image(image()), slot);
            assert!(
                a.ends_with(&format!("--net tap=kiln{slot},ip=10.0.{slot}.2/24")),
                "{a}"
            );
        }
    }
}
