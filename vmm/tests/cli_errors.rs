//! Bad input to `kiln run`: each gets a one-line error naming the problem and a non-zero
//! exit, never a panic.

mod util;

use util::{fails, kiln, scratch};

/// Runs `kiln run ARGS`, asserts failure without a panic, returns the error line.
fn run_fails(args: &[&str]) -> String {
    fails(kiln().arg("run").args(args))
}

#[test]
fn missing_kernel_file() {
    let line = run_fails(&["--kernel", "/nonexistent/vmlinux"]);
    assert!(
        line.contains("kernel") && line.contains("/nonexistent/vmlinux"),
        "{line}"
    );
    assert!(line.contains("No such file"), "{line}");
}

#[test]
fn a_file_that_is_not_a_kernel() {
    let dir = scratch("notakernel");
    let file = dir.join("notes.txt");
    std::fs::write(
        &file,
        "just some text, long enough to not be empty\n".repeat(40),
    )
    .unwrap();
    let line = run_fails(&["--kernel", file.to_str().unwrap()]);
    assert!(line.contains("is not a Linux kernel"), "{line}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn zero_and_absurd_memory() {
    let line = run_fails(&["--kernel", "/dev/null", "--memory", "0"]);
    assert!(
        line.contains("--memory") && line.contains("0 MiB"),
        "{line}"
    );
    let line = run_fails(&["--kernel", "/dev/null", "--memory", "999999999"]);
    assert!(
        line.contains("--memory 999999999 MiB is more than this host"),
        "{line}"
    );
    let line = run_fails(&["--kernel", "/dev/null", "--memory", "lots"]);
    assert!(line.contains("--memory"), "{line}");
}

#[test]
fn zero_and_too_many_vcpus() {
    let line = run_fails(&["--kernel", "/dev/null", "--vcpus", "0"]);
    assert!(
        line.contains("--vcpus must be between 1 and 32, got 0"),
        "{line}"
    );
    let line = run_fails(&["--kernel", "/dev/null", "--vcpus", "1000"]);
    assert!(line.contains("got 1000"), "{line}");
}

#[test]
fn unreadable_initramfs() {
    let dir = scratch("initrd");
    let kernel = dir.join("k");
    std::fs::write(&kernel, b"x").unwrap();
    let line = run_fails(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        "/nonexistent/initrd.cpio",
    ]);
    assert!(
        line.contains("initramfs /nonexistent/initrd.cpio"),
        "{line}"
    );
    // A directory opens but cannot be read.
    let line = run_fails(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        dir.to_str().unwrap(),
    ]);
    assert!(
        line.contains("initramfs") && line.contains("directory"),
        "{line}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn initramfs_larger_than_the_guest_memory() {
    let dir = scratch("bigrd");
    let kernel = dir.join("tiny.elf");
    std::fs::write(&kernel, kiln_tests::tiny_kernel::build("")).unwrap();
    // 40 MiB for a 32 MiB guest (sparse: nothing is written).
    let initrd = dir.join("big.cpio.gz");
    std::fs::File::create(&initrd)
        .unwrap()
        .set_len(40 << 20)
        .unwrap();
    let args = |initrd: &std::path::Path| {
        [
            "--kernel".to_string(),
            kernel.to_str().unwrap().to_string(),
            "--initrd".to_string(),
            initrd.to_str().unwrap().to_string(),
            "--memory".to_string(),
            "32".to_string(),
        ]
    };
    let big = args(&initrd);
    let line = run_fails(&big.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        line.contains("big.cpio.gz (41943040 bytes, 40.0 MiB) does not fit"),
        "{line}"
    );
    assert!(line.contains("give the VM more --memory"), "{line}");

    // One that fits is loaded, and the tiny kernel's reset ends the run with 0.
    let small = dir.join("small.cpio.gz");
    std::fs::write(&small, vec![0x1f; 4 << 20]).unwrap();
    let out = kiln()
        .arg("run")
        .args(args(&small))
        .output()
        .expect("run kiln");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_config_file() {
    let dir = scratch("config");
    let file = dir.join("vm.toml");
    std::fs::write(&file, "kernel = 5\n").unwrap();
    let line = run_fails(&["--config", file.to_str().unwrap()]);
    assert!(
        line.contains("vm.toml") && line.contains("not valid"),
        "{line}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn no_acpi_with_a_snapshot_job_is_refused() {
    let line = fails(kiln().args([
        "job",
        "--from-snapshot",
        "/nonexistent/snap",
        "--no-acpi",
        "--",
        "true",
    ]));
    assert!(
        line.contains("--no-acpi") && line.contains("--from-snapshot"),
        "{line}"
    );
}
