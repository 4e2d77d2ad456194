//! kiln boots the guest kernel: vCPUs, memory, both image formats, a clean kernel log,
//! and a guest panic.
//!
//! Each test runs a script through [`Runner::detect`]: on this machine's `/dev/kvm` where it
//! is hardware virtualization, else inside the nested test bed.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use kiln_tests::guest_initramfs::{self, GuestInitramfs};
use kiln_tests::output::{kernel_splats, last_json, number, sections, value};
use kiln_tests::Runner;

const TIMEOUT: Duration = Duration::from_secs(240);

/// The guest reports its CPU count and memory.
const REPORT_RC: &str = r#"
echo "KILN-NPROC=$(nproc)"
echo "KILN-MEMTOTAL-KB=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
"#;

/// One `kiln run` of `kernel_var` with `$FILES/g.cpio` and `n` vCPUs, in its own section
/// named `case`, ending with its exit code.
fn boot_case(case: &str, kernel_var: &str, n: u32) -> String {
    format!(
        "echo KILN-CASE={case}\n\
         \"$KILN\" run --kernel \"${kernel_var}\" --initrd \"$FILES/g.cpio\" \
         --vcpus {n} --memory 256 --json\n\
         echo \"KILN-RUN-EXIT=$?\"\n"
    )
}

/// A script that boots `kernel_var` once per vCPU count, each run in its own section.
fn boot_script(kernel_var: &str, vcpus: &[u32]) -> String {
    vcpus
        .iter()
        .map(|n| boot_case(&n.to_string(), kernel_var, *n))
        .collect()
}

/// Runs the boots and checks each case: kiln exited 0, the guest saw `n` CPUs and most of
/// its 256 MiB, and kiln's JSON reports a positive boot time.
fn check_boots(kernel_var: &str, vcpus: &[u32]) -> Result<()> {
    let runner = Runner::detect()?;
    let files = [("g.cpio".to_string(), guest_initramfs::build(REPORT_RC)?)];
    let out = runner.run(&boot_script(kernel_var, vcpus), &files, TIMEOUT)?;
    let cases = sections(&out.console, "KILN-CASE");
    let names: Vec<&str> = cases.iter().map(|c| c.0).collect();
    let wanted: Vec<String> = vcpus.iter().map(u32::to_string).collect();
    ensure!(
        names == wanted,
        "cases {names:?} ran, wanted {wanted:?} ({}); console:\n{}",
        runner.describe(),
        out.console
    );
    for (&n, (_, text)) in vcpus.iter().zip(&cases) {
        let what = format!(
            "{kernel_var}, {n} vCPU(s), {}; output:\n{text}",
            runner.describe()
        );
        ensure!(
            value(text, "KILN-RUN-EXIT") == Some("0"),
            "kiln failed: {what}"
        );
        ensure!(
            number::<u32>(text, "KILN-NPROC") == Some(n),
            "CPU count: {what}"
        );
        let mem_kib = number::<u64>(text, "KILN-MEMTOTAL-KB").context(what.clone())?;
        ensure!(
            (200 * 1024..256 * 1024).contains(&mem_kib),
            "MemTotal {mem_kib} kB is not just under 256 MiB: {what}"
        );
        let json = last_json(text).with_context(|| format!("no JSON line: {what}"))?;
        let boot_ms = json["boot_ms"].as_f64();
        ensure!(
            boot_ms.is_some_and(|ms| ms > 0.0),
            "boot_ms {boot_ms:?}: {what}"
        );
        eprintln!("{kernel_var}, {n} vCPU(s): boot_ms {}", json["boot_ms"]);
    }
    Ok(())
}

#[test]
fn boot_guest_sees_vcpus_and_memory() -> Result<()> {
    check_boots("GUEST_VMLINUX", &[1, 2])
}

#[test]
fn boot_bzimage() -> Result<()> {
    check_boots("GUEST_BZIMAGE", &[1])
}

/// The guest prints its whole kernel log (the default command line has `quiet`, so the
/// console shows only errors).
const DMESG_RC: &str = "echo KILN-DMESG=begin\ndmesg\necho KILN-DMESG=end\n";

/// Both kernel images boot on 2 vCPUs without the kernel reporting a WARNING or BUG, on
/// the console or in its log: each is a problem with what kiln presents (CPUID, MP
/// table, devices) or in the kernel, to be fixed rather than scrolled past.
#[test]
fn boot_log_has_no_kernel_warnings() -> Result<()> {
    let runner = Runner::detect()?;
    let files = [("g.cpio".to_string(), guest_initramfs::build(DMESG_RC)?)];
    let kernels = ["GUEST_VMLINUX", "GUEST_BZIMAGE"];
    let script: String = kernels.iter().map(|k| boot_case(k, k, 2)).collect();
    let out = runner.run(&script, &files, TIMEOUT)?;
    let cases = sections(&out.console, "KILN-CASE");
    let names: Vec<&str> = cases.iter().map(|c| c.0).collect();
    ensure!(
        names == kernels,
        "cases {names:?} ran, wanted {kernels:?} ({}); console:\n{}",
        runner.describe(),
        out.console
    );
    for (kernel, text) in cases {
        let what = format!("{kernel}, {}; output:\n{text}", runner.describe());
        ensure!(
            value(text, "KILN-RUN-EXIT") == Some("0"),
            "kiln failed: {what}"
        );
        let log = sections(text, "KILN-DMESG")
            .into_iter()
            .find(|(part, _)| *part == "begin")
            .map(|(_, log)| log)
            .with_context(|| format!("the guest printed no kernel log: {what}"))?;
        ensure!(
            log.contains("Linux version"),
            "the kernel log lacks its first lines: {what}"
        );
        let splats = kernel_splats(text);
        ensure!(
            splats.is_empty(),
            "the guest kernel reported {} problem(s), first {:?}: {what}",
            splats.len(),
            splats[0]
        );
        eprintln!(
            "{kernel}: {} kernel log lines, no WARNING or BUG",
            log.lines().count()
        );
    }
    Ok(())
}

#[test]
fn boot_guest_panic_is_an_error() -> Result<()> {
    let runner = Runner::detect()?;
    // init exits, so the kernel panics ("Attempted to kill init"); panic=-1 resets.
    let image = GuestInitramfs::new().init("#!/bin/sh\nexit 1\n").build()?;
    let script = "\"$KILN\" run --kernel \"$GUEST_VMLINUX\" --initrd \"$FILES/panic.cpio\" \
                  --memory 256 --json 2>kiln.err\n\
                  echo \"KILN-RUN-EXIT=$?\"\n\
                  echo KILN-PART=stderr\n\
                  cat kiln.err\n";
    let files = [("panic.cpio".to_string(), image)];
    let out = runner.run(script, &files, TIMEOUT)?;
    let what = format!("{}; console:\n{}", runner.describe(), out.console);
    let code = number::<i32>(&out.console, "KILN-RUN-EXIT").with_context(|| what.clone())?;
    ensure!(code != 0, "kiln exited 0 after a guest panic: {what}");
    let parts = sections(&out.console, "KILN-PART");
    let stderr = parts.first().map(|p| p.1).unwrap_or_default();
    let json = last_json(&out.console)
        .map(|j| j.to_string())
        .unwrap_or_default();
    ensure!(
        stderr.to_lowercase().contains("panic") || json.to_lowercase().contains("panic"),
        "kiln's error does not say \"panic\": {what}"
    );
    Ok(())
}
