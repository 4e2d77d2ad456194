//! `kiln doctor` on this host: one line per check, and exit 1 when a default `kiln job`
//! cannot run. On a `/dev/kvm` without hardware virtualization (PVM here) it must say, in
//! its one line, that a Linux guest cannot boot and why.

use std::path::Path;
use std::process::Command;

fn doctor(home: &Path, cache: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("doctor")
        .env("KILN_HOME", home)
        .env("KILN_CACHE_DIR", cache)
        .output()
        .expect("run kiln doctor");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn line<'a>(out: &'a str, name: &str) -> &'a str {
    out.lines()
        .find(|l| l.get(6..).is_some_and(|rest| rest.starts_with(name)))
        .unwrap_or_else(|| panic!("no {name:?} line in:\n{out}"))
}

#[test]
fn doctor_names_what_a_job_needs_and_why_this_kvm_cannot_boot_linux() {
    let root = std::env::temp_dir().join(format!("kiln-cli-doctor-{}", std::process::id()));
    let (home, cache) = (root.join("home"), root.join("cache"));
    std::fs::create_dir_all(&home).unwrap();
    std::fs::create_dir_all(&cache).unwrap();

    // Nothing in KILN_HOME or the cache: the kernel line says where it looked.
    let (code, out) = doctor(&home, &cache);
    assert_eq!(code, 1, "{out}");
    let kernel = line(&out, "guest kernel");
    assert!(kernel.starts_with("FAIL"), "{kernel}");
    assert!(
        kernel.contains(&home.join("vmlinux").display().to_string())
            && kernel.contains("/usr/lib/kiln/vmlinux"),
        "{kernel}"
    );

    // With both defaults in KILN_HOME, their lines are ok.
    std::fs::write(home.join("vmlinux"), b"x").unwrap();
    std::fs::write(home.join("initramfs.cpio"), b"x").unwrap();
    let (code, out) = doctor(&home, &cache);
    assert!(line(&out, "guest kernel").starts_with("ok"), "{out}");
    assert!(line(&out, "initramfs").starts_with("ok"), "{out}");

    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let hardware = cpuinfo.split_whitespace().any(|f| f == "vmx" || f == "svm");
    let virt = line(&out, "virtualization");
    if hardware {
        assert!(virt.starts_with("ok"), "{virt}");
    } else {
        // One line: cannot boot, why, and what to do; and the exit status says so.
        assert!(virt.starts_with("FAIL"), "{virt}");
        assert!(virt.contains("cannot boot a Linux guest"), "{virt}");
        assert!(virt.contains("VT-x or AMD-V"), "{virt}");
        if Path::new("/sys/module/kvm_pvm").exists() {
            assert!(virt.contains("PVM"), "{virt}");
        }
        assert_eq!(code, 1, "{out}");
    }
    std::fs::remove_dir_all(&root).unwrap();
}
