//! Files, directories and sockets that hold guest data or control a VM: created private
//! to the user kiln runs as, and never through a symbolic link or over an existing file.
//!
//! - files: `O_CREAT | O_EXCL | O_NOFOLLOW`, mode 0600 — a path that exists (a planted
//!   symlink included) is an error, so kiln never writes guest data into a file someone
//!   else chose;
//! - directories: `mkdir` with mode 0700;
//! - sockets: bound with the umask at 0177 (so the socket is 0600 from its first moment),
//!   optionally opened to one group afterwards (mode 0660, that group), and each accepted
//!   peer checked with `SO_PEERCRED`.
//!
//! Every place kiln creates such a thing goes through here.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

/// Mode of the files kiln creates.
pub const FILE_MODE: u32 = 0o600;
/// Mode of the directories kiln creates.
pub const DIR_MODE: u32 = 0o700;
/// Mode of a socket opened to a group ([`share_with_group`]).
pub const GROUP_SOCKET_MODE: u32 = 0o660;

/// Creates the new file `path` (read-write, mode 0600). Fails if anything exists there,
/// a symbolic link included.
pub fn create_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Opens `path` for appending, creating it 0600 if it does not exist. An existing path
/// must be a regular file with one name (not a symbolic link, or a hard link planted to
/// some other file), so kiln never appends guest output to a file someone else chose — or
/// a FIFO or a character device (a pipe or a terminal the output is routed to on purpose;
/// opening a FIFO waits for its reader, and writes to it block while it is full).
pub fn open_append(path: &Path) -> io::Result<File> {
    open_append_with(path, false)
}

/// [`open_append`], also readable (a capped log reads its contents to rotate them).
pub fn open_read_append(path: &Path) -> io::Result<File> {
    open_append_with(path, true)
}

fn open_append_with(path: &Path, read: bool) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(read)
        .append(true)
        .create(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = file.metadata()?;
    let kind = meta.file_type();
    if kind.is_fifo() || kind.is_char_device() {
        return Ok(file);
    }
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file, a FIFO or a character device",
        ));
    }
    if meta.nlink() != 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "the file has {} hard links; kiln writes only to a file with one",
                meta.nlink()
            ),
        ));
    }
    Ok(file)
}

/// Opens an existing file read-only without following a symbolic link in its last
/// component (a snapshot's `state` or `memory`, which kiln wrote as plain files).
pub fn open_nofollow(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "it is a symbolic link, which kiln does not follow here",
                )
            } else {
                e
            }
        })
}

/// Creates the new directory `path` with mode 0700 (its parent must exist).
pub fn create_dir(path: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new().mode(DIR_MODE).create(path)
}

/// The directory `path`: created 0700 if missing (parents as `mkdir -p` would), else it
/// must be a directory itself, not a symbolic link to one.
pub fn ensure_dir(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "exists and is not a directory (a symbolic link is not followed)",
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)?;
            }
            create_dir(path)
        }
        Err(e) => Err(e),
    }
}

/// Binds a Unix stream socket at `path` with mode 0600: the process umask is 0177 for the
/// duration of the bind, so no client can connect through a wider mode in between.
pub fn bind_socket(path: &Path) -> io::Result<UnixListener> {
    // SAFETY: umask only swaps the process's file mode mask; it cannot fail.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    bound
}

/// Opens the socket (or file) at `path` to group `gid`: owner group `gid`, mode 0660.
pub fn share_with_group(path: &Path, gid: u32) -> io::Result<()> {
    std::os::unix::fs::chown(path, None, Some(gid))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(GROUP_SOCKET_MODE))
}

/// The group id of the group named `name` (or a number).
pub fn group_id(name: &str) -> io::Result<u32> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    let not_found = || io::Error::new(io::ErrorKind::NotFound, format!("no group {name:?}"));
    let c_name = std::ffi::CString::new(name.as_bytes()).map_err(|_| not_found())?;
    let mut group = std::mem::MaybeUninit::<libc::group>::uninit();
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call: the NUL-terminated name, the group
    // struct and the buffer (with its true length) it fills, and `result`.
    let rc = unsafe {
        libc::getgrnam_r(
            c_name.as_ptr(),
            group.as_mut_ptr(),
            buf.as_mut_ptr(),
            buf.len(),
            &raw mut result,
        )
    };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    if result.is_null() {
        return Err(not_found());
    }
    // SAFETY: getgrnam_r returned 0 with a non-null result: it filled `group`.
    Ok(unsafe { group.assume_init() }.gr_gid)
}

/// Who may use a VM's sockets besides the file mode: this user and root always; with a
/// socket group, anyone the file mode lets in (the group's members).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerPolicy {
    /// Set when the socket was opened to a group: the kernel's mode check is the gate.
    group: Option<u32>,
    /// This process's effective uid, read when the policy is made (the threads that check
    /// peers run under seccomp filters that do not allow asking again).
    me: u32,
}

impl Default for PeerPolicy {
    fn default() -> Self {
        Self::new(None)
    }
}

impl PeerPolicy {
    /// Only this user and root, or with `group`, whoever the socket's mode lets in.
    pub fn new(group: Option<u32>) -> Self {
        // SAFETY: geteuid has no arguments and cannot fail.
        let me = unsafe { libc::geteuid() };
        PeerPolicy { group, me }
    }

    /// Whether the connected `peer` may talk to the VM (logged by the caller if not).
    pub fn allows(&self, peer: &UnixStream) -> Result<(), PeerRefused> {
        if self.group.is_some() {
            return Ok(());
        }
        let uid = peer_uid(peer).map_err(PeerRefused::Credentials)?;
        let me = self.me;
        if uid == me || uid == 0 {
            Ok(())
        } else {
            Err(PeerRefused::Stranger { uid, me })
        }
    }
}

/// Why [`PeerPolicy::allows`] turned a client away.
#[derive(Debug, thiserror::Error)]
pub enum PeerRefused {
    /// `SO_PEERCRED` failed.
    #[error("cannot read the peer's credentials: {0}")]
    Credentials(#[source] io::Error),
    /// The peer runs as another user.
    #[error("peer uid {uid} is neither this user ({me}) nor root")]
    Stranger {
        /// The peer's uid.
        uid: u32,
        /// This process's effective uid.
        me: u32,
    },
}

/// The uid of the process at the other end of `stream` (`SO_PEERCRED`).
pub fn peer_uid(stream: &UnixStream) -> io::Result<u32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::ucred>())
        .map_err(|_| io::Error::other("ucred size"))?;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given, and the fd is an
    // open socket owned by `stream`.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::from_mut(&mut cred).cast(),
            &raw mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// A random suffix for a temporary file name, from the kernel's entropy.
pub fn random_suffix() -> String {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the buffer it is given.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if usize::try_from(n).ok() != Some(bytes.len()) {
        // Still unique enough with O_EXCL, which is the real guard.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        bytes = (u64::from(t.subsec_nanos()) ^ t.as_secs() ^ u64::from(std::process::id()))
            .to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether the path is a valid single name (no `/`, not `.`/`..`, no NUL).
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.as_bytes().contains(&0)
        && Path::new(name).as_os_str().as_bytes() == name.as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("kiln-private-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn files_dirs_and_sockets_are_private_and_links_are_not_followed() {
        let d = scratch("modes");
        let f = d.join("f");
        create_file(&f).unwrap();
        assert_eq!(mode(&f), 0o600);
        assert_eq!(
            create_file(&f).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        let victim = d.join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        let link = d.join("link");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        assert!(create_file(&link).is_err());
        assert!(open_append(&link).is_err());
        assert!(open_nofollow(&link).is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        let a = d.join("append");
        open_append(&a).unwrap();
        assert_eq!(mode(&a), 0o600);
        open_append(&a).unwrap();
        // A FIFO (with its reader waiting) and a character device are output routed on
        // purpose; a directory is not.
        let fifo = d.join("fifo");
        let c_fifo = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo reads a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o600) }, 0);
        let _reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        open_append(&fifo).unwrap();
        open_append(Path::new("/dev/null")).unwrap();
        assert!(open_append(&d).is_err());

        let sub = d.join("sub");
        ensure_dir(&sub).unwrap();
        assert_eq!(mode(&sub), 0o700);
        ensure_dir(&sub).unwrap();
        let dir_link = d.join("dirlink");
        std::os::unix::fs::symlink(&sub, &dir_link).unwrap();
        assert!(ensure_dir(&dir_link).is_err());

        let s = d.join("s.sock");
        let listener = bind_socket(&s).unwrap();
        assert_eq!(mode(&s), 0o600);
        let client = UnixStream::connect(&s).unwrap();
        let (server_end, _) = listener.accept().unwrap();
        PeerPolicy::default().allows(&server_end).unwrap();
        drop(client);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A client running as another uid is told apart by `SO_PEERCRED` (needs root, to be
    /// that other uid; a child process switches to `nobody` and connects).
    #[test]
    fn a_peer_of_another_uid_is_refused_unless_a_group_opens_the_socket() {
        // SAFETY: geteuid has no arguments and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root to connect as another uid");
            return;
        }
        let d = scratch("peer");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        let path = d.join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
        let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        let mut addr = libc::sockaddr_un {
            sun_family: libc::sa_family_t::try_from(libc::AF_UNIX).unwrap(),
            sun_path: [0; 108],
        };
        for (dst, src) in addr.sun_path.iter_mut().zip(c_path.as_bytes()) {
            *dst = libc::c_char::from_ne_bytes([*src]);
        }
        let addr_len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_un>()).unwrap();
        // SAFETY: the child only makes async-signal-safe calls (setuid, socket, connect,
        // _exit) on memory prepared before the fork.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
        if pid == 0 {
            // SAFETY: see the fork above; `addr` is a valid sockaddr_un for the call.
            unsafe {
                let ok = libc::setuid(65534) == 0 && {
                    let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                    fd >= 0 && libc::connect(fd, std::ptr::from_ref(&addr).cast(), addr_len) == 0
                };
                libc::_exit(if ok { 0 } else { 1 });
            }
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above.
        unsafe { libc::waitpid(pid, &raw mut status, 0) };
        assert_eq!(libc::WEXITSTATUS(status), 0, "the child could not connect");
        let (stream, _) = listener.accept().unwrap();
        assert_eq!(peer_uid(&stream).unwrap(), 65534);
        let refused = PeerPolicy::new(None).allows(&stream).unwrap_err();
        assert!(refused.to_string().contains("peer uid 65534"), "{refused}");
        PeerPolicy::new(Some(0)).allows(&stream).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn groups_by_name_and_number() {
        assert_eq!(group_id("0").unwrap(), 0);
        assert_eq!(group_id("root").unwrap(), 0);
        assert!(group_id("no-such-group-kiln").is_err());
    }

    #[test]
    fn plain_names() {
        assert!(is_plain_name("disk-0.overlay"));
        for bad in ["", ".", "..", "a/b", "/x"] {
            assert!(!is_plain_name(bad), "{bad}");
        }
        assert_ne!(random_suffix(), random_suffix());
    }
}
