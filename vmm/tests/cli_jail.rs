//! `kiln jail` on the direct path: its one-line errors (not root, a missing --file, a
//! taken ID, a base that cannot be written), a jailed `kiln run` of the tiny ELF kernel
//! (the namespaces, the root switch, `/dev/kvm` and the drop of privileges work on this
//! machine's /dev/kvm), and store images brought in with `--image`. The jailed VMM's
//! lifecycle (signals, a killed jail, snapshots across jails) is in `cli_jail_lifecycle`.

mod util;

use std::os::unix::process::CommandExt;
use std::path::Path;

use util::jail::*;
use util::*;

#[test]
fn jail_refuses_without_root() {
    let base = scratch("noroot");
    let inner = ["run", "--kernel", "k"];
    let out = if is_root() {
        // Run it as nobody, from a copy that nobody can reach wherever the checkout is.
        let (_bin, copy) =
            kiln_tests::tmp::copy_for_all_users(Path::new(env!("CARGO_BIN_EXE_kiln"))).unwrap();
        kiln_jail_with(&copy, &base, "j", &[], &inner)
            .uid(65534)
            .gid(65534)
            .output()
    } else {
        kiln_jail(&base, "j", &[], &inner).output()
    }
    .unwrap();
    assert_one_line_error(&out, "kiln jail must run as root");
    std::fs::remove_dir_all(base).unwrap();
}

#[test]
fn jail_reports_bad_input_in_one_line() {
    let Some(base) = root_scratch("errors") else {
        return;
    };
    // A missing --file.
    let missing = base.join("no-such-kernel");
    let out = kiln_jail(&base, "j", &["--file", missing.to_str().unwrap()], &["run"])
        .output()
        .unwrap();
    assert_one_line_error(&out, "--file");
    assert!(
        !base.join("j").exists(),
        "nothing is created before the checks pass"
    );

    // A bad ID.
    let out = kiln_jail(&base, "../x", &[], &["run"]).output().unwrap();
    assert_one_line_error(&out, "is not valid");

    // Root as the inner uid.
    let out = kiln_jail(&base, "j", &["--uid", "0"], &["run"])
        .output()
        .unwrap();
    assert_one_line_error(&out, "--uid 0");

    // An ID in use: its jail.pid names a live process (this one).
    std::fs::create_dir_all(base.join("busy")).unwrap();
    std::fs::write(
        base.join("busy/jail.pid"),
        format!("{}\n", std::process::id()),
    )
    .unwrap();
    let out = kiln_jail(&base, "busy", &[], &["run"]).output().unwrap();
    assert_one_line_error(&out, "is taken");
    assert!(
        base.join("busy/jail.pid").exists(),
        "a jail in use is left alone"
    );

    // A base that cannot be made: below a regular file.
    std::fs::write(base.join("file"), "").unwrap();
    let bad = base.join("file/base");
    let out = kiln_jail(&bad, "j", &[], &["run"]).output().unwrap();
    assert_one_line_error(&out, "cannot create the jail directory");
    std::fs::remove_dir_all(base).unwrap();
}

#[test]
fn jail_runs_the_tiny_kernel_unprivileged_and_cleans_up() {
    let Some(dir) = root_scratch("run") else {
        return;
    };
    let kernel = tiny_kernel(&dir, "hello from the jail\n");
    let base = dir.join("base");
    // A stale jail directory (its owner is gone) is replaced.
    std::fs::create_dir_all(base.join("t1/root")).unwrap();
    std::fs::write(base.join("t1/jail.pid"), "999999999\n").unwrap();
    let out = run_ok(&mut kiln_jail(
        &base,
        "t1",
        &[
            "--uid",
            "65534",
            "--gid",
            "65534",
            "--file",
            kernel.to_str().unwrap(),
        ],
        &[
            "run", "--kernel", "tiny.elf", "--memory", "64", "--json", "--api", "api.sock",
        ],
    ));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.starts_with("hello from the jail\n"), "{stdout}");
    assert!(stdout.contains("\"result\":\"reset\""), "{stdout}");
    assert!(stderr.contains("kiln jail: t1 runs as pid"), "{stderr}");
    let mapped = base.join("t1/root/api.sock");
    assert!(
        stderr.contains(&format!(
            "--api api.sock is {} on the host",
            mapped.display()
        )),
        "{stderr}"
    );
    assert!(!base.join("t1").exists(), "the jail directory is removed");
    assert!(kernel.exists(), "the host's file stays");
    std::fs::remove_dir_all(dir).unwrap();
}

/// `kiln jail --image NAME` brings a store image in as `/images/NAME` (hard-linked, not
/// copied) and makes `/images` the inner kiln's store, so a jailed `kiln run --image NAME`
/// boots with it; a missing image is refused before any jail is made, in one line.
#[test]
fn jail_brings_in_a_store_image_for_image() {
    use std::os::unix::fs::MetadataExt;
    let Some(dir) = root_scratch("image") else {
        return;
    };
    let kernel = tiny_kernel(&dir, "hello image\n");
    // A store image made by hand: a small file with the ext4 superblock magic.
    let store = dir.join("store");
    let rootfs = util::image::fake_image(&store, "tiny", true);
    let base = dir.join("base");
    let store_arg = store.to_str().unwrap();
    let out = run_ok(&mut kiln_jail(
        &base,
        "img1",
        &[
            "--file",
            kernel.to_str().unwrap(),
            "--image",
            "tiny",
            "--store",
            store_arg,
            "--keep",
        ],
        &[
            "run", "--kernel", "tiny.elf", "--image", "tiny", "--memory", "64", "--json",
        ],
    ));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("hello image\n"), "{stdout}");
    let inode = |p: &Path| std::fs::metadata(p).unwrap().ino();
    assert_eq!(
        inode(&store.join("tiny/rootfs.ext4")),
        inode(&base.join("img1/root/images/tiny/rootfs.ext4")),
        "the image is hard-linked into the jail"
    );
    assert_eq!(
        std::fs::read(store.join("tiny/rootfs.ext4")).unwrap(),
        rootfs
    );

    let out = kiln_jail(
        &base,
        "img2",
        &["--image", "nope", "--store", store_arg],
        &["run", "--kernel", "tiny.elf", "--image", "nope"],
    )
    .output()
    .unwrap();
    assert_one_line_error(&out, "nope");
    assert!(!base.join("img2").exists(), "no jail is made");
    std::fs::remove_dir_all(dir).unwrap();
}
