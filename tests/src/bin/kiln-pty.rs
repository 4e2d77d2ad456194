//! `kiln-pty SCRIPT ROWS COLS TIMEOUT_S -- PROGRAM [ARGS…]`: runs PROGRAM on a new
//! pseudo-terminal of ROWS × COLS and holds the conversation in the file SCRIPT with it
//! (see `kiln_tests::pty`), each step within TIMEOUT_S seconds. Prints `KILN-PTY=ok`, or
//! `KILN-PTY=failed` and why; then what the terminal showed, between `KILN-PTY-OUTPUT`
//! lines. Exits 0 if the whole conversation went as written, else 1. End-to-end tests run
//! it inside the test bed, where no other program opens terminals.

use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kiln_tests::pty::{parse, Pty};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("KILN-PTY=failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<()> {
    let [script, rows, cols, timeout, dashes, program, rest @ ..] = args else {
        bail!("usage: kiln-pty SCRIPT ROWS COLS TIMEOUT_S -- PROGRAM [ARGS…]");
    };
    if dashes != "--" {
        bail!("usage: kiln-pty SCRIPT ROWS COLS TIMEOUT_S -- PROGRAM [ARGS…]");
    }
    let text = std::fs::read_to_string(script).with_context(|| format!("reading {script}"))?;
    let steps = parse(&text)?;
    let timeout = Duration::from_secs(timeout.parse().context("TIMEOUT_S")?);
    let mut command = Command::new(program);
    command.args(rest);
    let mut pty = Pty::spawn(command, rows.parse()?, cols.parse()?)?;
    let result = pty.converse(&steps, timeout);
    if result.is_ok() {
        println!("KILN-PTY=ok");
    }
    println!("KILN-PTY-OUTPUT\n{}\nKILN-PTY-OUTPUT", pty.output());
    result
}
