//! Size caps for the files a guest can make kiln write: the serial console file and kiln's
//! own log (its stderr, when that is a regular file, as under `kiln-gitlab`).
//!
//! Both live in a job's state directory, often on a tmpfs such as `/run`: a guest printing
//! forever must not fill it. A [`CappedFile`] keeps the file under a byte cap with one
//! rotated copy: when the next write would pass the cap, the file's contents move to
//! `<file>.1` (replacing the previous one) and the file starts again empty. At most twice the
//! cap is on disk.
//!
//! Rotation works on descriptors opened at set-up (the file for appending, the file again
//! for reading, `<file>.1` for appending), never on paths: it runs on whichever thread
//! writes (vCPU threads for the console, any thread for the log), after those threads'
//! seccomp filters allow no path syscalls. What it needs, `pread64` and `ftruncate` to
//! length 0, is in every thread's filter.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The cap of the serial console file unless `KILN_CONSOLE_MAX_BYTES` says otherwise.
pub const DEFAULT_CONSOLE_MAX_BYTES: u64 = 16 << 20;
/// The cap of kiln's log file unless `KILN_LOG_MAX_BYTES` says otherwise.
pub const DEFAULT_LOG_MAX_BYTES: u64 = 16 << 20;
/// The environment variable that sets the console file's cap in bytes (0: no cap).
pub const CONSOLE_MAX_ENV: &str = "KILN_CONSOLE_MAX_BYTES";
/// The environment variable that sets the log file's cap in bytes (0: no cap).
pub const LOG_MAX_ENV: &str = "KILN_LOG_MAX_BYTES";

/// A cap variable that does not hold a size.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}={value:?}: expected a size in bytes (0 for no cap)")]
pub struct CapEnvError {
    pub var: String,
    pub value: String,
}

/// The cap from environment variable `var`, or `default`; `None` for no cap (0).
pub fn cap_from_env(var: &str, default: u64) -> Result<Option<u64>, CapEnvError> {
    let cap = match std::env::var(var) {
        Ok(v) => v.trim().parse::<u64>().map_err(|_| CapEnvError {
            var: var.into(),
            value: v,
        })?,
        Err(_) => default,
    };
    Ok((cap > 0).then_some(cap))
}

/// A file kept under a byte cap, rotating once into `<file>.1`.
#[derive(Debug)]
pub struct CappedFile {
    /// Where writes go (append mode).
    file: File,
    /// The same file, readable: the contents to rotate.
    reader: Option<File>,
    /// `<file>.1`, opened for appending; `None` when it could not be opened (then the file is
    /// emptied at the cap and the old contents are lost).
    rotated: Option<File>,
    cap: u64,
    /// Bytes in `file` as far as this writer knows.
    len: u64,
}

/// `<path>.1`.
pub fn rotated_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

impl CappedFile {
    /// Opens (creating it) `path` for appending under `cap` bytes, with `<path>.1` beside it.
    /// Both are created 0600 and never through a link (guest output is private).
    pub fn open(path: &Path, cap: u64) -> io::Result<Self> {
        let file = kiln_devices::private::open_read_append(path)?;
        let reader = file.try_clone().ok();
        let rotated = open_rotated(path);
        Self::from_parts(file, reader, rotated, cap)
    }

    /// Wraps an open `file` (written through), `reader` (the same file, readable) and
    /// `rotated` (`<file>.1`, appended to).
    pub fn from_parts(
        file: File,
        reader: Option<File>,
        rotated: Option<File>,
        cap: u64,
    ) -> io::Result<Self> {
        let len = file.metadata()?.len();
        Ok(Self {
            file,
            reader,
            rotated,
            cap,
            len,
        })
    }

    /// Moves the contents to `<file>.1` and empties the file.
    fn rotate(&mut self) -> io::Result<()> {
        if let (Some(reader), Some(rotated)) = (&self.reader, &mut self.rotated) {
            rotated.set_len(0)?;
            let mut buf = vec![0u8; 64 * 1024];
            let mut at = 0u64;
            loop {
                let n = reader.read_at(&mut buf, at)?;
                if n == 0 {
                    break;
                }
                rotated.write_all(&buf[..n])?;
                at += n as u64;
            }
        }
        self.file.set_len(0)?;
        self.len = 0;
        Ok(())
    }
}

/// `<path>.1` for appending, if it can be opened.
fn open_rotated(path: &Path) -> Option<File> {
    kiln_devices::private::open_append(&rotated_path(path)).ok()
}

impl Write for CappedFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.len > 0 && self.len.saturating_add(buf.len() as u64) > self.cap {
            self.rotate()?;
        }
        let n = self.file.write(buf)?;
        self.len = self.len.saturating_add(n as u64);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// kiln's log writer: stderr, capped with rotation when it is a regular file (`cap`
/// `None`: never). Everything here happens once, at start-up.
pub fn log_writer(cap: Option<u64>) -> Box<dyn Write + Send> {
    match cap.and_then(|cap| capped_stderr(cap).ok().flatten()) {
        Some(capped) => Box::new(capped),
        None => Box::new(io::stderr()),
    }
}

/// stderr as a [`CappedFile`], if it is a regular file.
fn capped_stderr(cap: u64) -> io::Result<Option<CappedFile>> {
    use std::os::fd::{AsFd, AsRawFd};
    let stderr = io::stderr();
    let fd = stderr.as_fd().try_clone_to_owned()?;
    let file = File::from(fd);
    if !file.metadata()?.file_type().is_file() {
        return Ok(None);
    }
    // Appending from now on: after a rotation empties the file, writes start at its start
    // again, whatever the offset that the file's opener (and stdout, sharing it) left.
    // SAFETY: F_GETFL/F_SETFL on a descriptor this function owns; no memory is passed.
    unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_APPEND);
        }
    }
    let path = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).ok();
    let reader = path.as_deref().and_then(|p| File::open(p).ok());
    let rotated = path.as_deref().and_then(open_rotated);
    CappedFile::from_parts(file, reader, rotated, cap).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::scratch;

    #[test]
    fn rotates_once_at_the_cap_and_keeps_the_newest() {
        let dir = scratch("logcap-rotate");
        let path = dir.join("console.log");
        let mut f = CappedFile::open(&path, 100).unwrap();
        for i in 0..50u8 {
            f.write_all(&[b'a' + i % 26; 10]).unwrap();
        }
        let main = std::fs::read(&path).unwrap();
        let old = std::fs::read(rotated_path(&path)).unwrap();
        assert!(
            main.len() <= 100 && old.len() <= 100,
            "{} {}",
            main.len(),
            old.len()
        );
        // 500 bytes in 10-byte lines: the last 100 are in the file, the 100 before in .1.
        assert_eq!(main.len(), 100);
        assert_eq!(main[90..], [b'a' + 49 % 26; 10]);
        assert_eq!(old.len(), 100);
        assert_eq!(old[90..], [b'a' + 39 % 26; 10]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_existing_file_counts_toward_the_cap() {
        let dir = scratch("logcap-existing");
        let path = dir.join("log");
        std::fs::write(&path, [b'x'; 95]).unwrap();
        let mut f = CappedFile::open(&path, 100).unwrap();
        f.write_all(b"0123456789").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"0123456789");
        assert_eq!(std::fs::read(rotated_path(&path)).unwrap(), [b'x'; 95]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn without_a_rotated_file_the_file_is_emptied_at_the_cap() {
        let dir = scratch("logcap-norotate");
        let path = dir.join("log");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        let mut f = CappedFile::from_parts(file, None, None, 20).unwrap();
        for _ in 0..100 {
            f.write_all(b"abcdefgh").unwrap();
        }
        assert!(std::fs::read(&path).unwrap().len() <= 20);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn caps_from_the_environment() {
        assert_eq!(cap_from_env("KILN_TEST_UNSET_CAP", 7), Ok(Some(7)));
        std::env::set_var("KILN_TEST_CAP_ZERO", "0");
        assert_eq!(cap_from_env("KILN_TEST_CAP_ZERO", 7), Ok(None));
        std::env::set_var("KILN_TEST_CAP_BAD", "lots");
        assert!(cap_from_env("KILN_TEST_CAP_BAD", 7).is_err());
    }
}
