//! Manual pages and shell completions, made from the binaries' clap definitions: a page per
//! binary and per subcommand (`kiln-image-build.1` for `kiln image build`), and bash and
//! zsh completions for `kiln` and `kiln-gitlab`.

use anyhow::Result;
use clap::CommandFactory;

use crate::tree::Tree;

pub const MAN_DIR: &str = "/usr/share/man/man1";
pub const BASH_DIR: &str = "/usr/share/bash-completion/completions";
pub const ZSH_DIR: &str = "/usr/share/zsh/vendor-completions";

/// The command lines of the packaged binaries that take arguments.
pub fn commands() -> Vec<clap::Command> {
    vec![kiln::cli::Cli::command(), kiln_gitlab::cli::Cli::command()]
}

/// `kiln-agent` is a guest's init and parses no options; its page says what it is.
pub fn agent_command() -> clap::Command {
    clap::Command::new("kiln-agent")
        .version(env!("CARGO_PKG_VERSION"))
        .about("the kiln guest agent, PID 1 of a kiln microVM")
        .long_about(
            "kiln-agent is the init (PID 1) of kiln's guests, not a command to run on the \
             host: `kiln image build|import|pull` install it as /sbin/kiln-agent in a root \
             disk, and the default initramfs in /usr/lib/kiln has it as /init. In the \
             guest it mounts the basic file systems, sets up cgroups, rlimits and the \
             network, and serves kiln's requests (exec, copy, signals, shutdown) on vsock \
             port 1024; with /etc/kiln/rc in the image it runs that script and then reboots. \
             Run as kiln-snapshot inside a job's guest it asks the host for a snapshot \
             (kiln job --snapshot-at). Started outside a guest, as any PID but 1, it refuses \
             to run and exits 2.",
        )
        .disable_help_flag(true)
        .disable_version_flag(true)
}

/// One manual page: its file name (`kiln-job.1`) and roff text.
pub struct Page {
    pub name: String,
    pub roff: Vec<u8>,
}

/// The pages of `cmd` and of each of its subcommands, recursively (hidden ones and `help`
/// left out). `date` is the pages' date (YYYY-MM-DD).
pub fn pages(cmd: clap::Command, date: &str) -> Result<Vec<Page>> {
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let mut out = Vec::new();
    collect(cmd, date, &mut out)?;
    Ok(out)
}

fn collect(cmd: clap::Command, date: &str, out: &mut Vec<Page>) -> Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        collect(sub.clone(), date, out)?;
    }
    let man = clap_mangen::Man::new(cmd)
        .date(date)
        .source(format!("kiln {}", env!("CARGO_PKG_VERSION")))
        .manual("kiln manual");
    let mut roff = Vec::new();
    man.render(&mut roff)?;
    out.push(Page {
        name: man.get_filename(),
        roff,
    });
    Ok(())
}

/// Adds every manual page and completion to `tree`.
pub fn install(tree: &mut Tree, date: &str) -> Result<()> {
    let mut all = Vec::new();
    for cmd in commands() {
        let name = cmd.get_name().to_string();
        let mut bash = Vec::new();
        clap_complete::generate(
            clap_complete::Shell::Bash,
            &mut cmd.clone(),
            &name,
            &mut bash,
        );
        tree.file(&format!("{BASH_DIR}/{name}"), 0o644, &bash)?;
        let mut zsh = Vec::new();
        clap_complete::generate(clap_complete::Shell::Zsh, &mut cmd.clone(), &name, &mut zsh);
        tree.file(&format!("{ZSH_DIR}/_{name}"), 0o644, &zsh)?;
        all.extend(pages(cmd, date)?);
    }
    all.extend(pages(agent_command(), date)?);
    for page in all {
        tree.gz_file(&format!("{MAN_DIR}/{}.gz", page.name), &page.roff)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(cmd: clap::Command) -> Vec<String> {
        pages(cmd, "2026-01-01")
            .unwrap()
            .into_iter()
            .map(|p| p.name)
            .collect()
    }

    #[test]
    fn every_subcommand_has_a_page() {
        let kiln = names(kiln::cli::Cli::command());
        for page in [
            "kiln.1",
            "kiln-job.1",
            "kiln-doctor.1",
            "kiln-shell.1",
            "kiln-image.1",
            "kiln-image-build.1",
            "kiln-net-setup.1",
            "kiln-net-teardown.1",
        ] {
            assert!(kiln.iter().any(|n| n == page), "{page} in {kiln:?}");
        }
        assert!(!kiln.iter().any(|n| n.contains("help")), "{kiln:?}");
        let gitlab = names(kiln_gitlab::cli::Cli::command());
        for page in [
            "kiln-gitlab.1",
            "kiln-gitlab-prepare.1",
            "kiln-gitlab-nesting-serve.1",
            "kiln-gitlab-nesting-call-create.1",
        ] {
            assert!(gitlab.iter().any(|n| n == page), "{page} in {gitlab:?}");
        }
        assert_eq!(names(agent_command()), ["kiln-agent.1"]);
    }

    #[test]
    fn a_page_names_its_command_and_options() {
        let pages = pages(kiln::cli::Cli::command(), "2026-01-01").unwrap();
        let job = pages.iter().find(|p| p.name == "kiln-job.1").unwrap();
        let text = String::from_utf8_lossy(&job.roff);
        let title = format!(
            ".TH kiln-job 1 2026-01-01 \"kiln {}\" \"kiln manual\"\n",
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.contains(&title), "{text}");
        assert!(text.contains("\\-\\-kernel"), "{text}");
    }
}
