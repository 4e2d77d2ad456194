//! `kiln run` end to end on the direct path, with a tiny ELF kernel that prints, marks boot
//! done and resets (see `kiln_tests::tiny_kernel`).

use std::io::BufReader;
use std::process::Stdio;

mod util;

use util::{kiln, next_line, run_ok, scratch, signal, spin_kernel_saying, tiny_kernel};

#[test]
fn marks_match_the_agent() {
    use kiln_tests::tiny_kernel::kiln_agent_marks as copy;
    assert_eq!(copy::SIGNAL_PORT, kiln_agent::marks::SIGNAL_PORT);
    assert_eq!(copy::BOOT_DONE, kiln_agent::marks::BOOT_DONE);
}

#[test]
fn run_reports_json_and_exits_zero_on_reset() {
    let dir = scratch("run");
    let kernel = tiny_kernel(&dir, "tiny kernel says hi\n");
    let out = run_ok(
        kiln()
            .args([
                "run", "--vcpus", "2", "--memory", "64", "--json", "--kernel",
            ])
            .arg(&kernel),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.starts_with("tiny kernel says hi\n"), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(report["result"], "reset");
    assert_eq!(report["exit_code"], 0);
    let boot_ms = report["boot_ms"].as_f64().expect("boot_ms is a number");
    let setup_ms = report["setup_ms"].as_f64().expect("setup_ms is a number");
    assert!(setup_ms > 0.0 && boot_ms >= setup_ms, "{report}");
    // The set-up timeline: named phases in order, ending at the first KVM_RUN.
    let phases: Vec<(String, f64)> = report["phases_ms"]
        .as_array()
        .expect("phases_ms is a list")
        .iter()
        .map(|p| (p[0].as_str().unwrap().to_string(), p[1].as_f64().unwrap()))
        .collect();
    let names: Vec<&str> = phases.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "cli_and_config",
            "guest_memory",
            "kvm_vm_and_irqchip",
            "devices",
            "kernel_load",
            "vcpus",
            "first_kvm_run"
        ],
        "{report}"
    );
    assert!(
        phases.windows(2).all(|w| w[0].1 <= w[1].1),
        "phases out of order: {report}"
    );
    assert!((phases[6].1 - setup_ms).abs() < 1e-6, "{report}");
    assert!(stderr.contains("guest boot done in"), "{stderr}");

    // The same VM from a TOML config file, console to a file.
    let config = dir.join("vm.toml");
    std::fs::write(
        &config,
        "kernel = \"tiny.elf\"\nmemory_mib = 32\nserial = \"console.log\"\n",
    )
    .unwrap();
    run_ok(kiln().arg("run").arg("--config").arg(&config));
    assert_eq!(
        std::fs::read_to_string(dir.join("console.log")).unwrap(),
        "tiny kernel says hi\n"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn sigterm_stops_the_vm_with_128_plus_signo() {
    let dir = scratch("sigterm");
    let kernel = spin_kernel_saying(&dir, "spinning now\n");
    let mut child = kiln()
        .args(["run", "--memory", "32", "--json", "--kernel"])
        .arg(&kernel)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    assert_eq!(next_line(&mut stdout), "spinning now\n");
    // A signal sent to the process must not be handled on a vCPU thread (its seccomp filter
    // refuses what the handler does): the vCPU thread blocks SIGINT and SIGTERM.
    let blocked = vcpu_thread_blocked_signals(child.id());
    for sig in [libc::SIGINT, libc::SIGTERM] {
        assert_ne!(
            blocked & (1 << (sig - 1)),
            0,
            "signal {sig} not blocked in the vCPU thread: SigBlk {blocked:x}"
        );
    }
    // The guest is running (it printed); now stop it the way a runner cancels a job.
    signal(&child, libc::SIGTERM);
    let status = child.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    assert_eq!(
        status.code(),
        Some(128 + libc::SIGTERM),
        "{status:?}: {rest}"
    );
    let report: serde_json::Value = serde_json::from_str(rest.lines().last().unwrap()).unwrap();
    assert_eq!(report["result"], "stopped");
    std::fs::remove_dir_all(dir).unwrap();
}

/// The `SigBlk` mask of process `pid`'s thread `kiln-vcpu0`.
fn vcpu_thread_blocked_signals(pid: u32) -> u64 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    for task in tasks {
        let dir = task.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim() != "kiln-vcpu0" {
            continue;
        }
        let status = std::fs::read_to_string(dir.join("status")).unwrap();
        let mask = status
            .lines()
            .find_map(|l| l.strip_prefix("SigBlk:"))
            .unwrap()
            .trim();
        return u64::from_str_radix(mask, 16).unwrap();
    }
    panic!("no kiln-vcpu0 thread in /proc/{pid}/task");
}
