//! An image with no shell and no libc, as distroless and `FROM scratch` images are: one
//! layer holding one static program (built here with no libc at all), saved the way
//! `docker save` writes it and brought into a store with `kiln image import`. In the test
//! bed, `kiln job -- CMD` runs the program as is (found through the image's PATH, its
//! arguments word for word, its exit code the job's): the agent brings what it needs. A
//! script job, which needs /bin/sh, and a program the image does not have each fail with
//! one error line and exit code 127.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use kiln_tests::images;
use kiln_tests::output::{sections, value};
use kiln_tests::tmp::TempDir;
use kiln_tests::Runner;

/// A program for x86-64 Linux without libc: prints `hello`, then each argument after a
/// `|`, and exits with code 3.
const HELLO_C: &str = r#"
static long sys3(long n, long a, long b, long c) {
    long r;
    __asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c)
                     : "rcx", "r11", "memory");
    return r;
}
static void put(const char *s) {
    long n = 0;
    while (s[n]) n++;
    sys3(1, 1, (long)s, n);
}
void hello_main(long *sp) {
    long argc = sp[0];
    char **argv = (char **)(sp + 1);
    put("hello");
    for (long i = 1; i < argc; i++) { put("|"); put(argv[i]); }
    put("\n");
    sys3(60, 3, 0, 0);
}
__asm__(".globl _start\n_start:\n mov %rsp, %rdi\n and $-16, %rsp\n call hello_main\n ud2\n");
"#;

/// Builds [`HELLO_C`] as the static executable `out` with this machine's C compiler (the
/// one Rust links with).
fn build_hello(dir: &Path, out: &Path) -> Result<()> {
    let source = dir.join("hello.c");
    std::fs::write(&source, HELLO_C)?;
    let status = Command::new("cc")
        .args(["-O1", "-static", "-nostdlib", "-fno-pie", "-no-pie"])
        .args([
            "-fno-stack-protector",
            "-fno-asynchronous-unwind-tables",
            "-o",
        ])
        .arg(out)
        .arg(&source)
        .status()
        .context("running cc")?;
    ensure!(status.success(), "cc failed to build {}", out.display());
    let elf = std::fs::read(out)?;
    ensure!(
        kiln_agent::binary::is_static_elf(&elf),
        "{} is not a static executable",
        out.display()
    );
    Ok(())
}

#[test]
fn image_without_a_shell_runs_a_command_and_refuses_a_script() -> Result<()> {
    let tmp = TempDir::new("image-noshell")?;
    let bins = kiln_tests::artifacts::static_binaries()?;
    let layer = tmp.path().join("layer");
    std::fs::create_dir_all(&layer)?;
    build_hello(tmp.path(), &layer.join("hello"))?;
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {"Env": ["PATH=/"]},
    });
    let archive = tmp.path().join("image.tar");
    images::docker_save(tmp.path(), &[&layer], &config, &archive)?;
    let image = images::import(&bins, &tmp.path().join("store"), "noshell", &archive)?;

    // Each case: its exit code, its stdout on one line (`|` for newlines), its stderr.
    let script = format!(
        r#"
job() {{
  echo "CASE=$1"; shift
  "$KILN" job --kernel "$GUEST_VMLINUX" --image {name} --store "$FILES/store" \
    --memory 256 "$@" > job.out 2> job.err
  echo "CODE=$?"
  echo "OUT=$(tr '\n' '|' < job.out)"
  echo "ERR-LINES=$(wc -l < job.err)"
  cat job.err
}}
echo 'echo from a script' > job.sh
job command -- hello a 'b c'
job script --script job.sh
job missing -- /no-such-program
echo CASE=end
"#,
        name = image.name
    );
    let out = Runner::detect()?.run(&script, &image.files("store")?, Duration::from_secs(400))?;
    let console = out.console;
    let cases = sections(&console, "CASE");
    let case = |name: &str| {
        cases
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, body)| *body)
            .with_context(|| format!("no case {name} in: {console}"))
    };

    let command = case("command")?;
    ensure!(
        value(command, "CODE") == Some("3") && value(command, "OUT") == Some("hello|a|b c|"),
        "the program's exit code and output: {command}"
    );

    // Refused: exit code 127 and one line on stderr, holding `line`.
    let refused = |name: &str, line: &str| -> Result<()> {
        let body = case(name)?;
        ensure!(
            value(body, "CODE") == Some("127")
                && value(body, "ERR-LINES") == Some("1")
                && body.contains(line),
            "case {name}: expected exit code 127 and one line with {line:?}: {body}"
        );
        Ok(())
    };
    refused(
        "script",
        "kiln: error: a job script runs with /bin/sh, which the image \"noshell\" does not have",
    )?;
    refused(
        "missing",
        "kiln: error: the job's command did not start: executing /no-such-program:",
    )?;
    Ok(())
}
