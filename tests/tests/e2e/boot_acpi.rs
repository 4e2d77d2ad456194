//! kiln's ACPI tables as kernels read them: kiln's guest kernel (no ACPI, MP table) boots
//! the same with and without them, and Debian's cloud kernel (ACPI, no MP table parser)
//! counts every vCPU through the MADT and finds its virtio-mmio devices in the DSDT.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use kiln_tests::distro_kernel::{self, VIRTIO_MODULES};
use kiln_tests::guest_initramfs::{self, GuestInitramfs};
use kiln_tests::output::{kernel_splats, last_json, number, sections, value};
use kiln_tests::Runner;

/// The guest's CPUs, its virtio devices and its whole kernel log.
const REPORT_RC: &str = "echo \"KILN-NPROC=$(nproc)\"\n\
                         echo \"KILN-VIRTIO=$(ls /sys/bus/virtio/devices | wc -l)\"\n\
                         echo KILN-DMESG=begin\ndmesg\necho KILN-DMESG=end\n";

/// How often each of the two ways boots kiln's guest kernel, alternating.
const ROUNDS: usize = 5;

/// The kernel log between `KILN-DMESG=begin` and `=end` in `text`.
fn kernel_log(text: &str) -> Option<&str> {
    sections(text, "KILN-DMESG")
        .into_iter()
        .find(|(part, _)| *part == "begin")
        .map(|(_, log)| log)
}

/// What a guest kernel's log must not hold: a WARN() or BUG report, or, when kiln wrote
/// ACPI tables, firmware (here: kiln's tables) that the ACPI interpreter found wrong.
/// Without tables an ACPI kernel says "ACPI BIOS Error (bug): A valid RSDP was not found",
/// which is the truth then.
fn log_problems(log: &str, acpi: bool) -> Vec<&str> {
    let mut problems = kernel_splats(log);
    if acpi {
        problems.extend(log.lines().filter(|l| l.contains("ACPI BIOS Error")));
    }
    problems
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// kiln's guest kernel has no ACPI: it reads the MP table with the tables there or not,
/// sees both vCPUs and its one virtio device (rng, from the command line) either way with a clean log, and boots as fast (the boot times of
/// alternating runs are printed).
#[test]
fn boot_acpi_guest_kernel_same_with_and_without_tables() -> Result<()> {
    let runner = Runner::detect()?;
    let files = [("g.cpio".to_string(), guest_initramfs::build(REPORT_RC)?)];
    let mut script = String::new();
    for round in 0..ROUNDS {
        for (name, flag) in [("acpi", ""), ("no-acpi", " --no-acpi")] {
            script.push_str(&format!(
                "echo KILN-CASE={name}-{round}\n\
                 \"$KILN\" run --kernel \"$GUEST_VMLINUX\" --initrd \"$FILES/g.cpio\" \
                 --vcpus 2 --memory 256 --json{flag}\n\
                 echo \"KILN-RUN-EXIT=$?\"\n"
            ));
        }
    }
    let out = runner.run(&script, &files, Duration::from_secs(600))?;
    let cases = sections(&out.console, "KILN-CASE");
    ensure!(
        cases.len() == 2 * ROUNDS,
        "{} of {} boots ran ({}); console:\n{}",
        cases.len(),
        2 * ROUNDS,
        runner.describe(),
        out.console
    );
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for (case, text) in cases {
        let what = format!("{case}, {}; output:\n{text}", runner.describe());
        ensure!(
            value(text, "KILN-RUN-EXIT") == Some("0"),
            "kiln failed: {what}"
        );
        ensure!(
            number::<u32>(text, "KILN-NPROC") == Some(2),
            "CPU count: {what}"
        );
        ensure!(
            number::<u32>(text, "KILN-VIRTIO") == Some(1),
            "virtio devices, wanted the rng device once: {what}"
        );
        let log = kernel_log(text).with_context(|| format!("no kernel log: {what}"))?;
        let problems = log_problems(log, true);
        ensure!(problems.is_empty(), "{problems:?}: {what}");
        let boot_ms = last_json(text)
            .and_then(|j| j["boot_ms"].as_f64())
            .with_context(|| format!("no boot_ms: {what}"))?;
        if case.starts_with("acpi") {
            with.push(boot_ms);
        } else {
            without.push(boot_ms);
        }
    }
    eprintln!(
        "kiln guest kernel, 2 vCPUs, {}: boot_ms with ACPI tables {with:?} (median {}), \
         without {without:?} (median {})",
        runner.describe(),
        median(&mut with.clone()),
        median(&mut without.clone())
    );
    Ok(())
}

/// One boot of the Debian kernel: `n` vCPUs, the tables or not.
fn debian_case(n: u32, acpi: bool) -> String {
    let (name, flag) = if acpi {
        // The kernel finds virtio-mmio devices only through ACPI.
        (format!("acpi-{n}"), " --acpi-devices")
    } else {
        (format!("no-acpi-{n}"), " --no-acpi")
    };
    format!(
        "echo KILN-CASE={name}\n\
         timeout 400 \"$KILN\" run --kernel \"$FILES/vmlinuz\" --initrd \"$FILES/d.cpio\" \
         --vcpus {n} --memory 256{flag} \
         --cmdline \"console=ttyS0 reboot=k panic=-1 8250.nr_uarts=1 quiet\"\n\
         echo \"KILN-RUN-EXIT=$?\"\n"
    )
}

/// The init of the Debian kernel's initramfs: its CPUs, the virtio modules loaded, the
/// virtio devices it then has and the ACPI devices it found them through, its log.
fn debian_init() -> String {
    let mut init = String::from(
        "#!/bin/sh\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sys /sys\n\
         echo \"KILN-NPROC=$(nproc)\"\n",
    );
    for module in VIRTIO_MODULES {
        init.push_str(&format!(
            "insmod /lib/kiln/{module}.ko || echo KILN-INSMOD-FAILED={module}\n"
        ));
    }
    init.push_str(
        "echo \"KILN-VIRTIO=$(ls /sys/bus/virtio/devices | wc -l)\"\n\
         echo \"KILN-VIRTIO-IDS=$(cat /sys/bus/virtio/devices/*/device 2>/dev/null | tr '\\n' ' ')\"\n\
         echo \"KILN-LNRO=$(ls /sys/bus/acpi/devices 2>/dev/null | grep -c LNRO0005)\"\n\
         echo KILN-DMESG=begin\n\
         dmesg\n\
         echo KILN-DMESG=end\n\
         reboot -f\n",
    );
    init
}

/// Debian's cloud kernel (no `X86_MPPARSE`, virtio-mmio a module without command-line
/// devices) sees 1, 2 and 4 vCPUs through the MADT and kiln's virtio-rng device through
/// the DSDT (`--acpi-devices`), with no ACPI error or kernel warning in its log. With `--no-acpi` it boots on
/// one CPU and finds no virtio device.
#[test]
fn boot_acpi_debian_cloud_kernel_counts_vcpus_and_finds_devices() -> Result<()> {
    let kernel = distro_kernel::debian_cloud()?;
    ensure!(
        kernel.config_value("X86_MPPARSE")?.is_none(),
        "{} has X86_MPPARSE: it would not need the MADT",
        kernel.release
    );
    let runner = Runner::detect()?;
    let mut image = GuestInitramfs::new().init(debian_init());
    for module in VIRTIO_MODULES {
        let path = kernel.modules.join(format!("{module}.ko"));
        let data = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        image = image.file(&format!("/lib/kiln/{module}.ko"), 0o644, data);
    }
    let vmlinuz = std::fs::read(&kernel.vmlinuz)?;
    let files = [
        ("vmlinuz".to_string(), vmlinuz),
        ("d.cpio".to_string(), image.build()?),
    ];
    let wanted: [(u32, bool); 4] = [(1, true), (2, true), (4, true), (2, false)];
    let script: String = wanted.iter().map(|(n, a)| debian_case(*n, *a)).collect();
    let out = runner.run(&script, &files, Duration::from_secs(1800))?;
    let cases = sections(&out.console, "KILN-CASE");
    ensure!(
        cases.len() == wanted.len(),
        "{} of {} boots ran ({}); console:\n{}",
        cases.len(),
        wanted.len(),
        runner.describe(),
        out.console
    );
    for ((n, acpi), (case, text)) in wanted.iter().zip(&cases) {
        let what = format!(
            "{} {case}, {}; output:\n{text}",
            kernel.release,
            runner.describe()
        );
        ensure!(
            value(text, "KILN-RUN-EXIT") == Some("0"),
            "kiln failed: {what}"
        );
        ensure!(
            value(text, "KILN-INSMOD-FAILED").is_none(),
            "a virtio module did not load: {what}"
        );
        let (cpus, devices) = if *acpi { (*n, 1) } else { (1, 0) };
        ensure!(
            number::<u32>(text, "KILN-NPROC") == Some(cpus),
            "CPU count, wanted {cpus}: {what}"
        );
        ensure!(
            number::<u32>(text, "KILN-LNRO") == Some(devices)
                && number::<u32>(text, "KILN-VIRTIO") == Some(devices),
            "virtio devices, wanted {devices}: {what}"
        );
        if *acpi {
            ensure!(
                value(text, "KILN-VIRTIO-IDS").is_some_and(|ids| ids.contains("0x0004")),
                "the virtio device found is not the entropy device: {what}"
            );
        }
        let log = kernel_log(text).with_context(|| format!("no kernel log: {what}"))?;
        let problems = log_problems(log, *acpi);
        ensure!(problems.is_empty(), "{problems:?}: {what}");
        eprintln!(
            "{} {case}: {cpus} CPU(s), {devices} virtio device(s), clean log; its ACPI lines:",
            kernel.release
        );
        for line in log.lines().filter(|l| l.contains("ACPI")).take(40) {
            eprintln!("    {line}");
        }
    }
    Ok(())
}
