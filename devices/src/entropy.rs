//! Random bytes from the host kernel's CSPRNG (getrandom(2)): what the virtio-rng device
//! hands the guest, a new VM's MAC address, the entropy a restored clone is reseeded with.

use std::io;

/// Fills `buf` from getrandom(2), retrying short reads and interruptions. Once the host's
/// pool is initialized (always, long before a VMM starts) this does not block.
pub fn fill_random(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`, which we own
        // for the duration of the call.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        match usize::try_from(n) {
            Ok(n) => filled += n,
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_filled_and_differ() {
        let (mut a, mut b) = ([0u8; 64], [0u8; 64]);
        fill_random(&mut a).unwrap();
        fill_random(&mut b).unwrap();
        assert_ne!(a, b);
        assert_ne!(a, [0u8; 64]);
        fill_random(&mut []).unwrap();
    }
}
