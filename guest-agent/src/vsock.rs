//! The agent's vsock listener.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use kiln_agent::server::Server;

/// `IOCTL_VM_SOCKETS_GET_LOCAL_CID` (`_IO(7, 0xb9)`), on `/dev/vsock`.
const IOCTL_VM_SOCKETS_GET_LOCAL_CID: libc::c_ulong = 0x7b9;

/// The lowest CID a guest can have (0–2 are the hypervisor, local loopback and the host).
const FIRST_GUEST_CID: u32 = 3;

/// True if the VM has a vsock device: the kernel reports a guest CID. Without one it
/// reports `VMADDR_CID_ANY`, or `VMADDR_CID_LOCAL` when the loopback transport is built in.
pub fn device_present() -> bool {
    local_cid().is_ok_and(|cid| cid != libc::VMADDR_CID_ANY && cid >= FIRST_GUEST_CID)
}

/// The guest's CID, or `VMADDR_CID_ANY` if no vsock transport has a device.
fn local_cid() -> io::Result<u32> {
    let dev = File::open("/dev/vsock")?;
    let mut cid: u32 = libc::VMADDR_CID_ANY;
    // SAFETY: the ioctl writes one u32 to `cid`, which lives across the call.
    if unsafe { libc::ioctl(dev.as_raw_fd(), IOCTL_VM_SOCKETS_GET_LOCAL_CID, &mut cid) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cid)
}

/// Listens on vsock `port` on every transport (the device's, and loopback if built in).
pub fn listen(port: u32) -> io::Result<OwnedFd> {
    // SAFETY: socket only creates a descriptor, owned right below.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; all-zero is valid and the fields are set below.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::sa_family_t::try_from(libc::AF_VSOCK).map_err(io::Error::other)?;
    addr.svm_port = port;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    let len =
        libc::socklen_t::try_from(size_of::<libc::sockaddr_vm>()).map_err(io::Error::other)?;
    // SAFETY: bind reads `len` bytes from `addr`, which lives across the call.
    if unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen only changes the socket's state.
    if unsafe { libc::listen(fd.as_raw_fd(), 128) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Accepts connections forever, each served on a thread of its own.
pub fn serve(listener: &OwnedFd, server: &Arc<Server>) -> ! {
    loop {
        // SAFETY: accept4 creates a descriptor (owned below); no address is asked for.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                say!("accepting a vsock connection: {e}");
                // Back off so that a lasting failure (out of descriptors) does not flood
                // the console.
                std::thread::sleep(Duration::from_millis(100));
            }
            continue;
        }
        // SAFETY: `fd` was just returned by accept4 and nothing else owns it. A stream
        // socket reads and writes like a file.
        let conn = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        match conn.try_clone() {
            Ok(reader) => server.spawn_connection(reader, conn),
            Err(e) => say!("duplicating a vsock connection: {e}; dropping it"),
        }
    }
}
