//! kiln's benchmarks. Each prints one JSON object per line on stdout (see "Names that
//! scripts and CI rely on" in ARCHITECTURE.md); progress goes to stderr. Run them with
//! `cargo xtask bench`, which also collects them into `target/bench.json`.

mod blk;
mod boot;
mod docker;
mod empty_job;
mod fork;
mod gitlab_job;
mod image_pull;
mod kernel;
mod kiln_process;
mod nesting;
mod net;
mod peer;
mod restore_direct;
mod snapshot;
mod stats;
mod timeline;
mod vmm_memory;
mod vmm_setup;
mod vsock;

use anyhow::Result;
use clap::Parser;

/// kiln benchmarks.
#[derive(Parser)]
struct Args {
    /// Only run benchmarks whose name contains this (or, comma-separated, one of these).
    filter: Option<String>,
    /// Guest boots to time for `boot` (at least 10 for a quotable median).
    #[arg(long, default_value_t = 10)]
    boot_runs: usize,
    /// The git revision whose `kernel-config/guest.config` `kernel_change` boots against this
    /// checkout's (default: `$KILN_BENCH_BASE_KERNEL`; without one it is skipped).
    #[arg(long, value_name = "REV")]
    base_kernel: Option<String>,
    /// Runs for `vmm_setup` and `restore_direct`.
    #[arg(long, default_value_t = 30)]
    setup_runs: usize,
    /// Transfers to time for `vsock_throughput` (at least 5 for a quotable median).
    #[arg(long, default_value_t = 5)]
    vsock_runs: usize,
    /// MiB per `vsock_throughput` transfer: a few seconds' worth in the test bed.
    #[arg(long, default_value_t = 32)]
    vsock_mib: u64,
    /// Round trips to time for `vsock_exec`.
    #[arg(long, default_value_t = 10)]
    exec_runs: usize,
    /// Runs for each of `snapshot` and `restore` (at least 3 for a median).
    #[arg(long, default_value_t = 3)]
    snapshot_runs: usize,
    /// Forks to time for `fork` and `fork_memory` (at least 3 for a median).
    #[arg(long, default_value_t = 3)]
    fork_runs: usize,
    /// Clones per fork for `fork` and `fork_memory`.
    #[arg(long, default_value_t = 16)]
    fork_count: u32,
    /// Runs of each direction for `blk` (at least 3 for a median).
    #[arg(long, default_value_t = 3)]
    blk_runs: usize,
    /// MiB per `blk` transfer.
    #[arg(long, default_value_t = 64)]
    blk_mib: u64,
    /// Downloads to time for `net` (at least 3 for a median).
    #[arg(long, default_value_t = 3)]
    net_runs: usize,
    /// MiB per `net` download.
    #[arg(long, default_value_t = 20)]
    net_mib: u64,
    /// Creates to time for each of `nesting_create_boot` and `nesting_create_restore`
    /// (at least 3 for a median).
    #[arg(long, default_value_t = 3)]
    nesting_runs: usize,
    /// Jobs to time for each of `gitlab_job_cold` and `gitlab_job_warm`.
    #[arg(long, default_value_t = 3)]
    gitlab_runs: usize,
    /// Pulls to time for `image_pull` (at least 3 for a median).
    #[arg(long, default_value_t = 3)]
    pull_runs: usize,
    /// Boots (`peer_boot`) and restores (`peer_restore`) of each VMM (at least 7 for a
    /// quotable ratio).
    #[arg(long, default_value_t = 7)]
    peer_runs: usize,
    /// Jobs with `--docker` to time for `docker` (each boots the workload image).
    #[arg(long, default_value_t = 3)]
    docker_runs: usize,
}

fn main() -> Result<()> {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some(peer::uds_http::SUBCOMMAND) {
        return peer::uds_http::main(&argv[2..]);
    }
    let args = Args::parse();
    let wanted = |name: &str| {
        args.filter
            .as_deref()
            .is_none_or(|f| f.split(',').any(|f| name.contains(f)))
    };
    let bins = kiln_tests::artifacts::static_binaries()?;
    let mut results = Vec::new();
    if wanted("vmm_setup") {
        eprintln!(
            "bench vmm_setup: {} runs on the direct path",
            args.setup_runs
        );
        results.extend(vmm_setup::run(&bins.kiln, args.setup_runs)?);
    }
    if wanted("vmm_memory") {
        eprintln!("bench vmm_memory: 5 VMs on the direct path");
        results.extend(vmm_memory::run(&bins.kiln, 5)?);
    }
    if wanted("restore_direct") {
        eprintln!(
            "bench restore_direct: {} restores on the direct path",
            args.setup_runs
        );
        results.extend(restore_direct::run(&bins.kiln, args.setup_runs)?);
    }
    if wanted("empty_job") {
        let runner = kiln_tests::Runner::detect()?;
        eprintln!("bench empty_job: 5 jobs of `true`, {}", runner.describe());
        results.extend(empty_job::run(&runner, 5)?);
    }
    if wanted("boot_timeline") {
        let runner = kiln_tests::Runner::detect()?;
        eprintln!(
            "bench boot_timeline: one boot with initcall_debug, {}",
            runner.describe()
        );
        results.extend(timeline::run(&runner)?);
    }
    if wanted("boot") {
        let runner = kiln_tests::Runner::detect()?;
        eprintln!(
            "bench boot: {} boots, {}",
            args.boot_runs,
            runner.describe()
        );
        results.extend(boot::run(&runner, args.boot_runs)?);
    }
    if wanted("boot_acpi") {
        let runner = kiln_tests::Runner::detect()?;
        eprintln!(
            "bench boot_acpi: {} boots each with and without ACPI tables, alternating, {}",
            args.boot_runs,
            runner.describe()
        );
        results.extend(boot::run_acpi(&runner, args.boot_runs)?);
    }
    if wanted("boot_root_disk") {
        let runner = kiln_tests::Runner::detect()?;
        eprintln!(
            "bench boot (root disk): {} boots, {}",
            args.boot_runs,
            runner.describe()
        );
        results.extend(boot::run_root_disk(&runner, args.boot_runs)?);
    }
    if wanted("peer_boot") {
        let runner = kiln_tests::Runner::detect()?;
        eprintln!(
            "bench peer_boot: {} boots each of kiln and Firecracker, alternating, {}",
            args.peer_runs,
            runner.describe()
        );
        results.extend(peer::boot(&runner, args.peer_runs)?);
    }
    if wanted("peer_restore") {
        let runner = kiln_tests::Runner::detect()?;
        eprintln!(
            "bench peer_restore: {} restores each of kiln and Firecracker, alternating, {}",
            args.peer_runs,
            runner.describe()
        );
        results.extend(peer::restore(&runner, args.peer_runs)?);
    }
    if wanted("guest_kernel") {
        eprintln!("bench guest_kernel: size of the guest kernel build");
        results.extend(kernel::size()?);
    }
    if wanted("kernel_change") {
        let base = args
            .base_kernel
            .clone()
            .or_else(|| std::env::var("KILN_BENCH_BASE_KERNEL").ok())
            .filter(|rev| !rev.is_empty());
        let runner = kiln_tests::Runner::detect()?;
        eprintln!(
            "bench kernel_change: {} boots each of this guest kernel and {}'s, alternating, {}",
            args.boot_runs,
            base.as_deref().unwrap_or("(no base revision)"),
            runner.describe()
        );
        results.extend(kernel::change(&runner, base.as_deref(), args.boot_runs)?);
    }
    let (throughput, exec) = (wanted("vsock_throughput"), wanted("vsock_exec"));
    if throughput || exec {
        let runner = kiln_tests::Runner::detect()?;
        let params = vsock::Params {
            throughput_runs: if throughput { args.vsock_runs } else { 0 },
            mib: args.vsock_mib,
            exec_runs: if exec { args.exec_runs } else { 0 },
        };
        eprintln!(
            "bench vsock: {} transfers of {} MiB, {} exec round trips, {}",
            params.throughput_runs,
            params.mib,
            params.exec_runs,
            runner.describe()
        );
        results.extend(vsock::run(&runner, &params)?);
    }
    let (snap, restore) = (wanted("snapshot"), wanted("restore"));
    if snap || restore {
        let runner = kiln_tests::Runner::detect()?;
        let runs = |on: bool| if on { args.snapshot_runs } else { 0 };
        let params = snapshot::Params {
            snapshot_runs: runs(snap),
            restore_runs: runs(restore),
        };
        eprintln!(
            "bench snapshot/restore: {} snapshots, {} restores, {}",
            params.snapshot_runs,
            params.restore_runs,
            runner.describe()
        );
        results.extend(snapshot::run(&runner, &params)?);
    }
    if wanted("fork_100") {
        let runner = kiln_tests::Runner::detect()?;
        eprintln!(
            "bench fork_100: 100 clones, then 1, of one snapshot, {}",
            runner.describe()
        );
        results.extend(fork::hundred(&runner)?);
    }
    if wanted("fork") || wanted("fork_memory") {
        let runner = kiln_tests::Runner::detect()?;
        let params = fork::Params {
            runs: args.fork_runs,
            count: args.fork_count,
        };
        eprintln!(
            "bench fork/fork_memory: {} forks of {} clones, {}",
            params.runs,
            params.count,
            runner.describe()
        );
        results.extend(fork::run(&runner, &params)?);
    }
    if wanted("blk") {
        let runner = kiln_tests::Runner::detect()?;
        eprintln!(
            "bench blk: {} writes and {} reads of {} MiB, {}",
            args.blk_runs,
            args.blk_runs,
            args.blk_mib,
            runner.describe()
        );
        results.extend(blk::run(
            &runner,
            &blk::Params {
                runs: args.blk_runs,
                mib: args.blk_mib,
            },
        )?);
    }
    if wanted("net") {
        let runner = kiln_tests::Runner::detect()?;
        eprintln!(
            "bench net: {} downloads of {} MiB over a TAP, {}",
            args.net_runs,
            args.net_mib,
            runner.describe()
        );
        results.extend(net::run(
            &runner,
            &net::Params {
                runs: args.net_runs,
                mib: args.net_mib,
            },
        )?);
    }
    if wanted("nesting_create_boot") || wanted("nesting_create_restore") {
        let runner = kiln_tests::Runner::detect()?;
        eprintln!(
            "bench nesting_create_boot/nesting_create_restore: {} Creates each, {}",
            args.nesting_runs,
            runner.describe()
        );
        results.extend(nesting::run(&runner, args.nesting_runs)?);
    }
    if wanted("gitlab_job_cold") || wanted("gitlab_job_warm") {
        let runner = kiln_tests::Runner::detect()?;
        eprintln!(
            "bench gitlab_job_cold, gitlab_job_warm: {} jobs each, {}",
            args.gitlab_runs,
            runner.describe()
        );
        results.extend(gitlab_job::run(&runner, &bins, args.gitlab_runs)?);
    }
    if wanted("image_pull") {
        eprintln!(
            "bench image_pull: {} pulls of a ~50 MiB image from a loopback registry, direct",
            args.pull_runs
        );
        results.extend(image_pull::run(&bins, args.pull_runs)?);
    }
    if wanted("docker") {
        results.extend(docker::run(args.docker_runs)?);
    }
    for r in &results {
        println!("{r}");
    }
    Ok(())
}
