//! `kiln shell`: an interactive login shell in a running VM, on a terminal in the guest
//! driven from this one (`kiln exec -t` of the guest's shell for root).

use std::process::ExitCode;

use kiln_agent::client::{Client, ClientError};

use super::common::{connect_agent, exec_on_terminal, exec_request, require_terminal};
use crate::cli::ShellArgs;

/// The shell when the guest's /etc/passwd names none for root.
const DEFAULT_SHELL: &str = "/bin/sh";

pub fn shell(args: &ShellArgs) -> anyhow::Result<ExitCode> {
    require_terminal("kiln shell")?;
    let uds = &args.target.vsock;
    let mut client = connect_agent(uds)?;
    let shell = login_shell(&mut client)?;
    let req = exec_request(&args.target, &[shell, "-l".into()])?;
    exec_on_terminal(uds, &mut client, req)
}

/// Root's login shell in the guest's /etc/passwd; [`DEFAULT_SHELL`] if there is no such
/// file (an initramfs) or it names none.
fn login_shell(client: &mut Client) -> anyhow::Result<String> {
    let mut passwd = Vec::new();
    match client.get_file("/etc/passwd", &mut passwd) {
        Ok(_) => {}
        // The agent answered: no such file, or unreadable; the connection goes on.
        Err(ClientError::Remote(_)) => return Ok(DEFAULT_SHELL.into()),
        Err(e) => return Err(e.into()),
    }
    Ok(root_shell(&String::from_utf8_lossy(&passwd)).unwrap_or_else(|| DEFAULT_SHELL.into()))
}

/// The shell field of the first uid-0 entry of a passwd file, if it has one.
fn root_shell(passwd: &str) -> Option<String> {
    passwd
        .lines()
        .map(|line| line.split(':').collect::<Vec<_>>())
        .find(|fields| fields.len() == 7 && fields[2] == "0")
        .map(|fields| fields[6].trim().to_owned())
        .filter(|shell| shell.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::root_shell;

    #[test]
    fn root_shell_comes_from_the_first_uid_0_entry() {
        let passwd = "daemon:x:1:1::/usr/sbin:/usr/sbin/nologin\n\
                      root:x:0:0:root:/root:/bin/bash\n\
                      toor:x:0:0::/root:/bin/zsh\n";
        assert_eq!(root_shell(passwd).as_deref(), Some("/bin/bash"));
        assert_eq!(root_shell("root:x:0:0:root:/root:\n"), None);
        assert_eq!(root_shell("root:x:0:0:root:/root\n"), None);
        assert_eq!(root_shell(""), None);
    }
}
