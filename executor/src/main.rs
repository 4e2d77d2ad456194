//! `kiln-gitlab`: GitLab Runner's custom-executor driver that runs every job in its own kiln
//! microVM. The runner calls it as `config`, `prepare`, `run <script> <stage>` (once per
//! stage) and `cleanup`; see `docs/gitlab.md`.

use std::process::ExitCode;

use clap::Parser;
use kiln_gitlab::cli::{Cli, Command, NestingCall, NestingCommand};

mod config;
mod contract;
mod defaults;
mod identity;
mod launch;
mod nesting;
mod prepare;
mod pull;
mod run;
mod slot;
mod snapshot;
mod state;
mod store;
mod warm;

use config::Config;
use contract::{Contract, Failure};

fn main() -> ExitCode {
    // What the driver and the kiln processes it starts make (job state, pid files, logs,
    // slot locks, jails, snapshots) holds or controls a job's data: private to root unless
    // a mode is set on purpose (the snapshots' group, the nesting socket's mode).
    // SAFETY: umask only sets this process's file-creation mask; it cannot fail.
    unsafe { libc::umask(0o077) };
    let cli = Cli::parse();
    if let Command::Nesting(NestingCommand::Call { socket, call }) = &cli.command {
        let call = match call {
            NestingCall::Init { json } => nesting::client::Call::Init {
                config: json.clone(),
            },
            NestingCall::Create { image, slot } => nesting::client::Call::Create {
                image: image.clone(),
                slot: *slot,
            },
            NestingCall::Delete { id } => nesting::client::Call::Delete { id: id.clone() },
            NestingCall::List => nesting::client::Call::List,
            NestingCall::Shutdown => nesting::client::Call::Shutdown,
        };
        return match nesting::client::call(socket, &call) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("kiln-gitlab nesting call: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    // The nesting server has a config of its own and none of the custom executor's contract.
    if let Command::Nesting(NestingCommand::Serve { socket, listen }) = &cli.command {
        let args = nesting::ServeArgs {
            socket: socket.clone(),
            listen: listen.clone(),
            config: cli.config.clone(),
        };
        return match nesting::serve(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("kiln-gitlab nesting: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let contract = Contract::from_env();
    let result = Config::load(cli.config.as_deref())
        .map_err(Failure::System)
        .and_then(|config| dispatch(&cli.command, &config, &contract));
    let code = match result {
        Ok(()) => 0,
        Err(failure) => {
            match &failure {
                Failure::System(e) => eprintln!("kiln-gitlab: system failure: {e:#}"),
                Failure::Build(code) => eprintln!("kiln-gitlab: the script exited with {code}"),
                Failure::Cancelled(_) => {}
            }
            failure.exit_code(&contract)
        }
    };
    if matches!(cli.command, Command::Cleanup) {
        return ExitCode::SUCCESS;
    }
    ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1))
}

fn dispatch(command: &Command, config: &Config, contract: &Contract) -> Result<(), Failure> {
    match command {
        Command::Config => {
            println!("{}", config_json(config));
            Ok(())
        }
        Command::Prepare => prepare::prepare(config, contract).map_err(Failure::System),
        Command::Run { script, stage } => run::run(config, contract, script, stage),
        Command::Nesting(_) => Err(Failure::System(anyhow::anyhow!(
            "nesting commands do not take the executor's config"
        ))),
        Command::Cleanup => {
            match cleanup(config, contract) {
                Ok(Some(how)) => println!("kiln-gitlab: {how}"),
                Ok(None) => {}
                Err(e) => eprintln!("kiln-gitlab: cleanup: {e:#}"),
            }
            Ok(())
        }
    }
}

/// Stops this job's VM and removes its files; another token's job directory is left alone.
fn cleanup(config: &Config, contract: &Contract) -> anyhow::Result<Option<String>> {
    let identity = identity::Identity::load(contract.job_response_file.as_deref())?;
    let job = state::JobDir::for_job(&config.state_dir, &identity)?;
    match job.ownership(&identity) {
        state::Ownership::Absent => Ok(None),
        state::Ownership::Ours => job.remove(),
        state::Ownership::Foreign => anyhow::bail!("{}", job.foreign(&identity)),
    }
}

fn config_json(config: &Config) -> serde_json::Value {
    serde_json::json!({
        "builds_dir": config.builds_dir,
        "cache_dir": config.cache_dir,
        "builds_dir_is_shared": false,
        "driver": {"name": "kiln-gitlab", "version": env!("CARGO_PKG_VERSION")},
        "shell": "bash",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_answers_the_runner() {
        let c = Config::from_file(config::ConfigFile::default(), &config::Env::default());
        let json = config_json(&c);
        assert_eq!(json["builds_dir"], "/builds");
        assert_eq!(json["builds_dir_is_shared"], false);
        assert_eq!(json["driver"]["name"], "kiln-gitlab");
    }

    #[test]
    fn exit_codes_follow_the_contract() {
        let c = Contract::from_vars([
            ("BUILD_FAILURE_EXIT_CODE".to_string(), "71".to_string()),
            ("SYSTEM_FAILURE_EXIT_CODE".to_string(), "72".to_string()),
        ]);
        assert_eq!(Failure::Build(3).exit_code(&c), 71);
        assert_eq!(Failure::System(anyhow::anyhow!("x")).exit_code(&c), 72);
        assert_eq!(Failure::Cancelled(15).exit_code(&c), 143);
    }
}
