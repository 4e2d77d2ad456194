//! `kiln-gitlab`'s command line, in the library so that the package build can make its
//! manual pages and shell completions from it.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// GitLab Runner custom-executor driver: every CI job in its own kiln microVM.
///
/// Configure the runner with `config_exec`, `prepare_exec`, `run_exec` and `cleanup_exec`
/// all set to this binary and `*_args` to the subcommand. Exit codes follow the custom
/// executor's contract: 0, $BUILD_FAILURE_EXIT_CODE (the script's own code written to
/// $BUILD_EXIT_CODE_FILE), or $SYSTEM_FAILURE_EXIT_CODE.
#[derive(Parser, Debug)]
#[command(name = "kiln-gitlab", version)]
pub struct Cli {
    /// The driver's TOML config (default: $KILN_GITLAB_CONFIG, else
    /// /etc/kiln-gitlab/config.toml if it exists, else built-in defaults).
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print the executor's settings as JSON (builds_dir, cache_dir, driver, shell).
    Config,
    /// Start the job's VM (from its image, or from KILN_FROM_SNAPSHOT) and wait for its agent.
    Prepare,
    /// Run one stage's script in the job's VM, streaming its output.
    Run {
        /// The script the runner wrote for this stage.
        script: PathBuf,
        /// The stage's name (prepare_script, get_sources, build_script, …).
        stage: String,
    },
    /// Stop the job's VM and remove its files. Always exits 0.
    Cleanup,
    /// GitLab Runner's VM-isolation ("nesting") provider: `nesting serve`.
    #[command(subcommand)]
    Nesting(NestingCommand),
}

#[derive(Subcommand, Debug)]
pub enum NestingCommand {
    /// Serve the runner's nesting gRPC interface: each Create boots a kiln VM of a store
    /// image in the given slot and returns its SSH address. --config names the server's
    /// TOML config (default: $KILN_NESTING_CONFIG, else /etc/kiln-gitlab/nesting.toml if
    /// it exists, else built-in defaults).
    Serve {
        /// The Unix socket (default: the config's `socket`, else $NESTING_SOCKET, else
        /// /run/kiln/nesting.sock).
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Also serve on TCP, tcp://ADDR:PORT (plaintext, unauthenticated).
        #[arg(long, value_name = "tcp://ADDR:PORT")]
        listen: Option<String>,
    },
    /// Make one of the runner's calls on a nesting server and print the answer as JSON.
    Call {
        /// The server's Unix socket.
        #[arg(long, value_name = "PATH", default_value = "/run/kiln/nesting.sock")]
        socket: PathBuf,
        #[command(subcommand)]
        call: NestingCall,
    },
}

#[derive(Subcommand, Debug)]
pub enum NestingCall {
    /// Init with a nesting_config JSON (default `null`).
    Init {
        #[arg(default_value = "null", value_name = "JSON")]
        json: String,
    },
    /// Create a VM of IMAGE in --slot.
    Create {
        image: String,
        #[arg(long, allow_negative_numbers = true)]
        slot: Option<i32>,
    },
    /// Delete the VM ID.
    Delete { id: String },
    /// List the VMs.
    List,
    /// Delete every VM.
    Shutdown,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
