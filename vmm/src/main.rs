//! The `kiln` binary: parses the command line, runs the VM, maps how it ended to an exit
//! code.

use std::fs::OpenOptions;
use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use kiln::cli::{Cli, Command, RunArgs};
use kiln::config::{SerialOutput, VmConfig};
use kiln::vmm::{BootSource, GuestExit, MachineSpec, Vmm};

fn main() -> ExitCode {
    let start = Instant::now();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_target(false)
        .without_time()
        .init();
    let result = match cli.command {
        Command::Run(args) => run(&args, start),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kiln: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn console_sink(serial: &SerialOutput) -> anyhow::Result<Box<dyn Write + Send>> {
    Ok(match serial {
        SerialOutput::Stdout => Box::new(std::io::stdout()),
        SerialOutput::Null => Box::new(std::io::sink()),
        SerialOutput::File(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open serial output file {}", path.display()))?,
        ),
    })
}

/// Opens `path` and reads a byte, so that a missing file, a directory or a file without
/// read permission is reported by name before any VM is built.
fn check_readable(what: &str, path: &std::path::Path) -> anyhow::Result<()> {
    use std::io::Read;
    let context = || format!("cannot read {what} {}", path.display());
    let mut file = std::fs::File::open(path).with_context(context)?;
    if file.metadata().with_context(context)?.is_dir() {
        anyhow::bail!("cannot read {what} {}: it is a directory", path.display());
    }
    file.read(&mut [0u8; 1]).with_context(context)?;
    Ok(())
}

fn run(args: &RunArgs, start: Instant) -> anyhow::Result<ExitCode> {
    let config: VmConfig = args.to_config()?;
    check_readable("kernel", &config.kernel)?;
    if let Some(initrd) = &config.initrd {
        check_readable("initramfs", initrd)?;
    }
    let spec = MachineSpec {
        vcpus: config.vcpus,
        memory_mib: config.memory_mib,
        boot: BootSource::Linux {
            kernel: config.kernel.clone(),
            initrd: config.initrd.clone(),
            cmdline: config.cmdline.clone(),
        },
        console: console_sink(&config.serial)?,
        irqchip: true,
        extra_mmio: Vec::new(),
        start,
    };
    let report = Vmm::build(spec)?.run()?;
    let code = if report.exit.is_success() { 0 } else { 1 };
    match &report.exit {
        GuestExit::Reset | GuestExit::Halted => tracing::info!("guest {}", report.exit.kind()),
        GuestExit::Panic(line) => eprintln!("kiln: error: guest kernel panic: {line}"),
        GuestExit::Fault(msg) => eprintln!("kiln: error: VM fault: {msg}"),
    }
    if args.json {
        let detail = match &report.exit {
            GuestExit::Panic(s) | GuestExit::Fault(s) => Some(s.as_str()),
            _ => None,
        };
        let json = serde_json::json!({
            "result": report.exit.kind(),
            "boot_ms": report.boot_time.map(|t| t.as_secs_f64() * 1e3),
            "setup_ms": report.setup_time.map(|t| t.as_secs_f64() * 1e3),
            "exit_code": code,
            "detail": detail,
        });
        let mut out = std::io::stdout().lock();
        writeln!(out, "\n{json}")?;
    }
    Ok(ExitCode::from(code))
}
