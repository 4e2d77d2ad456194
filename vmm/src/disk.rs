//! Disks on a VM: what `--disk PATH[,ro][,rw][,root][,overlay=P][,serial=ID]` and the
//! `[[disk]]` tables of a config file say, the checks that turn a bad image into one clear
//! error before any KVM object exists, and the sparse file copy that snapshots use for
//! overlays.
//!
//! Disks become virtio-blk devices on the MMIO bus in the order given: `/dev/vda`,
//! `/dev/vdb`, …. With `overlay=P` the image is a shared, read-only base and the guest's
//! writes go to the per-VM overlay file P (which must not exist yet; see
//! `kiln_devices::virtio::block::Overlay`).

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The ext4 superblock magic, at byte [`EXT4_MAGIC_OFFSET`] of the filesystem.
pub const EXT4_MAGIC: u16 = 0xEF53;
/// Where the magic sits: superblock at 1024, `s_magic` at offset 56 in it.
pub const EXT4_MAGIC_OFFSET: u64 = 1080;
/// The init a root disk boots when the command line names none (and there is no
/// initramfs): the guest agent, where kiln images install it.
pub const ROOT_INIT: &str = "/sbin/kiln-agent";
/// How many disks a VM may have: IOAPIC pins 5..=23 less the vsock device's.
pub const MAX_DISKS: usize = 16;

/// One disk of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// The image (raw). With `overlay`, the read-only base.
    pub path: PathBuf,
    /// The guest may not write (virtio-blk `VIRTIO_BLK_F_RO`); the image is opened O_RDONLY.
    #[serde(default)]
    pub read_only: bool,
    /// Writes go to this per-VM copy-on-write file (created; must not exist yet).
    #[serde(default)]
    pub overlay: Option<PathBuf>,
    /// Write to the image itself even under `kiln job` (which otherwise gives the VM a
    /// temporary overlay).
    #[serde(default)]
    pub rw: bool,
    /// Boot from this disk: `root=/dev/vdX` on the kernel command line. Must be ext4.
    #[serde(default)]
    pub root: bool,
    /// What GET_ID answers (at most 20 bytes); default: from the image's device and inode.
    #[serde(default)]
    pub serial: Option<String>,
}

impl DiskConfig {
    /// A writable raw disk at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        DiskConfig {
            path: path.into(),
            read_only: false,
            overlay: None,
            rw: false,
            root: false,
            serial: None,
        }
    }
}

impl std::str::FromStr for DiskConfig {
    type Err = DiskError;

    /// `PATH[,ro][,rw][,root][,overlay=P][,serial=ID]`.
    fn from_str(s: &str) -> Result<Self, DiskError> {
        let mut parts = s.split(',');
        let path = parts.next().unwrap_or_default();
        if path.is_empty() {
            return Err(DiskError::NoPath(s.into()));
        }
        let mut d = DiskConfig::new(path);
        for opt in parts {
            match opt.split_once('=') {
                None if opt == "ro" => d.read_only = true,
                None if opt == "rw" => d.rw = true,
                None if opt == "root" => d.root = true,
                Some(("overlay", p)) if !p.is_empty() => d.overlay = Some(PathBuf::from(p)),
                Some(("serial", id)) => d.serial = Some(id.to_string()),
                _ => {
                    return Err(DiskError::UnknownOption {
                        spec: s.into(),
                        option: opt.into(),
                    })
                }
            }
        }
        Ok(d)
    }
}

/// A disk that cannot be attached, and why.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("--disk {0:?}: no image path (PATH[,ro][,rw][,root][,overlay=P][,serial=ID])")]
    NoPath(String),
    #[error("--disk {spec:?}: unknown option {option:?}; options are ro, rw, root, overlay=PATH, serial=ID")]
    UnknownOption { spec: String, option: String },
    #[error("cannot open disk image {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("disk image {0} is a directory; give an image file")]
    Directory(PathBuf),
    #[error("disk image {path} is {len} bytes, not a multiple of 512 (the sector size); resize it, e.g. `truncate -s 64M`")]
    NotSectors { path: PathBuf, len: u64 },
    #[error("disk image {0} is empty")]
    Empty(PathBuf),
    #[error("root disk {0} is not an ext4 filesystem (no superblock magic 0xEF53 at byte 1080)")]
    NotExt4(PathBuf),
    #[error("disk {0}: `ro` and `{1}` contradict each other")]
    Conflict(PathBuf, &'static str),
    #[error("disk {0}: `rw` and `overlay=` contradict each other (an overlay keeps the image read-only)")]
    RwOverlay(PathBuf),
    #[error("overlay {path} already exists; each VM needs a new overlay file")]
    OverlayExists { path: PathBuf },
    #[error("cannot create overlay {path}: {reason}")]
    OverlayDir { path: PathBuf, reason: String },
    #[error("more than one disk is marked `root`")]
    TwoRoots,
    #[error("{0} disks: a VM takes at most {MAX_DISKS}")]
    TooMany(usize),
    #[error("disk serial {0:?} is longer than 20 bytes")]
    SerialTooLong(String),
}

/// Checks every disk as far as can be done without opening it for writing: the image exists,
/// is a regular file of whole sectors, is ext4 if it is the root, and an overlay can be
/// created where it is asked for.
pub fn validate(disks: &[DiskConfig]) -> Result<(), DiskError> {
    if disks.len() > MAX_DISKS {
        return Err(DiskError::TooMany(disks.len()));
    }
    if disks.iter().filter(|d| d.root).count() > 1 {
        return Err(DiskError::TwoRoots);
    }
    for d in disks {
        check_disk(d)?;
    }
    Ok(())
}

fn check_disk(d: &DiskConfig) -> Result<(), DiskError> {
    let path = &d.path;
    if d.read_only && d.rw {
        return Err(DiskError::Conflict(path.clone(), "rw"));
    }
    if d.read_only && d.overlay.is_some() {
        return Err(DiskError::Conflict(path.clone(), "overlay="));
    }
    if d.rw && d.overlay.is_some() {
        return Err(DiskError::RwOverlay(path.clone()));
    }
    if let Some(s) = &d.serial {
        if s.len() > kiln_devices::virtio::block::SERIAL_LEN {
            return Err(DiskError::SerialTooLong(s.clone()));
        }
    }
    let open = |source| DiskError::Open {
        path: path.clone(),
        source,
    };
    let mut file = File::open(path).map_err(open)?;
    let meta = file.metadata().map_err(open)?;
    if meta.is_dir() {
        return Err(DiskError::Directory(path.clone()));
    }
    let len = meta.len();
    if len == 0 {
        return Err(DiskError::Empty(path.clone()));
    }
    if len % 512 != 0 {
        return Err(DiskError::NotSectors {
            path: path.clone(),
            len,
        });
    }
    file.read(&mut [0u8; 1]).map_err(open)?;
    if d.root && !is_ext4(&file) {
        return Err(DiskError::NotExt4(path.clone()));
    }
    if let Some(overlay) = &d.overlay {
        check_overlay_path(overlay)?;
    }
    Ok(())
}

/// Whether `file` holds an ext2/3/4 superblock magic.
pub fn is_ext4(file: &File) -> bool {
    let mut magic = [0u8; 2];
    file.read_exact_at(&mut magic, EXT4_MAGIC_OFFSET).is_ok()
        && u16::from_le_bytes(magic) == EXT4_MAGIC
}

/// An overlay path must be new, in a directory that exists and that we may write.
pub fn check_overlay_path(overlay: &Path) -> Result<(), DiskError> {
    if overlay.symlink_metadata().is_ok() {
        return Err(DiskError::OverlayExists {
            path: overlay.to_owned(),
        });
    }
    let parent = match overlay.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let reason = match std::fs::metadata(parent) {
        Err(e) => format!("{}: {e}", parent.display()),
        Ok(m) if !m.is_dir() => format!("{} is not a directory", parent.display()),
        Ok(_) if !writable(parent) => format!("{} is not writable", parent.display()),
        Ok(_) => return Ok(()),
    };
    Err(DiskError::OverlayDir {
        path: overlay.to_owned(),
        reason,
    })
}

fn writable(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: access only reads the NUL-terminated path, which lives across the call.
    unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) == 0 }
}

/// The guest's name for disk `index`: vda, vdb, … vdz.
pub fn guest_name(index: usize) -> String {
    let letter = u8::try_from(index % 26).unwrap_or(0);
    format!("vd{}", char::from(b'a' + letter))
}

/// The kernel command line fragment that boots from disk `index`.
pub fn root_cmdline(index: usize, read_only: bool) -> String {
    format!(
        "root=/dev/{} {} rootfstype=ext4",
        guest_name(index),
        if read_only { "ro" } else { "rw" }
    )
}

/// Copies `src` to the new file `dst` keeping holes: only the data extents
/// (`SEEK_DATA`/`SEEK_HOLE`) are read and written, and the copy has `src`'s size. Where the
/// filesystem cannot report extents, every byte is copied.
pub fn sparse_copy(src: &Path, dst: &Path) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd;
    let from = kiln_devices::private::open_nofollow(src)?;
    let len = from.metadata()?.len();
    let to = kiln_devices::private::create_file(dst)?;
    to.set_len(len)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut copied = 0u64;
    let mut pos = 0u64;
    while pos < len {
        let seek = |from_off: u64, whence| -> std::io::Result<Option<u64>> {
            let off = libc::off_t::try_from(from_off)
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
            // SAFETY: lseek only reads its integer arguments; the fd is open.
            let r = unsafe { libc::lseek(from.as_raw_fd(), off, whence) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::ENXIO) => Ok(None),
                    _ => Err(e),
                };
            }
            Ok(u64::try_from(r).ok())
        };
        let (start, end) = match seek(pos, libc::SEEK_DATA) {
            Ok(None) => break,
            Ok(Some(start)) => (start, seek(start, libc::SEEK_HOLE)?.unwrap_or(len)),
            // No extent support here: copy the rest as data.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (pos, len),
            Err(e) => return Err(e),
        };
        let mut at = start;
        while at < end.min(len) {
            let n = usize::try_from(end.min(len) - at).map_or(buf.len(), |r| r.min(buf.len()));
            from.read_exact_at(&mut buf[..n], at)?;
            to.write_all_at(&buf[..n], at)?;
            at += n as u64;
            copied += n as u64;
        }
        pos = end;
    }
    to.sync_all()?;
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::scratch;

    #[test]
    fn parses_every_option() {
        let d: DiskConfig = "/img,ro,serial=abc".parse().unwrap();
        assert_eq!(d.path, PathBuf::from("/img"));
        assert!(d.read_only && !d.root && d.overlay.is_none());
        assert_eq!(d.serial.as_deref(), Some("abc"));
        let d: DiskConfig = "b.img,overlay=/o/x,root".parse().unwrap();
        assert_eq!(d.overlay, Some(PathBuf::from("/o/x")));
        assert!(d.root && !d.read_only);
        assert!("b.img,rw".parse::<DiskConfig>().unwrap().rw);
        let e = "b.img,bogus".parse::<DiskConfig>().unwrap_err();
        assert!(e.to_string().contains("unknown option \"bogus\""), "{e}");
        assert!(",ro".parse::<DiskConfig>().is_err());
        assert!("b,overlay=".parse::<DiskConfig>().is_err());
    }

    #[test]
    fn bad_images_are_refused_by_name() {
        let dir = scratch("disk-bad");
        let err = |d: DiskConfig| validate(&[d]).unwrap_err().to_string();
        let missing = dir.join("missing.img");
        assert!(err(DiskConfig::new(&missing)).contains("No such file"));
        assert!(err(DiskConfig::new(&dir)).contains("is a directory"));
        let odd = dir.join("odd.img");
        std::fs::write(&odd, vec![0u8; 1000]).unwrap();
        assert!(err(DiskConfig::new(&odd)).contains("not a multiple of 512"));
        let raw = dir.join("raw.img");
        std::fs::write(&raw, vec![0u8; 4096]).unwrap();
        assert!(validate(&[DiskConfig::new(&raw)]).is_ok());
        let mut root = DiskConfig::new(&raw);
        root.root = true;
        assert!(err(root.clone()).contains("not an ext4"));
        let mut sb = vec![0u8; 4096];
        sb[1080] = 0x53;
        sb[1081] = 0xEF;
        std::fs::write(&raw, &sb).unwrap();
        assert!(validate(&[root.clone()]).is_ok());
        assert!(matches!(
            validate(&[root.clone(), root]),
            Err(DiskError::TwoRoots)
        ));
        let mut ov = DiskConfig::new(&raw);
        ov.overlay = Some(raw.clone());
        assert!(err(ov.clone()).contains("already exists"));
        ov.overlay = Some(dir.join("nodir/ov"));
        assert!(err(ov.clone()).contains("cannot create overlay"));
        ov.overlay = Some(dir.join("ov"));
        assert!(validate(&[ov.clone()]).is_ok());
        ov.read_only = true;
        assert!(err(ov).contains("contradict"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let dir = scratch("disk-copy");
        let src = dir.join("src");
        let f = File::create(&src).unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(b"hello", 4096).unwrap();
        f.write_all_at(b"world", (6 << 20) + 7).unwrap();
        drop(f);
        let dst = dir.join("dst");
        let copied = sparse_copy(&src, &dst).unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        assert!(copied < 8 << 20, "copied {copied} bytes of a sparse file");
        assert!(
            sparse_copy(&src, &dst).is_err(),
            "the copy must be a new file"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn guest_names_and_root_line() {
        assert_eq!(guest_name(0), "vda");
        assert_eq!(guest_name(2), "vdc");
        assert_eq!(root_cmdline(0, false), "root=/dev/vda rw rootfstype=ext4");
    }
}
