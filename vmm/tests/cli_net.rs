//! Bad `--net` input to `kiln run` and `kiln net`: one clear error line and a non-zero exit,
//! never a panic, and nothing created on the host.

use std::process::Command;

/// Runs `kiln ARGS`, asserts failure without a panic, returns the error line.
fn kiln_fails(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("run kiln");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "kiln {args:?} succeeded: {stderr}");
    assert_ne!(out.status.code(), Some(101), "kiln panicked: {stderr}");
    assert!(!stderr.contains("panicked"), "kiln panicked: {stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "expected one error line, got: {stderr}");
    errors[0].to_string()
}

/// A readable file to pass as the kernel: the TAP is checked before the kernel is loaded.
fn kernel() -> String {
    let path = std::env::temp_dir().join(format!("kiln-cli-net-{}", std::process::id()));
    std::fs::write(&path, vec![0u8; 4096]).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn a_tap_that_does_not_exist() {
    let name = format!("kn{}", std::process::id());
    let line = kiln_fails(&[
        "run",
        "--kernel",
        &kernel(),
        "--net",
        &format!("tap={name}"),
    ]);
    assert!(
        line.contains(&name) && line.contains("does not exist"),
        "{line}"
    );
    assert!(line.contains("kiln net setup"), "{line}");
    assert!(
        !std::path::Path::new("/sys/class/net").join(&name).exists(),
        "no device was created"
    );
}

#[test]
fn an_interface_that_is_not_a_tap() {
    let line = kiln_fails(&["run", "--kernel", &kernel(), "--net", "tap=lo"]);
    assert!(line.contains("\"lo\" is not a TAP"), "{line}");
}

#[test]
fn malformed_net_options() {
    for (arg, says) in [
        ("tap=t,ip=10.0.0.300/24", "not an IPv4 address"),
        ("tap=t,mac=zz:00:00:00:00:00", "not a MAC address"),
        ("ip=10.0.0.2/24", "no tap=NAME"),
        ("tap=t,speed=1", "unknown option"),
    ] {
        let line = kiln_fails(&["run", "--kernel", &kernel(), "--net", arg]);
        assert!(line.contains(says), "{arg}: {line}");
    }
}

#[test]
fn net_setup_refuses_a_bad_address_before_creating_anything() {
    let name = format!("ks{}", std::process::id());
    let line = kiln_fails(&["net", "setup", "--tap", &name, "--host-ip", "10.0.0.1"]);
    assert!(line.contains("prefix length"), "{line}");
    assert!(!std::path::Path::new("/sys/class/net").join(&name).exists());
}

#[test]
fn net_setup_refuses_a_user_who_is_not_root() {
    use std::os::unix::process::CommandExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        let line = kiln_fails(&["net", "setup", "--tap", "kx0", "--host-ip", "10.0.0.1/24"]);
        assert!(line.contains("must run as root"), "{line}");
        return;
    }
    // As root: run it as nobody (the binary must be reachable by that user).
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["net", "setup", "--tap", "kx0", "--host-ip", "10.0.0.1/24"])
        .uid(65534)
        .gid(65534)
        .output();
    let Ok(out) = out else {
        eprintln!("skipped: cannot run kiln as nobody here");
        return;
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(126) || stderr.contains("Permission denied (os error 13)") {
        eprintln!("skipped: nobody cannot reach the kiln binary: {stderr}");
        return;
    }
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("must run as root"), "{stderr}");
    assert!(!std::path::Path::new("/sys/class/net/kx0").exists());
}
