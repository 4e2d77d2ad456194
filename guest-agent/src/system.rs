//! Machine-wide actions on the real guest: clock, entropy, reboot.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;

use kiln_agent::server::System;

/// `RNDADDENTROPY` (`_IOW('R', 0x03, int[2])`), on a random device.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;

/// The guest this agent is PID 1 of.
pub struct Guest;

impl System for Guest {
    fn set_time(&self, unix_nanos: u64) -> io::Result<()> {
        let ts = libc::timespec {
            tv_sec: libc::time_t::try_from(unix_nanos / 1_000_000_000).map_err(io::Error::other)?,
            tv_nsec: libc::c_long::try_from(unix_nanos % 1_000_000_000)
                .map_err(io::Error::other)?,
        };
        // SAFETY: clock_settime reads `ts`, which lives across the call.
        if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn add_entropy(&self, bytes: &[u8]) -> io::Result<()> {
        let too_big = || io::Error::other("too many entropy bytes");
        let len = i32::try_from(bytes.len()).map_err(|_| too_big())?;
        let bits = len.checked_mul(8).ok_or_else(too_big)?;
        // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
        let mut info = Vec::with_capacity(8 + bytes.len());
        info.extend_from_slice(&bits.to_ne_bytes());
        info.extend_from_slice(&len.to_ne_bytes());
        info.extend_from_slice(bytes);
        let dev = OpenOptions::new().write(true).open("/dev/urandom")?;
        // SAFETY: the kernel reads a rand_pool_info of `8 + len` bytes from `info`, which
        // lives across the call.
        if unsafe { libc::ioctl(dev.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn shutdown(&self) -> io::Result<()> {
        Err(crate::power::reboot())
    }
}
