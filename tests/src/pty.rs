//! Driving a program through a pseudo-terminal, as a person at a terminal would: the
//! program gets the PTY's slave as its controlling terminal (stdin, stdout and stderr), the
//! driver types into the master, reads what it shows, and resizes it.
//!
//! A conversation is a script of steps, one a line, so that the same one runs here and, as
//! the `kiln-pty` program, inside the test bed:
//!
//! - `expect TEXT`: wait until the output after the previous match holds TEXT;
//! - `send TEXT`: type TEXT;
//! - `resize ROWS COLS`: give the terminal a new size (the program gets SIGWINCH);
//! - `exit CODE`: wait for the program to end, with exit code CODE;
//! - `restored`: the terminal is back in canonical mode with echo (the program left it as
//!   it found it).
//!
//! TEXT may hold `\r`, `\n`, `\\` and `\xNN` (`\x03` is Ctrl-C).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

/// One step of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Expect(Vec<u8>),
    Send(Vec<u8>),
    Resize(u16, u16),
    Exit(i32),
    Restored,
}

/// Parses a conversation script (see the module docs); blank lines and `#` lines are skipped.
pub fn parse(script: &str) -> Result<Vec<Step>> {
    let mut steps = Vec::new();
    for (n, line) in script.lines().enumerate() {
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        let at = || format!("line {}: {line:?}", n + 1);
        let step = match word {
            "expect" if rest.is_empty() => bail!("{}: expect needs a text", at()),
            "expect" => Step::Expect(unescape(rest).with_context(at)?),
            "send" => Step::Send(unescape(rest).with_context(at)?),
            "resize" => {
                let (r, c) = rest.split_once(' ').with_context(at)?;
                Step::Resize(r.parse().with_context(at)?, c.parse().with_context(at)?)
            }
            "exit" => Step::Exit(rest.parse().with_context(at)?),
            "restored" => Step::Restored,
            other => bail!("{}: unknown step {other:?}", at()),
        };
        steps.push(step);
    }
    Ok(steps)
}

fn unescape(text: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut bytes = text.bytes();
    while let Some(b) = bytes.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match bytes.next() {
            Some(b'r') => out.push(b'\r'),
            Some(b'n') => out.push(b'\n'),
            Some(b'\\') => out.push(b'\\'),
            Some(b'x') => {
                let hex: Vec<u8> = bytes.by_ref().take(2).collect();
                let hex = std::str::from_utf8(&hex)?;
                out.push(u8::from_str_radix(hex, 16).with_context(|| format!("\\x{hex}"))?);
            }
            other => bail!("unknown escape \\{}", other.map_or('?', char::from)),
        }
    }
    Ok(out)
}

/// A program running on a pseudo-terminal.
pub struct Pty {
    master: File,
    /// The driver's own handle on the slave: to read its settings after the program ended.
    slave: File,
    child: Child,
    pidfd: OwnedFd,
    output: Vec<u8>,
    /// Where the next `expect` starts looking.
    matched: usize,
}

fn check(r: libc::c_int, what: &str) -> Result<libc::c_int> {
    if r < 0 {
        return Err(std::io::Error::last_os_error()).context(what.to_string());
    }
    Ok(r)
}

impl Pty {
    /// Starts `command` on a new terminal of `rows` × `cols`.
    pub fn spawn(mut command: Command, rows: u16, cols: u16) -> Result<Pty> {
        let (mut master, mut slave) = (0, 0);
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let null = std::ptr::null_mut();
        // SAFETY: openpty writes two descriptors; the name and termios pointers may be null
        // and `ws` lives across the call.
        let r = unsafe { libc::openpty(&mut master, &mut slave, null, std::ptr::null(), &ws) };
        check(r, "openpty")?;
        // SAFETY: both descriptors were just created and nothing else owns them.
        let (master, slave) = unsafe { (File::from_raw_fd(master), File::from_raw_fd(slave)) };
        let stdio = |f: &File| -> Result<Stdio> { Ok(Stdio::from(f.try_clone()?)) };
        command
            .stdin(stdio(&slave)?)
            .stdout(stdio(&slave)?)
            .stderr(stdio(&slave)?);
        // SAFETY: the closure runs in the forked child before exec and makes only two
        // async-signal-safe system calls.
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .context("starting the program on the terminal")?;
        let id = libc::pid_t::try_from(child.id())?;
        // SAFETY: pidfd_open creates a descriptor (owned below) and reads nothing.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, id, 0) };
        ensure!(fd >= 0, "pidfd_open: {}", std::io::Error::last_os_error());
        // SAFETY: the descriptor was just created and nothing else owns it.
        let pidfd = unsafe { OwnedFd::from_raw_fd(i32::try_from(fd)?) };
        Ok(Pty {
            master,
            slave,
            child,
            pidfd,
            output: Vec::new(),
            matched: 0,
        })
    }

    /// Everything the program has shown so far.
    pub fn output(&self) -> String {
        String::from_utf8_lossy(&self.output).into_owned()
    }

    /// Waits up to `timeout` for output (or, with `exit`, the program's end); false if
    /// neither came.
    fn wait(&mut self, timeout: Duration, exit: bool) -> Result<bool> {
        let mut fds = [
            libc::pollfd {
                fd: self.master.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if exit { self.pidfd.as_raw_fd() } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `fds` is an array of two pollfds that lives across the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            ensure!(e.kind() == std::io::ErrorKind::Interrupted, "poll: {e}");
            return Ok(true);
        }
        if fds[0].revents != 0 {
            let mut buf = [0u8; 4096];
            match self.master.read(&mut buf) {
                Ok(n) => self.output.extend_from_slice(&buf[..n]),
                Err(e) if e.raw_os_error() == Some(libc::EIO) => {}
                Err(e) => return Err(e).context("reading the terminal"),
            }
        }
        Ok(n > 0)
    }

    /// Runs one step; `timeout` bounds each wait.
    pub fn step(&mut self, step: &Step, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        match step {
            Step::Expect(text) => loop {
                let rest = &self.output[self.matched..];
                if let Some(at) = rest.windows(text.len()).position(|w| w == text.as_slice()) {
                    self.matched += at + text.len();
                    return Ok(());
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() || !self.wait(left, false)? {
                    bail!(
                        "no {:?} on the terminal within {timeout:?}",
                        String::from_utf8_lossy(text)
                    );
                }
            },
            Step::Send(text) => self.master.write_all(text).context("typing"),
            Step::Resize(rows, cols) => {
                let ws = libc::winsize {
                    ws_row: *rows,
                    ws_col: *cols,
                    ws_xpixel: 0,
                    ws_ypixel: 0,
                };
                // SAFETY: TIOCSWINSZ reads one winsize, which lives across the call.
                check(
                    unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &ws) },
                    "resizing the terminal",
                )
                .map(drop)
            }
            Step::Exit(code) => loop {
                if let Some(status) = self.child.try_wait()? {
                    // What it showed last.
                    while self.wait(Duration::ZERO, false)? {}
                    ensure!(
                        status.code() == Some(*code),
                        "the program ended with {status}, not exit code {code}"
                    );
                    return Ok(());
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() || !self.wait(left, true)? {
                    bail!("the program did not end within {timeout:?}");
                }
            },
            Step::Restored => {
                // SAFETY: an all-zero termios is a valid value for tcgetattr to overwrite.
                let mut t: libc::termios = unsafe { std::mem::zeroed() };
                // SAFETY: tcgetattr writes one termios, which lives across the call.
                let r = unsafe { libc::tcgetattr(self.slave.as_raw_fd(), &mut t) };
                check(r, "reading the terminal's settings")?;
                let want = libc::ICANON | libc::ECHO | libc::ISIG;
                ensure!(
                    t.c_lflag & want == want,
                    "the terminal was left in raw mode (c_lflag {:#o})",
                    t.c_lflag
                );
                Ok(())
            }
        }
    }

    /// Runs `steps` in order; the error names the step that failed and quotes the output.
    pub fn converse(&mut self, steps: &[Step], timeout: Duration) -> Result<()> {
        for (n, step) in steps.iter().enumerate() {
            if let Err(e) = self.step(step, timeout) {
                bail!(
                    "step {} ({step:?}): {e:#}; the terminal showed:\n{}",
                    n + 1,
                    self.output()
                );
            }
        }
        Ok(())
    }
}

impl Drop for Pty {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_parse_with_escapes() {
        let steps =
            parse("# c\nexpect a\\r\\n\nsend \\x03x\\\\\nresize 40 100\nexit 7\nrestored\n")
                .unwrap();
        assert_eq!(
            steps,
            [
                Step::Expect(b"a\r\n".to_vec()),
                Step::Send(b"\x03x\\".to_vec()),
                Step::Resize(40, 100),
                Step::Exit(7),
                Step::Restored,
            ]
        );
        assert!(parse("jump 3").is_err());
        assert!(parse("send \\q").is_err());
    }

    #[test]
    fn a_shell_on_the_terminal_converses() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "stty size; read l; echo \"[$l]\"; exit 4"]);
        let mut pty = Pty::spawn(cmd, 30, 90).unwrap();
        let steps = parse("expect 30 90\nsend hi\\r\nexpect [hi]\nexit 4\nrestored").unwrap();
        pty.converse(&steps, Duration::from_secs(20)).unwrap();
        let steps = parse("expect never").unwrap();
        let err = pty.converse(&steps, Duration::from_millis(50)).unwrap_err();
        assert!(err.to_string().contains("no \"never\""), "{err}");
    }
}
