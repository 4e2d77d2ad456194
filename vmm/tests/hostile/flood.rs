//! A guest that floods: it writes a read-only virtio-mmio register and prints a byte on the
//! serial console in a tight loop, for [`FLOOD`]. kiln's log (its stderr, a file as under
//! `kiln-gitlab`) stays small because guest-triggered warnings are rate-limited, the console
//! file stays under its cap with one rotated copy, and the VM keeps running throughout.

use std::fs::File;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln::logcap::rotated_path;
use kiln_devices::guest_warn::{WARN_BURST, WARN_PER_SEC};

use crate::guest::{self, reg, Code};

/// How long the guest floods.
const FLOOD: Duration = Duration::from_secs(30);
/// The console cap the test sets (small, so that the flood rotates it many times).
const CONSOLE_CAP: u64 = 64 * 1024;
/// The log cap the test sets: far above what the rate limit lets through, so that the log
/// staying small shows the rate limit, not the cap.
const LOG_CAP: u64 = 4 << 20;
/// What the log may hold after the flood: the rate limit's burst plus its rate over the
/// flood's length, a "suppressed" line each, at most ~250 bytes a line, with room for kiln's
/// start-up and shutdown lines.
const LOG_BOUND: u64 =
    (WARN_BURST as u64 + WARN_PER_SEC as u64 * FLOOD.as_secs()) * 2 * 250 + 16 * 1024;

#[test]
fn hostile_mmio_and_console_flood_stays_under_the_caps() {
    let dir = crate::util::scratch("flood");
    let code = Code::new(guest::VSOCK).forever(|c| {
        c.write(reg::MAGIC, 0x1234_5678).print(b'x');
    });
    std::fs::write(dir.join("guest.elf"), kiln_tests::tiny_kernel::elf(&code)).unwrap();
    let log_path = dir.join("kiln.log");
    let console = dir.join("console.log");
    let mut kiln = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("run")
        .args(["--memory", "64"])
        .arg("--kernel")
        .arg(dir.join("guest.elf"))
        .arg("--vsock")
        .arg(dir.join("v.sock"))
        .arg("--serial")
        .arg(&console)
        .env("KILN_LOG", "info")
        .env("KILN_CONSOLE_MAX_BYTES", CONSOLE_CAP.to_string())
        .env("KILN_LOG_MAX_BYTES", LOG_CAP.to_string())
        .stdin(Stdio::null())
        .stdout(File::create(dir.join("kiln.out")).unwrap())
        .stderr(File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    // The flood itself: the VM must still run at every check, and the files stay capped.
    while started.elapsed() < FLOOD {
        std::thread::sleep(Duration::from_secs(1));
        assert!(
            kiln.try_wait().unwrap().is_none(),
            "kiln exited during the flood; log:\n{}",
            log()
        );
        let size = |p: &std::path::Path| std::fs::metadata(p).map_or(0, |m| m.len());
        assert!(size(&console) <= CONSOLE_CAP, "console {}", size(&console));
        assert!(size(&rotated_path(&console)) <= CONSOLE_CAP);
        assert!(
            size(&log_path) <= LOG_BOUND,
            "log {}:\n{}",
            size(&log_path),
            log()
        );
    }
    // SAFETY: kill(2) on the child this test spawned and has not reaped yet.
    assert_eq!(unsafe { libc::kill(kiln.id() as i32, libc::SIGTERM) }, 0);
    let status = kiln.wait().unwrap();
    let log = log();
    // kiln stops the VM on SIGTERM and exits 128 + 15, as after any signal it handles.
    assert_eq!(status.code(), Some(143), "kiln: {status}; log:\n{log}");
    assert!(!log.contains("panicked"), "{log}");
    // The guest did flood: its writes were refused and counted, the console rotated.
    assert!(
        log.contains("read-only or unknown register"),
        "no warning for the guest's writes:\n{log}"
    );
    assert!(
        log.contains("guest-triggered warnings were suppressed"),
        "the rate limit never dropped a line:\n{log}"
    );
    let old = std::fs::read(rotated_path(&console)).unwrap();
    assert!(
        old.len() as u64 > CONSOLE_CAP / 2 && old.iter().all(|&b| b == b'x'),
        "the console never rotated: {} bytes in console.log.1",
        old.len()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
