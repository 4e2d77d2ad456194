//! Bad `--net` input to `kiln run` and `kiln net`: one clear error line and a non-zero exit,
//! never a panic, and nothing created on the host.

mod util;

use util::{fails, is_root, kiln, netns, scratch};

/// Runs `kiln ARGS`, asserts failure without a panic, returns the error line.
fn kiln_fails(args: &[&str]) -> String {
    fails(kiln().args(args))
}

/// A readable file to pass as the kernel: the TAP is checked before the kernel is loaded.
fn kernel() -> String {
    static KERNEL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    KERNEL
        .get_or_init(|| {
            let path = scratch("kernel").join("kernel");
            std::fs::write(&path, vec![0u8; 4096]).unwrap();
            path.to_str().unwrap().to_string()
        })
        .clone()
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
fn net_setup_allow_needs_nat_and_a_network() {
    let name = format!("kw{}", std::process::id());
    let base = ["net", "setup", "--tap", &name, "--host-ip", "10.0.0.1/24"];
    let out = kiln()
        .args([&base[..], &["--allow", "10.9.0.0/16"]].concat())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("required") && stderr.contains("--nat"),
        "{stderr}"
    );
    if is_root() {
        let line = kiln_fails(&[&base[..], &["--nat", "--allow", "10.9.0.0"]].concat());
        assert!(
            line.contains("--allow") && line.contains("prefix length"),
            "{line}"
        );
    }
    assert!(!std::path::Path::new("/sys/class/net").join(&name).exists());
}

#[test]
fn net_setup_refuses_a_user_who_is_not_root() {
    use std::os::unix::process::CommandExt;
    if !is_root() {
        let line = kiln_fails(&["net", "setup", "--tap", "kx0", "--host-ip", "10.0.0.1/24"]);
        assert!(line.contains("must run as root"), "{line}");
        return;
    }
    // As root: run it as nobody, from a copy that nobody can reach wherever the checkout is.
    let (_bin, kiln) =
        kiln_tests::tmp::copy_for_all_users(std::path::Path::new(env!("CARGO_BIN_EXE_kiln")))
            .unwrap();
    let out = std::process::Command::new(&kiln)
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

/// linux/capability.h (not in the libc crate).
const CAP_NET_ADMIN: libc::c_ulong = 12;

#[test]
fn a_tap_without_the_right_to_attach() {
    use std::os::unix::process::CommandExt;
    let kernel = kernel();
    netns::in_netns(move || {
        kiln_devices::virtio::net::tap::create_persistent("kp0", Some(12345)).unwrap();
        let args = ["run", "--kernel", kernel.as_str(), "--net", "tap=kp0"];
        let mut cmd = util::kiln();
        cmd.args(args);
        // SAFETY: the closure runs in the forked child before exec and only calls prctl,
        // which is async-signal-safe. Without CAP_NET_ADMIN in its bounding set, the exec'd
        // kiln (still root, so /dev/kvm and /dev/net/tun open) may not attach to a TAP that
        // another user owns.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_CAPBSET_DROP, CAP_NET_ADMIN, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let line = fails(&mut cmd);
        assert!(
            line.contains("kp0") && line.contains("not permitted"),
            "{line}"
        );
        assert!(line.contains("CAP_NET_ADMIN"), "{line}");
    });
}
