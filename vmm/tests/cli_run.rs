//! `kiln run` end to end on the direct path, with a tiny ELF kernel that prints, marks boot
//! done and resets (see `kiln_tests::tiny_kernel`).

use std::process::Command;

#[test]
fn marks_match_the_agent() {
    use kiln_tests::tiny_kernel::kiln_agent_marks as copy;
    assert_eq!(copy::SIGNAL_PORT, kiln_agent::marks::SIGNAL_PORT);
    assert_eq!(copy::BOOT_DONE, kiln_agent::marks::BOOT_DONE);
}

#[test]
fn run_reports_json_and_exits_zero_on_reset() {
    let dir = std::env::temp_dir().join(format!("kiln-cli-run-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = dir.join("tiny.elf");
    std::fs::write(
        &kernel,
        kiln_tests::tiny_kernel::build("tiny kernel says hi\n"),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--vcpus",
            "2",
            "--memory",
            "64",
            "--json",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.starts_with("tiny kernel says hi\n"), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(report["result"], "reset");
    assert_eq!(report["exit_code"], 0);
    let boot_ms = report["boot_ms"].as_f64().expect("boot_ms is a number");
    let setup_ms = report["setup_ms"].as_f64().expect("setup_ms is a number");
    assert!(setup_ms > 0.0 && boot_ms >= setup_ms, "{report}");
    assert!(stderr.contains("guest boot done in"), "{stderr}");

    // The same VM from a TOML config file, console to a file.
    let config = dir.join("vm.toml");
    std::fs::write(
        &config,
        "kernel = \"tiny.elf\"\nmemory_mib = 32\nserial = \"console.log\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["run", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("console.log")).unwrap(),
        "tiny kernel says hi\n"
    );
    std::fs::remove_dir_all(dir).unwrap();
}
