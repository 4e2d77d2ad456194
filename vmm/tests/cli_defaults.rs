//! What `kiln run` and `kiln job` boot when no flag names a kernel or an initramfs: the
//! defaults from $KILN_HOME, /usr/lib/kiln or the build cache, and a clear line naming
//! where kiln looked when there are none.

use std::path::Path;
use std::process::Command;

fn kiln(home: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("KILN_HOME", home)
        .env("KILN_CACHE_DIR", home.join("cache"))
        .output()
        .expect("run kiln");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn missing_defaults_name_where_kiln_looked() {
    let home = std::env::temp_dir().join(format!("kiln-cli-defaults-{}", std::process::id()));
    std::fs::create_dir_all(&home).unwrap();
    let kernel_home = home.join("vmlinux").display().to_string();

    let (code, err) = kiln(&home, &["run"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("no guest kernel given and none found") && err.contains(&kernel_home),
        "{err}"
    );

    let (code, err) = kiln(&home, &["job", "--", "true"]);
    assert_ne!(code, 0);
    assert!(err.contains("no guest kernel given"), "{err}");

    // With a kernel, the missing piece is the agent initramfs.
    let (code, err) = kiln(&home, &["job", "--kernel", "/dev/null", "--", "true"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("no agent initramfs given and none found")
            && err.contains(&home.join("initramfs.cpio").display().to_string()),
        "{err}"
    );

    // Neither a script nor a command: clap says what is needed.
    let (code, err) = kiln(&home, &["job", "--kernel", "/dev/null"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--script"), "{err}");
    // Both: refused too.
    let (code, err) = kiln(&home, &["job", "--script", "/dev/null", "--", "true"]);
    assert_eq!(code, 2, "{err}");
    std::fs::remove_dir_all(&home).unwrap();
}
