//! The `kiln` binary: parses the command line and hands each subcommand to
//! `kiln::commands`.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use kiln::cli::{Cli, Command};
use kiln::commands;

fn main() -> ExitCode {
    let start = Instant::now();
    let cli = Cli::parse();
    // `kiln job`'s stderr carries the job's own stderr, byte for byte: kiln adds only
    // warnings and errors to it unless KILN_LOG asks for more (`--json` reports boot_ms).
    let default_level = match cli.command {
        // `kiln ctl` prints the response; only problems belong on stderr.
        Command::Job(_) | Command::Ctl(_) | Command::Doctor | Command::Ps(_) => "warn",
        _ => "info",
    };
    // kiln's log is its stderr; when that is a file (a job's state directory), a guest that
    // triggers warnings must not grow it without bound.
    let log_cap = match kiln::logcap::cap_from_env(
        kiln::logcap::LOG_MAX_ENV,
        kiln::logcap::DEFAULT_LOG_MAX_BYTES,
    ) {
        Ok(cap) => cap,
        Err(e) => {
            eprintln!("kiln: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::sync::Mutex::new(kiln::logcap::log_writer(log_cap)))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .without_time()
        .init();
    let result = match cli.command {
        Command::Run(args) => commands::run::run(&args, start),
        Command::Ctl(args) => commands::ctl::ctl(&args),
        Command::Doctor => commands::doctor::doctor(),
        Command::Ps(args) => commands::ps::ps(&args),
        Command::Restore(args) => commands::restore::restore(&args, start),
        Command::Fork(args) => commands::fork::fork(&args),
        Command::Exec(args) => commands::exec::exec(&args),
        Command::Shell(args) => commands::shell::shell(&args),
        Command::Cp(args) => commands::cp::cp(&args),
        Command::Job(args) => commands::job::job(&args, start),
        Command::Jail(args) => commands::jail::jail(&args),
        Command::Image(args) => commands::image::image(&args),
        Command::Net(cmd) => commands::net::net(&cmd).map(|()| std::process::ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kiln: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
