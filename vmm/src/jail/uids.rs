//! A uid of its own for each jail: taken from a range (`--uid-range START:COUNT`, else
//! [`DEFAULT_UID_RANGE`]) and held exclusively for as long as the `kiln jail` process lives.
//!
//! Two VMMs under one uid could reach each other (signals, `/proc`, files one jail's uid
//! owns in the other's directory). The lease is an `flock` on `<base>/.uids/<uid>.lock`: the
//! kernel drops it when the process ends however it ends, so a crashed jailer leaves no
//! stale claim behind. The lock files stay (one per uid ever used, empty).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::str::FromStr;

use super::JailError;

/// The range jails take their uids from unless `--uid-range` says otherwise: far above the
/// ids that distributions hand to users (and to `/etc/subuid` ranges, which start at
/// 100000), so that no account of the host shares a jail's uid.
pub const DEFAULT_UID_RANGE: UidRange = UidRange {
    start: 1_800_000_000,
    count: 65_536,
};

/// `START:COUNT`: the uids `START..START+COUNT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidRange {
    pub start: u32,
    pub count: u32,
}

/// Why a `--uid-range` is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UidRangeError {
    #[error("{0:?}: expected START:COUNT, e.g. 1800000000:65536")]
    Malformed(String),
    #[error("{0:?}: the range must not include uid 0 (root)")]
    HasRoot(String),
    #[error("{0:?}: the range is empty")]
    Empty(String),
    #[error("{0:?}: the range runs past the largest uid")]
    TooHigh(String),
}

impl FromStr for UidRange {
    type Err = UidRangeError;

    fn from_str(s: &str) -> Result<Self, UidRangeError> {
        let bad = || UidRangeError::Malformed(s.into());
        let (start, count) = s.split_once(':').ok_or_else(bad)?;
        let start: u32 = start.trim().parse().map_err(|_| bad())?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        if start == 0 {
            return Err(UidRangeError::HasRoot(s.into()));
        }
        if count == 0 {
            return Err(UidRangeError::Empty(s.into()));
        }
        // u32::MAX is the "no uid" value (-1) of the chown family.
        if start
            .checked_add(count)
            .is_none_or(|end| end > u32::MAX - 1)
        {
            return Err(UidRangeError::TooHigh(s.into()));
        }
        Ok(UidRange { start, count })
    }
}

/// A uid held by this process; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct UidLease {
    pub uid: u32,
    _lock: File,
}

impl UidLease {
    /// The first uid of `range` that no other live jail holds, locked for this process.
    pub fn take(base: &Path, range: UidRange) -> Result<UidLease, JailError> {
        let dir = base.join(".uids");
        let io = |what, path: &Path| {
            let path = path.to_owned();
            move |source| JailError::Io { what, path, source }
        };
        std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io("set the mode of", &dir))?;
        for uid in range.start..range.start + range.count {
            let path = dir.join(format!("{uid}.lock"));
            let lock = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&path)
                .map_err(io("open", &path))?;
            // SAFETY: flock takes the fd of a file this function owns; no pointers.
            if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(UidLease { uid, _lock: lock });
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(io("lock", &path)(e));
            }
        }
        Err(JailError::NoFreeUid {
            start: range.start,
            count: range.count,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_and_refuse() {
        assert_eq!(
            "1000:10".parse::<UidRange>(),
            Ok(UidRange {
                start: 1000,
                count: 10
            })
        );
        for bad in [
            "",
            "1000",
            "0:10",
            "1000:0",
            "a:b",
            "4294967290:10",
            "1000:-1",
        ] {
            assert!(bad.parse::<UidRange>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn each_lease_gets_its_own_uid_and_a_released_one_is_reused() {
        let base = std::env::temp_dir().join(format!("kiln-uids-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let range = UidRange {
            start: 5000,
            count: 2,
        };
        let a = UidLease::take(&base, range).unwrap();
        let b = UidLease::take(&base, range).unwrap();
        assert_eq!((a.uid, b.uid), (5000, 5001));
        assert!(matches!(
            UidLease::take(&base, range),
            Err(JailError::NoFreeUid { .. })
        ));
        drop(a);
        assert_eq!(UidLease::take(&base, range).unwrap().uid, 5000);
        std::fs::remove_dir_all(&base).unwrap();
    }
}
