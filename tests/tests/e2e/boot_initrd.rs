//! kiln boots initramfs images as distributions ship them: gzip-, zstd- and xz-compressed,
//! and an uncompressed cpio (where distributions put early microcode) followed by a
//! compressed one. kiln loads the bytes as they are; the guest kernel unpacks them.

use std::time::Duration;

use anyhow::{ensure, Result};
use kiln_tests::compress::Compressor;
use kiln_tests::cpio;
use kiln_tests::guest_initramfs::GuestInitramfs;
use kiln_tests::output::{sections, value};
use kiln_tests::Runner;

const TIMEOUT: Duration = Duration::from_secs(300);

/// Where each image names itself, and where the early archive of the concatenated one
/// puts its file.
const FORMAT_FILE: &str = "/etc/kiln-format";
const EARLY_FILE: &str = "/early/marker";

/// `/init`: says which image it came from, and whether the early archive's file is there
/// too, then resets the VM (kiln exits 0).
const INIT: &str = r#"#!/bin/sh
echo "KILN-INIT=$(cat /etc/kiln-format)"
[ -e /early/marker ] && echo "KILN-EARLY=$(cat /early/marker)"
reboot -f
"#;

/// A guest image whose init prints `format`.
fn image(format: &str) -> Result<Vec<u8>> {
    GuestInitramfs::new()
        .init(INIT)
        .file(FORMAT_FILE, 0o644, format.as_bytes())
        .build()
}

/// The cases, (name, initramfs bytes): one per compressor, and a plain cpio holding only
/// `EARLY_FILE` followed by a gzip-compressed image.
fn cases() -> Result<Vec<(String, Vec<u8>)>> {
    let mut cases = Vec::new();
    for c in Compressor::ALL {
        cases.push((c.name().to_string(), c.compress(&image(c.name())?)?));
    }
    let mut early = cpio::Writer::in_memory();
    early.file(EARLY_FILE, 0o644, b"early")?;
    let mut concatenated = early.finish()?;
    concatenated.extend(Compressor::Gzip.compress(&image("concatenated")?)?);
    cases.push(("concatenated".to_string(), concatenated));
    Ok(cases)
}

/// One test-bed run boots the bzImage (what distributions ship) with each image in turn.
#[test]
fn boot_compressed_and_concatenated_initrds() -> Result<()> {
    let runner = Runner::detect()?;
    let cases = cases()?;
    let script: String = cases
        .iter()
        .map(|(name, _)| {
            format!(
                "echo KILN-CASE={name}\n\
                 \"$KILN\" run --kernel \"$GUEST_BZIMAGE\" --initrd \"$FILES/{name}.img\" \
                 --memory 256\n\
                 echo \"KILN-RUN-EXIT=$?\"\n"
            )
        })
        .collect();
    let files: Vec<(String, Vec<u8>)> = cases
        .iter()
        .map(|(name, bytes)| (format!("{name}.img"), bytes.clone()))
        .collect();
    let out = runner.run(&script, &files, TIMEOUT)?;
    let ran = sections(&out.console, "KILN-CASE");
    let names: Vec<&str> = ran.iter().map(|c| c.0).collect();
    let wanted: Vec<&str> = cases.iter().map(|c| c.0.as_str()).collect();
    ensure!(
        names == wanted,
        "cases {names:?} ran, wanted {wanted:?} ({}); console:\n{}",
        runner.describe(),
        out.console
    );
    for (&(name, text), (_, bytes)) in ran.iter().zip(&cases) {
        let what = format!("{name} initramfs, {}; output:\n{text}", runner.describe());
        ensure!(
            value(text, "KILN-INIT") == Some(name),
            "init did not run from it: {what}"
        );
        let early = value(text, "KILN-EARLY");
        if name == "concatenated" {
            ensure!(
                early == Some("early"),
                "the early archive was not unpacked: {what}"
            );
        } else {
            ensure!(early.is_none(), "a file from nowhere: {what}");
        }
        ensure!(
            value(text, "KILN-RUN-EXIT") == Some("0"),
            "kiln failed: {what}"
        );
        eprintln!("{name} initramfs ({} bytes): init ran", bytes.len());
    }
    Ok(())
}
