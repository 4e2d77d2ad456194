//! `--image` and the image store from the command line, directly (no VM boots): bad input
//! gets one error line and a non-zero exit, never a panic.

mod util;

use util::image::*;
use util::scratch;

/// Runs `kiln run --kernel /dev/null --image IMAGE --store STORE`, which must fail with one
/// error line; returns that line.
fn run_fails(image: &str, store: &str) -> String {
    fails(&[
        "run",
        "--kernel",
        "/dev/null",
        "--image",
        image,
        "--store",
        store,
    ])
}

#[test]
fn a_missing_image_is_named_with_the_ones_there_are() {
    let store = scratch("missing");
    let s = store.to_str().unwrap();
    for cmd in ["run", "job"] {
        let mut args = vec![cmd, "--kernel", "/dev/null", "--image", "deb", "--store", s];
        if cmd == "job" {
            args.extend(["--script", "/dev/null"]);
        }
        let line = fails(&args);
        assert!(
            line.contains("no image \"deb\"") && line.contains("(none)") && line.contains(s),
            "{line}"
        );
    }
    fake_image(&store, "alpha", true);
    fake_image(&store, "beta", true);
    let line = run_fails("deb", s);
    assert!(line.contains("the images there are: alpha, beta"), "{line}");
    let line = run_fails("../x", s);
    assert!(line.contains("is not valid"), "{line}");
    let line = fails(&["image", "rm", "deb", "--store", s]);
    assert!(line.contains("no image \"deb\""), "{line}");
    std::fs::remove_dir_all(store).unwrap();
}

#[test]
fn an_image_that_is_not_ext4_is_refused() {
    let store = scratch("notext4");
    fake_image(&store, "junk", false);
    let line = run_fails("junk", store.to_str().unwrap());
    assert!(
        line.contains("image \"junk\"") && line.contains("not an ext4 filesystem"),
        "{line}"
    );
    // With the magic the image is accepted and kiln goes on to the kernel, which is bad.
    fake_image(&store, "junk", true);
    let line = run_fails("junk", store.to_str().unwrap());
    assert!(!line.contains("image"), "{line}");
    std::fs::remove_dir_all(store).unwrap();
}

#[test]
fn image_flags_that_contradict_are_refused() {
    let line = fails(&["run", "--kernel", "k", "--image", "a", "--root-disk", "r"]);
    assert!(line.contains("--root-disk"), "{line}");
    fails(&["run", "--kernel", "k", "--store", "/s"]);
    let out = kiln(&["run", "--kernel", "k", "--store", "/s"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--image"), "{stderr}");
}
