//! `kiln shell` at a terminal: driven through a pseudo-terminal by `kiln-pty` (this
//! package's program, see `kiln_tests::pty`) in a booted VM and in a restored clone.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Result};
use kiln_tests::guest_initramfs::GuestInitramfs;
use kiln_tests::output::value;
use kiln_tests::{shell, Runner};

const TIMEOUT: Duration = Duration::from_secs(600);

/// What a person types into `kiln shell`, and what each step must show. The checked texts
/// are computed by the guest's shell so that the terminal's echo of the command line never
/// matches them.
const CONVERSATION: &str = r#"
send echo mark-$((40+2))\r
expect mark-42
send tty\r
expect /dev/pts/
# A resize reaches the guest's terminal (kiln gets SIGWINCH and passes the size on); the
# guest waits (bounded) until it sees it, then says what it has.
resize 33 101
send n=0; until [ "$(stty size)" = "$((30+3)) $((100+1))" ] || [ $n -ge 300 ]; do n=$((n+1)); sleep 0.1; done; stty size\r
expect 33 101\r\n
# Ctrl-C as typed: the guest terminal's line discipline sends SIGINT to its foreground job
# (and the interactive shell drops the rest of that command line, as shells do).
send sh -c 'echo sleep''ing; exec sleep 100'\r
expect sleeping
send \x03
expect ^C
send echo "slept=$?"\r
expect slept=130
send exit 7\r
exit 7
restored
"#;

/// `kiln shell` in a booted VM: a terminal in the guest (`tty`), a resize that reaches it,
/// Ctrl-C ending a `sleep 100` (the shell goes on), the shell's exit code as kiln's, this
/// terminal restored; without a terminal on stdin a clear error; then all of it again in a
/// clone restored from a snapshot of the VM.
#[test]
fn shell_at_a_terminal_in_a_vm_and_a_restored_clone() -> Result<()> {
    let runner = Runner::detect()?;
    let script = shell::PRELUDE.to_string()
        + r#"
D="$PWD"
cp -a "$FILES/pty/." /
# The test bed's own terminals, for kiln-pty.
mkdir -p /dev/pts
grep -q ' /dev/pts ' /proc/mounts || mount -t devpts devpts /dev/pts
converse() {
  /bin/kiln-pty "$FILES/conversation" 24 80 120 -- "$KILN" shell --vsock "$1" > "$2.out" 2>&1
  echo "KILN-PTY-EXIT-$2=$?"
  echo "KILN-PTY-$2=$(grep '^KILN-PTY=' "$2.out")"
  cat "$2.out"
}
"$KILN" run --kernel "$GUEST_VMLINUX" --initrd "$FILES/agent.cpio" --memory 256 \
  --vsock "$D/v.sock" --api "$D/api.sock" --serial "$D/console" > run.out 2> run.err &
vm=$!
echo "KILN-READY=$(wait_exec "$D/v.sock" $vm)"
converse "$D/v.sock" booted
"$KILN" shell --vsock "$D/v.sock" < /dev/null > noterm.out 2>&1
echo "KILN-NOTERM-EXIT=$?"
echo "KILN-NOTERM=$(cat noterm.out)"
"$KILN" ctl --api "$D/api.sock" snapshot --dir "$D/snap" --no-resume > snap.out 2> snap.err
echo "KILN-SNAPSHOT=$?"
cat snap.err
"$KILN" ctl --api "$D/api.sock" shutdown > /dev/null
wait $vm
"$KILN" restore --snapshot "$D/snap" --vsock "$D/c.sock" --api "$D/capi.sock" \
  --serial "$D/cconsole" > restore.out 2> restore.err &
clone=$!
echo "KILN-CLONE-READY=$(wait_exec "$D/c.sock" $clone)"
converse "$D/c.sock" clone
"$KILN" ctl --api "$D/capi.sock" shutdown > /dev/null
wait $clone
echo "KILN-CLONE-EXIT=$?"
cat run.err restore.err
"#;
    let mut files = vec![
        ("agent.cpio".to_string(), GuestInitramfs::new().build()?),
        ("conversation".to_string(), CONVERSATION.as_bytes().to_vec()),
    ];
    files.extend(kiln_tests::host_tools::program_files(
        Path::new(env!("CARGO_BIN_EXE_kiln-pty")),
        "/bin/kiln-pty",
        "pty",
    )?);
    let out = runner.run(&script, &files, TIMEOUT)?;
    let c = &out.console;
    eprintln!("{c}"); // shown with --nocapture
    ensure!(value(c, "KILN-READY") == Some("yes"), "VM not ready: {c}");
    for run in ["booted", "clone"] {
        ensure!(
            value(c, &format!("KILN-PTY-EXIT-{run}")) == Some("0")
                && value(c, &format!("KILN-PTY-{run}")) == Some("KILN-PTY=ok"),
            "the conversation with kiln shell in the {run} VM did not go as written: {c}"
        );
    }
    ensure!(value(c, "KILN-NOTERM-EXIT") == Some("1"), "{c}");
    ensure!(
        value(c, "KILN-NOTERM").is_some_and(|m| m.contains("needs a terminal on standard input")),
        "{c}"
    );
    ensure!(value(c, "KILN-SNAPSHOT") == Some("0"), "snapshot: {c}");
    ensure!(value(c, "KILN-CLONE-READY") == Some("yes"), "clone: {c}");
    ensure!(value(c, "KILN-CLONE-EXIT") == Some("0"), "clone: {c}");
    Ok(())
}
