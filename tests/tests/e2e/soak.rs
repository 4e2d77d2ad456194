//! The soak in the normal suite: a shorter `cargo xtask soak`. Sequential
//! `kiln job`s, then 16 VMs at once in cgroup slots; the machine running kiln (the test-bed
//! host) must get back its fds, threads, processes, sockets, network devices, cgroups and
//! memory. See `kiln_tests::soak`.

use anyhow::{ensure, Result};
use kiln_tests::soak::{self, Soak};
use kiln_tests::Runner;

#[test]
fn soak_jobs_and_concurrent_vms_leave_nothing_behind() -> Result<()> {
    let runner = Runner::detect()?;
    let want = Soak {
        jobs: 30,
        concurrent: 16,
    };
    let report = soak::run(&runner, want)?;
    println!("{}", report.json());
    println!("{}", report.table());
    ensure!(
        report.jobs_ok == want.jobs,
        "failed jobs: {}",
        report.json()
    );
    ensure!(
        report.concurrent_ok == want.concurrent,
        "VMs that never answered: {}\n{}",
        report.json(),
        report.tail
    );
    // The peak must show the VMs, or the counts measure nothing.
    ensure!(
        report.peak.get("kiln_processes") == Some(i64::from(want.concurrent)),
        "the VMs did not all run at once: {}",
        report.json()
    );
    let leaks = report.leaks();
    ensure!(leaks.is_empty(), "leaks: {leaks:?}\n{}", report.table());
    Ok(())
}
