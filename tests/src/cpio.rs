//! A writer for "newc" (SVR4, magic `070701`) cpio archives: the format the Linux kernel
//! unpacks as an initramfs.
//!
//! Each entry is a 110-byte ASCII header, the NUL-terminated name padded to 4 bytes, then the
//! data padded to 4 bytes. Names are stored without a leading `/`. Parent directories that
//! were not added explicitly are added (mode 0755) before their first child, because the
//! kernel's unpacker does not create them.

use std::collections::HashSet;
use std::io::{self, Write};

const MAGIC: &str = "070701";
const TRAILER: &str = "TRAILER!!!";

/// File-type bits of `st_mode`.
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// Streams a newc archive into `W`. Call [`Writer::finish`] to write the trailer.
pub struct Writer<W: Write> {
    out: W,
    written: usize,
    next_ino: u32,
    dirs: HashSet<String>,
}

impl Writer<Vec<u8>> {
    /// A writer that builds the archive in memory.
    pub fn in_memory() -> Self {
        Writer::new(Vec::new())
    }
}

impl<W: Write> Writer<W> {
    pub fn new(out: W) -> Self {
        Writer {
            out,
            written: 0,
            next_ino: 1,
            dirs: HashSet::new(),
        }
    }

    /// Adds a directory (`mode` holds the permission bits). Adding one twice is a no-op.
    pub fn dir(&mut self, path: &str, mode: u32) -> io::Result<&mut Self> {
        let name = normalize(path)?;
        if self.dirs.contains(&name) {
            return Ok(self);
        }
        self.parents(&name)?;
        self.entry(&name, S_IFDIR | (mode & 0o7777), 2, (0, 0), &[])?;
        self.dirs.insert(name);
        Ok(self)
    }

    /// Adds a regular file with permission bits `mode`.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> io::Result<&mut Self> {
        let name = normalize(path)?;
        self.parents(&name)?;
        self.entry(&name, S_IFREG | (mode & 0o7777), 1, (0, 0), data)?;
        Ok(self)
    }

    /// Adds a symbolic link at `path` pointing to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<&mut Self> {
        let name = normalize(path)?;
        self.parents(&name)?;
        self.entry(&name, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())?;
        Ok(self)
    }

    /// Adds a character device node (e.g. `/dev/console`, 5:1).
    pub fn char_device(
        &mut self,
        path: &str,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> io::Result<&mut Self> {
        let name = normalize(path)?;
        self.parents(&name)?;
        self.entry(&name, S_IFCHR | (mode & 0o7777), 1, (major, minor), &[])?;
        Ok(self)
    }

    /// Writes the trailer and returns the sink.
    pub fn finish(mut self) -> io::Result<W> {
        self.header(TRAILER, 0, 1, (0, 0), 0, 0)?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn parents(&mut self, name: &str) -> io::Result<()> {
        if let Some((parent, _)) = name.rsplit_once('/') {
            if !self.dirs.contains(parent) {
                self.dir(parent, 0o755)?;
            }
        }
        Ok(())
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{name}: {} bytes is too large for a newc archive (4 GiB limit)",
                    data.len()
                ),
            )
        })?;
        let ino = self.next_ino;
        self.next_ino += 1;
        self.header(name, mode, nlink, rdev, size, ino)?;
        self.write(data)?;
        self.pad()
    }

    fn header(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        (rmajor, rminor): (u32, u32),
        size: u32,
        ino: u32,
    ) -> io::Result<()> {
        let namesize = u32::try_from(name.len() + 1)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file name too long"))?;
        // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
        let fields = [
            ino, mode, 0, 0, nlink, 0, size, 0, 0, rmajor, rminor, namesize, 0,
        ];
        let mut header = String::with_capacity(110);
        header.push_str(MAGIC);
        for f in fields {
            header.push_str(&format!("{f:08x}"));
        }
        self.write(header.as_bytes())?;
        self.write(name.as_bytes())?;
        self.write(&[0])?;
        self.pad()
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len();
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - self.written % 4) % 4;
        self.write(&[0u8; 3][..n])
    }
}

/// Strips leading `/` and rejects names the kernel would misplace.
fn normalize(path: &str) -> io::Result<String> {
    let name = path.trim_start_matches('/').trim_end_matches('/');
    let bad = name.is_empty()
        || name == TRAILER
        || name.contains('\0')
        || name
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{path:?} is not a usable archive path"),
        ));
    }
    Ok(name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tmp::TempDir;
    use std::os::unix::fs::PermissionsExt;
    use std::process::{Command, Stdio};

    fn sample() -> Vec<u8> {
        let mut w = Writer::in_memory();
        w.dir("/etc", 0o755).unwrap();
        w.file("/etc/kiln/rc", 0o644, b"echo hi\n").unwrap();
        w.file("/bin/busybox", 0o755, b"\x7fELF-ish").unwrap();
        w.symlink("/bin/sh", "busybox").unwrap();
        w.dir("/proc", 0o555).unwrap();
        w.file("/empty", 0o600, b"").unwrap();
        w.char_device("/dev/console", 0o600, 5, 1).unwrap();
        w.finish().unwrap()
    }

    fn cpio(args: &[&str], dir: Option<&std::path::Path>, input: &[u8]) -> String {
        let mut cmd = Command::new("cpio");
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(dir) = dir {
            cmd.current_dir(dir);
        }
        let mut child = cmd.spawn().expect("run cpio (Debian package `cpio`)");
        child.stdin.take().unwrap().write_all(input).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "cpio {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn layout_is_padded_and_ends_with_trailer() {
        let archive = sample();
        assert_eq!(archive.len() % 4, 0);
        assert!(archive.starts_with(b"070701"));
        let trailer_at = archive.len() - 124; // 110 + "TRAILER!!!\0" (11) + 3 padding
        assert_eq!(
            &archive[trailer_at + 110..trailer_at + 120],
            TRAILER.as_bytes()
        );
    }

    #[test]
    fn cpio_lists_every_entry_with_parents_first() {
        let listing = cpio(&["-t", "--quiet"], None, &sample());
        let names: Vec<&str> = listing.lines().collect();
        assert_eq!(
            names,
            [
                "etc",
                "etc/kiln",
                "etc/kiln/rc",
                "bin",
                "bin/busybox",
                "bin/sh",
                "proc",
                "empty",
                "dev",
                "dev/console"
            ]
        );
        let long = cpio(&["-t", "-v", "--quiet"], None, &sample());
        assert!(long.contains("crw-------"), "{long}");
    }

    #[test]
    fn cpio_extracts_contents_modes_and_links() {
        let dir = TempDir::new("cpio-test").unwrap();
        // Device nodes are left out: creating one needs privileges a test should not assume.
        let mut w = Writer::in_memory();
        w.file("etc/kiln/rc", 0o640, b"echo hi\n").unwrap();
        w.file("bin/tool", 0o755, &[7u8; 4099]).unwrap();
        w.symlink("bin/sh", "tool").unwrap();
        w.dir("run", 0o700).unwrap();
        let archive = w.finish().unwrap();
        cpio(&["-i", "-d", "-m", "--quiet"], Some(dir.path()), &archive);

        let p = dir.path();
        assert_eq!(std::fs::read(p.join("etc/kiln/rc")).unwrap(), b"echo hi\n");
        assert_eq!(std::fs::read(p.join("bin/tool")).unwrap(), vec![7u8; 4099]);
        let mode = |q: &str| std::fs::metadata(p.join(q)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode("etc/kiln/rc"), 0o640);
        assert_eq!(mode("bin/tool"), 0o755);
        assert_eq!(mode("run"), 0o700);
        assert_eq!(
            std::fs::read_link(p.join("bin/sh")).unwrap(),
            std::path::Path::new("tool")
        );
    }

    #[test]
    fn bad_names_are_rejected() {
        let mut w = Writer::in_memory();
        for bad in ["", "/", "a/../b", "a//b", "TRAILER!!!", "./x"] {
            assert!(w.file(bad, 0o644, b"").is_err(), "{bad:?} accepted");
        }
    }
}
