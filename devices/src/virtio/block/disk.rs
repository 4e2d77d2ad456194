//! The backend interface and the plain raw-image backend.
//!
//! A [`Disk`] is a flat array of bytes addressed by offset. The request layer has already
//! checked every range against [`Disk::len`], so backends only turn ranges into file I/O.
//! Errors are plain `io::Error`s: the request layer turns any of them into
//! `VIRTIO_BLK_S_IOERR`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::BlockError;

/// What a block device's storage implements.
pub trait Disk: Send {
    /// Size of the disk in bytes (fixed while the device lives).
    fn len(&self) -> u64;

    /// Whether the disk has no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether writes and discards are refused.
    fn is_read_only(&self) -> bool;

    /// Fill `buf` from `offset` (the whole range lies inside the disk).
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Write all of `buf` at `offset` (the whole range lies inside the disk).
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Make every completed write durable.
    fn flush(&mut self) -> io::Result<()>;

    /// Forget `len` bytes at `offset`: afterwards they read back as zeros.
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()>;
}

/// Open `path` read-only or read-write, mapping the error to [`BlockError::Open`].
pub(crate) fn open_file(path: &Path, writable: bool) -> Result<File, BlockError> {
    OpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
        .map_err(|source| BlockError::Open {
            path: path.to_path_buf(),
            source,
        })
}

/// The size of an open file, mapping the error to [`BlockError::Open`].
pub(crate) fn file_len(file: &File, path: &Path) -> Result<u64, BlockError> {
    file.metadata()
        .map(|m| m.len())
        .map_err(|source| BlockError::Open {
            path: path.to_path_buf(),
            source,
        })
}

/// Make `offset..offset + len` of `file` read as zeros: punch a hole (keeping the size), and
/// where the filesystem cannot, write zeros.
pub(crate) fn zero_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    // SAFETY: fallocate only reads its integer arguments; the fd is open for as long as
    // `file` is borrowed, and a bad range is reported as an error, not undefined behaviour.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            n,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return Err(err);
    }
    let zeros = vec![0u8; super::BOUNCE_LEN];
    let mut done = 0;
    while done < len {
        let step = usize::try_from(len - done).map_or(zeros.len(), |r| r.min(zeros.len()));
        file.write_all_at(&zeros[..step], offset + done)?;
        done += step as u64;
    }
    Ok(())
}

/// A raw disk image: guest sector `n` is file byte `512 * n`. A trailing partial sector of
/// the file is not visible to the guest.
#[derive(Debug)]
pub struct RawFile {
    file: File,
    path: PathBuf,
    len: u64,
    read_only: bool,
}

impl RawFile {
    /// Open the image at `path`; read-only images are opened `O_RDONLY`, so even a device
    /// bug cannot write them.
    pub fn open(path: impl Into<PathBuf>, read_only: bool) -> Result<Self, BlockError> {
        let path = path.into();
        let file = open_file(&path, !read_only)?;
        let len = file_len(&file, &path)?;
        Ok(Self {
            file,
            path,
            len,
            read_only,
        })
    }

    /// The image file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn read_only_error() -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, "the disk is read-only")
}

impl Disk for RawFile {
    fn len(&self) -> u64 {
        self.len
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.read_only {
            return Err(read_only_error());
        }
        self.file.write_all_at(buf, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if self.read_only {
            return Err(read_only_error());
        }
        zero_range(&self.file, offset, len)
    }
}
