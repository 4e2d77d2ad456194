//! Named things on the host that jobs pick by name: guest images (`CI_JOB_IMAGE`) and
//! snapshots (`KILN_FROM_SNAPSHOT`, `KILN_SNAPSHOT_NAME`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use crate::contract::Contract;
use crate::identity::Identity;

/// A guest image: the directory `<images_dir>/<name>/` with `kernel` (+ optional `initrd`),
/// and/or `vm.toml`, a `kiln run --config` file (kernel, initrd, cmdline, vcpus,
/// memory_mib; relative paths are taken from the image's directory), which then also sets
/// the VM's size. Or, for a name not there, an image of kiln's image store (`kiln image
/// build|import`), booted as the root disk with the configured `image_kernel`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub name: String,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub vm_config: Option<PathBuf>,
    /// The kiln image store holding the image, for `kiln run --image NAME --store DIR`.
    pub store: Option<PathBuf>,
}

/// Where images are found.
#[derive(Debug, Clone, Copy)]
pub struct ImageSources<'a> {
    /// Kernel (+ initrd or vm.toml) directories.
    pub images_dir: &'a Path,
    /// kiln's image store, and the kernel its images boot with.
    pub store: &'a Path,
    pub store_kernel: &'a Path,
    /// The image of jobs that name none.
    pub default: &'a str,
}

/// The file of a kiln image store entry (kiln's `image::ROOTFS_FILE`).
const STORE_ROOTFS: &str = "rootfs.ext4";

fn is_store_image(dir: &Path) -> bool {
    dir.join(STORE_ROOTFS).is_file()
}

fn is_image(dir: &Path) -> bool {
    dir.join("kernel").is_file() || dir.join("vm.toml").is_file()
}

/// Checks that `name` is a plain name usable as one path component.
pub fn check_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
    if !ok {
        bail!(
            "{what} {name:?} is not a valid name: use letters, digits, `-`, `_`, `.` and `:`, \
             starting with a letter or digit"
        );
    }
    Ok(())
}

/// The image the job asks for (`CI_JOB_IMAGE`), else the default, looked up in this order:
/// a kernel image directory of that name, an image of kiln's store of that name, else a
/// registry reference that `pull` brings into the store (`crate::pull`), returning the
/// store name it has there.
pub fn image(
    sources: &ImageSources,
    contract: &Contract,
    pull: &dyn Fn(&str) -> Result<String>,
) -> Result<Image> {
    let name = contract.var("CI_JOB_IMAGE").unwrap_or(sources.default);
    let plain = check_name("image", name);
    if plain.is_ok() {
        let dir = sources.images_dir.join(name);
        if is_image(&dir) {
            let file = |f: &str| Some(dir.join(f)).filter(|p| p.is_file());
            return Ok(Image {
                name: name.to_string(),
                kernel: file("kernel"),
                initrd: file("initrd"),
                vm_config: file("vm.toml"),
                store: None,
            });
        }
        if is_store_image(&sources.store.join(name)) {
            return store_image(sources, name);
        }
    }
    let not_here = || {
        format!(
            "no guest image {name:?} in {} (kernel images: {}) or in the kiln image store {} \
             (images: {})",
            sources.images_dir.display(),
            listing(sources.images_dir, is_image),
            sources.store.display(),
            listing(sources.store, is_store_image)
        )
    };
    if !is_reference(name) {
        plain?;
        bail!("{}", not_here());
    }
    match pull(name) {
        Ok(stored) => store_image(sources, &stored),
        Err(e) => bail!("{}, and it could not be pulled: {e:#}", not_here()),
    }
}

/// Image `name` of kiln's store, booted with the store kernel.
fn store_image(sources: &ImageSources, name: &str) -> Result<Image> {
    if !sources.store_kernel.is_file() {
        bail!(
            "image {name:?} is in the kiln image store {}, but the kernel to boot it, {}, \
             is missing: set image_kernel in the driver config",
            sources.store.display(),
            sources.store_kernel.display()
        );
    }
    Ok(Image {
        name: name.to_string(),
        kernel: Some(sources.store_kernel.to_owned()),
        initrd: None,
        vm_config: None,
        store: Some(sources.store.to_owned()),
    })
}

/// Whether `name` can be an image reference (`[REGISTRY/]REPOSITORY[:TAG][@DIGEST]`): the
/// characters those use, and no path tricks (`..`, a leading or doubled `/`), so that what
/// reaches `kiln image pull` is a reference or a clear refusal, never a path.
pub fn is_reference(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 512
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/' | '@'))
        && !name
            .split('/')
            .any(|part| part.is_empty() || part == ".." || part == ".")
}

/// The snapshot store of the job's project and ref protection:
/// `<snapshot_dir>/project-<id>/protected` or `…/unprotected`, both from the job response
/// (never from job variables), so that one project's jobs never start from another
/// project's VM, and a job on a protected ref never starts from (nor sees) what a job on an
/// unprotected ref wrote, nor the other way round (a protected job's VM can hold protected
/// variables).
pub fn snapshot_scope(snapshot_dir: &Path, identity: &Identity) -> PathBuf {
    let protection = if identity.protected {
        "protected"
    } else {
        "unprotected"
    };
    snapshot_dir
        .join(format!("project-{}", identity.project_id))
        .join(protection)
}

/// The existing snapshot `name` in `scope`.
pub fn existing_snapshot(scope: &Path, name: &str) -> Result<PathBuf> {
    check_name("snapshot", name)?;
    let dir = scope.join(name);
    if !dir.join("state").is_file() {
        bail!(
            "no snapshot {name:?} in {}; the snapshots there are: {} (a job makes one with \
             KILN_SNAPSHOT_AFTER=<stage> and KILN_SNAPSHOT_NAME={name})",
            scope.display(),
            listing(scope, |d| d.join("state").is_file())
        );
    }
    Ok(dir)
}

/// The names of the directories in `dir` that `keep` accepts, sorted, or `(none)`.
fn listing(dir: &Path, keep: impl Fn(&Path) -> bool) -> String {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| keep(&e.path()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    if names.is_empty() {
        "(none)".to_string()
    } else {
        names.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contract(pairs: &[(&str, &str)]) -> Contract {
        Contract::from_vars(
            pairs
                .iter()
                .map(|(k, v)| (format!("CUSTOM_ENV_{k}"), v.to_string())),
        )
    }

    #[test]
    fn images_are_chosen_by_name_and_unknown_ones_listed() {
        let dir = std::env::temp_dir().join(format!("kiln-gitlab-images-{}", std::process::id()));
        for (name, initrd) in [("default", true), ("alpine:3", false)] {
            std::fs::create_dir_all(dir.join(name)).unwrap();
            std::fs::write(dir.join(name).join("kernel"), b"k").unwrap();
            if initrd {
                std::fs::write(dir.join(name).join("initrd"), b"i").unwrap();
            }
        }
        std::fs::create_dir_all(dir.join("empty")).unwrap();
        std::fs::create_dir_all(dir.join("disk")).unwrap();
        std::fs::write(dir.join("disk/vm.toml"), b"kernel = \"k\"\n").unwrap();
        let store = dir.join("store");
        std::fs::create_dir_all(store.join("deb")).unwrap();
        std::fs::write(store.join("deb/rootfs.ext4"), b"fs").unwrap();
        let kernel = dir.join("default/kernel");
        let sources = ImageSources {
            images_dir: &dir,
            store: &store,
            store_kernel: &kernel,
            default: "default",
        };
        let no_pull = |r: &str| -> Result<String> { bail!("registry unreachable for {r}") };
        let image = |c: &Contract| image(&sources, c, &no_pull);
        let img = image(&contract(&[])).unwrap();
        assert_eq!(img.name, "default");
        assert!(img.initrd.is_some());
        let img = image(&contract(&[("CI_JOB_IMAGE", "alpine:3")])).unwrap();
        assert_eq!((img.name.as_str(), img.initrd), ("alpine:3", None));
        let img = image(&contract(&[("CI_JOB_IMAGE", "disk")])).unwrap();
        assert_eq!((img.kernel, img.vm_config.is_some()), (None, true));
        let err = image(&contract(&[("CI_JOB_IMAGE", "ubuntu")])).unwrap_err();
        assert!(
            err.to_string()
                .contains("kernel images: alpine:3, default, disk) or in the kiln image store"),
            "{err}"
        );
        assert!(err.to_string().contains("(images: deb)"), "{err}");
        assert!(
            err.to_string()
                .contains("could not be pulled: registry unreachable for ubuntu"),
            "{err}"
        );
        let err = image(&contract(&[("CI_JOB_IMAGE", "../etc")])).unwrap_err();
        assert!(!err.to_string().contains("pulled"), "{err}");
        // A reference is pulled (here: made up) and booted from the store.
        let pulled = |r: &str| -> Result<String> {
            assert_eq!(r, "127.0.0.1:5000/tools/deb:1");
            Ok("deb".to_string())
        };
        let img = super::image(
            &sources,
            &contract(&[("CI_JOB_IMAGE", "127.0.0.1:5000/tools/deb:1")]),
            &pulled,
        )
        .unwrap();
        assert_eq!(
            (img.name.as_str(), img.store.as_deref()),
            ("deb", Some(store.as_path()))
        );
        for bad in ["a//b", "a/../b", "/abs", "a b", "a/./b"] {
            assert!(!is_reference(bad), "{bad}");
        }
        let img = image(&contract(&[("CI_JOB_IMAGE", "deb")])).unwrap();
        assert_eq!(img.store.as_deref(), Some(store.as_path()));
        assert_eq!(img.kernel.as_deref(), Some(kernel.as_path()));
        let no_kernel = ImageSources {
            store_kernel: Path::new("/nonexistent/kernel"),
            ..sources
        };
        let err =
            super::image(&no_kernel, &contract(&[("CI_JOB_IMAGE", "deb")]), &no_pull).unwrap_err();
        assert!(err.to_string().contains("image_kernel"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn snapshots_are_scoped_by_project_and_protection() {
        let root = Path::new("/snaps");
        let mut id = crate::state::tests::identity(1, "t");
        id.project_id = 12;
        assert_eq!(
            snapshot_scope(root, &id),
            PathBuf::from("/snaps/project-12/unprotected")
        );
        id.protected = true;
        assert_eq!(
            snapshot_scope(root, &id),
            PathBuf::from("/snaps/project-12/protected")
        );
        let err = existing_snapshot(Path::new("/nonexistent"), "warm").unwrap_err();
        assert!(err.to_string().contains("(none)"), "{err}");
        assert!(check_name("snapshot", "a/b").is_err());
        assert!(check_name("snapshot", ".hidden").is_err());
        assert!(check_name("snapshot", "warm-1.x").is_ok());
    }
}
