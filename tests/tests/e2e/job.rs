//! `kiln job` and `kiln exec`: CI job I/O over virtio-vsock through the guest agent.
//!
//! Each test runs one script through [`Runner::detect`] (direct on hardware
//! virtualization, else the nested test bed) and boots fresh VMs inside it with an
//! initramfs whose init is the agent, serving on vsock (no rc script).

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use kiln_tests::guest_initramfs::GuestInitramfs;
use kiln_tests::output::{number, sections, value};
use kiln_tests::Runner;

const TIMEOUT: Duration = Duration::from_secs(300);

/// The agent image plus the given job scripts as extra files.
fn files(scripts: &[(&str, &str)]) -> Result<Vec<(String, Vec<u8>)>> {
    let mut files = vec![("agent.cpio".to_string(), GuestInitramfs::new().build()?)];
    for (name, text) in scripts {
        files.push((name.to_string(), text.as_bytes().to_vec()));
    }
    Ok(files)
}

/// `kiln job` with the agent image: `JOB --script script.sh` in a test-bed script. A guest
/// boots in seconds even in the test bed; a hung boot fails after 60 s, not the default 120.
/// The clocksource line is there for failures: a test bed whose TSC calibration failed
/// (`refined-jiffies`) cannot boot guests.
const JOB_FN: &str = r#"
JOB() {
  "$KILN" job --kernel "$GUEST_VMLINUX" --initrd "$FILES/agent.cpio" --memory 256 \
    --boot-timeout 60 "$@"
}
echo "KILN-CLOCKSOURCE=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
"#;

#[test]
fn job_exit_codes_reach_the_host() -> Result<()> {
    let runner = Runner::detect()?;
    let scripts = [
        ("ok.sh", "echo out-line; echo err-line >&2; exit 0\n"),
        ("one.sh", "echo failing; exit 1\n"),
        ("answer.sh", "x=$((6*7)); echo \"computed $x\"; exit $x\n"),
        ("killed.sh", "echo about to die; kill -KILL $$\n"),
    ];
    let mut script = JOB_FN.to_string();
    for (name, _) in &scripts {
        script.push_str(&format!(
            "echo KILN-CASE={name}\nJOB --script \"$FILES/{name}\" --env GREETING=hi\necho KILN-JOB-EXIT=$?\n"
        ));
    }
    let out = runner.run(&script, &files(&scripts)?, TIMEOUT)?;
    let cases = sections(&out.console, "KILN-CASE");
    let code = |name: &str| {
        cases
            .iter()
            .find(|c| c.0 == name)
            .and_then(|c| value(c.1, "KILN-JOB-EXIT"))
    };
    ensure!(code("ok.sh") == Some("0"), "ok.sh: {}", out.console);
    ensure!(code("one.sh") == Some("1"), "one.sh: {}", out.console);
    ensure!(
        code("answer.sh") == Some("42"),
        "answer.sh: {}",
        out.console
    );
    ensure!(
        code("killed.sh") == Some("137"),
        "killed.sh (128+SIGKILL): {}",
        out.console
    );
    ensure!(out.console.contains("out-line") && out.console.contains("err-line"));
    ensure!(out.console.contains("computed 42"));
    Ok(())
}

/// A deterministic, non-repeating 1 MiB block (xorshift64*), the raw material of
/// `job_output_is_byte_exact`'s streams: every chunk of it differs from every other, so a
/// dropped, repeated or reordered packet changes the checksum.
fn pseudo_random_mib(seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(1 << 20);
    while out.len() < 1 << 20 {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out
}

/// Writes 50 blocks of ~1 MiB to stdout and 50 of ~100 KiB to stderr, alternating, each
/// block led by a numbered line and cut from `$BLOB` at a different offset. The same script
/// runs in the guest (as the job) and on the host (for the expected checksums).
const BIG_OUTPUT_SH: &str = r#"i=1
while [ $i -le 50 ]; do
  echo "stdout block $i"
  cat "$BLOB"
  echo "stderr block $i" >&2
  tail -c +$((i * 997)) "$BLOB" | head -c 104858 >&2
  i=$((i + 1))
done
"#;

/// `digest NAME`: stdin's sha256 and byte count into NAME.sum and NAME.count, in one pass.
const DIGEST_FN: &str = r#"
digest() {
  mkfifo "$1.fifo"
  wc -c < "$1.fifo" > "$1.count" &
  counter=$!
  tee "$1.fifo" | sha256sum > "$1.sum"
  wait $counter
}
show() { echo "KILN-$1=$(cut -d' ' -f1 "$2.sum") $(tr -d ' ' < "$2.count")"; }
"#;

#[test]
fn job_output_is_byte_exact() -> Result<()> {
    let runner = Runner::detect()?;
    let blob = pseudo_random_mib(0x6b69_6c6e);
    let image = GuestInitramfs::new()
        .file("/data/blob", 0o644, blob.clone())
        .build()?;
    let files = vec![
        ("agent.cpio".to_string(), image),
        ("blob".to_string(), blob),
        ("big.sh".to_string(), BIG_OUTPUT_SH.as_bytes().to_vec()),
    ];
    let script = format!(
        r#"{JOB_FN}{DIGEST_FN}
# The job's two streams, each piped straight into its own digest.
{{ {{ JOB --script "$FILES/big.sh" --env BLOB=/data/blob; echo $? > job.rc; }} 2>&1 1>&3 \
     | tee err.copy | digest got-err; }} 3>&1 | digest got-out
rc=$(cat job.rc)
echo KILN-JOB-EXIT=$rc
# kiln's own error, if any, is the last thing it wrote to stderr.
[ "$rc" = 0 ] || {{ echo "KILN-JOB-STDERR-TAIL:"; tail -c 1500 err.copy | tr -c '[:print:]\n' '?'; echo; }}
# The same generator on this side, with the same busybox.
BLOB="$FILES/blob" sh "$FILES/big.sh" 2>/dev/null | digest want-out
BLOB="$FILES/blob" sh "$FILES/big.sh" 2>&1 >/dev/null | digest want-err
for s in got-out got-err want-out want-err; do show "$s" "$s"; done
"#
    );
    let out = runner.run(&script, &files, TIMEOUT)?;
    let console = &out.console;
    ensure!(
        value(console, "KILN-JOB-EXIT") == Some("0"),
        "job failed: {console}"
    );
    for stream in ["out", "err"] {
        let got = value(console, &format!("KILN-got-{stream}"));
        let want = value(console, &format!("KILN-want-{stream}"));
        ensure!(
            got.is_some() && got == want,
            "std{stream}: got {got:?}, want {want:?}:\n{console}"
        );
    }
    // The throughput floors: 50 MiB and 5 MiB at least.
    let bytes = |key: &str| -> Option<u64> { value(console, key)?.split(' ').nth(1)?.parse().ok() };
    ensure!(
        bytes("KILN-want-out") >= Some(50 << 20),
        "stdout too small: {console}"
    );
    ensure!(
        bytes("KILN-want-err") >= Some(5 << 20),
        "stderr too small: {console}"
    );
    Ok(())
}

/// The job `job_cancel_stops_everything` cancels: two children that each report the
/// SIGTERM they get and wait for their own `sleep`, plus a `sleep` that holds none of the
/// job's output. When every one of them is running it prints `started`. Its own TERM trap
/// waits for all of them, then counts what is left of its process group in /proc. What the
/// traps print goes to stdout (streamed to the host before the VM stops) and to
/// /dev/console (the VM's serial log).
const CANCEL_SH: &str = r#"say() { echo "$*"; echo "$*" > /dev/console; }
trap 'say "job: got TERM"
      wait
      left=0
      for s in /proc/[0-9]*/stat; do
        read -r pid comm state ppid pgrp rest < "$s" 2>/dev/null || continue
        if [ "$pgrp" = $$ ] && [ "$pid" != $$ ]; then
          left=$((left + 1)); say "job: still running: $pid $comm"
        fi
      done
      say "job: group members left: $left"
      exit 143' TERM
mkfifo /tmp/ready
exec 3<>/tmp/ready
for i in 1 2; do
  sh -c 'say() { echo "$*"; echo "$*" > /dev/console; }
         trap "say child-$1: got TERM; wait; say child-$1: its sleep is gone; exit 0" TERM
         sleep 1000 &
         echo ready > /tmp/ready
         wait' child $i &
done
sleep 1000 > /dev/null 2>&1 &
read -r a <&3
read -r b <&3
echo started
wait
echo "job: wait returned without a signal"
"#;

#[test]
fn job_cancel_stops_everything() -> Result<()> {
    let runner = Runner::detect()?;
    let script = r#"
export XDG_RUNTIME_DIR="$PWD/rt"
mkdir -m 700 rt
mkfifo out.fifo
# kiln job itself in the background (not through a shell function: $! must be kiln).
"$KILN" job --kernel "$GUEST_VMLINUX" --initrd "$FILES/agent.cpio" --memory 256 \
  --boot-timeout 60 --serial console.log --script "$FILES/cancel.sh" > out.fifo 2> err.txt &
kiln=$!
echo "KILN-CLOCKSOURCE=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
# Read the job's output until it says `started` (or ends).
exec 3< out.fifo
started=no
while IFS= read -r line <&3; do
  echo "$line" >> out.txt
  if [ "$line" = started ]; then started=yes; break; fi
done
echo KILN-STARTED=$started
# While the job runs, kiln's runtime directory holds its vsock socket.
sockets=0
for s in rt/kiln-job-$kiln-*/vsock.sock; do [ -S "$s" ] && sockets=$((sockets + 1)); done
echo KILN-SOCKETS-WHILE-RUNNING=$sockets
cat <&3 >> out.txt &
drain=$!
read -r t0 rest < /proc/uptime
kill -TERM $kiln
wait $kiln
rc=$?
read -r t1 rest < /proc/uptime
wait $drain
echo KILN-JOB-EXIT=$rc
echo "KILN-EXIT-MS=$(awk "BEGIN {print int(($t1 - $t0) * 1000)}")"
echo "KILN-PROCESSES-LEFT=$(pidof kiln | wc -w)"
echo "KILN-RUNTIME-LEFT=$(ls -A rt | wc -l)"
echo "--- job output"; cat out.txt
echo "--- kiln stderr"; cat err.txt
echo "--- console log"; cat console.log
echo "--- end"
"#;
    let out = runner.run(script, &files(&[("cancel.sh", CANCEL_SH)])?, TIMEOUT)?;
    let console = &out.console;
    ensure!(
        value(console, "KILN-STARTED") == Some("yes"),
        "the job never started: {console}"
    );
    ensure!(
        value(console, "KILN-SOCKETS-WHILE-RUNNING") == Some("1"),
        "kiln job's socket was not where the check looks for it: {console}"
    );
    ensure!(
        value(console, "KILN-JOB-EXIT") == Some("143"),
        "exit status (128+SIGTERM): {console}"
    );
    let ms: u64 = number(console, "KILN-EXIT-MS").context("no exit time")?;
    ensure!(
        ms <= 2000,
        "kiln job took {ms} ms to exit after SIGTERM: {console}"
    );
    ensure!(
        value(console, "KILN-PROCESSES-LEFT") == Some("0"),
        "kiln left running: {console}"
    );
    ensure!(
        value(console, "KILN-RUNTIME-LEFT") == Some("0"),
        "runtime files left: {console}"
    );
    let section = |name: &str| {
        let start = console
            .find(&format!("--- {name}\n"))
            .map(|i| i + name.len() + 5);
        let end = start.and_then(|s| console[s..].find("\n---").map(|e| s + e));
        start.zip(end).map(|(s, e)| &console[s..e]).unwrap_or("")
    };
    let (job_out, kiln_err, serial) = (
        section("job output"),
        section("kiln stderr"),
        section("console log"),
    );
    ensure!(
        kiln_err.contains("cancelled by signal 15"),
        "kiln's stderr: {console}"
    );
    // Every process of the job got the signal and is gone: the children saw TERM and reaped
    // their sleeps, the job reaped everything it started, and its group is empty. The
    // streamed output and the serial console say so independently.
    for text in [job_out, serial] {
        for line in [
            "job: got TERM",
            "child-1: got TERM",
            "child-2: got TERM",
            "child-1: its sleep is gone",
            "child-2: its sleep is gone",
            "job: group members left: 0",
        ] {
            ensure!(text.contains(line), "missing {line:?}: {console}");
        }
    }
    ensure!(!job_out.contains("without a signal"), "{console}");
    println!("job_cancel_stops_everything: kiln job exited with 143 {ms} ms after SIGTERM");
    Ok(())
}

/// What each of `job_concurrent_execs`' execs runs: it marks its arrival, waits (bounded)
/// until all eight are running at once, reports that and the checksum it computes of its
/// data on stderr, streams the data (`seq 1 $N`) on stdout and exits with 10 + I. (It is
/// passed as `sh -c '…'`: no single quotes in it.)
const CONCURRENT_EXEC_SH: &str = r#"touch /tmp/arrived.$I
k=0
while :; do
  set -- /tmp/arrived.*
  [ $# -ge 8 ] || [ $k -ge 600 ] && break
  k=$((k + 1))
  sleep 0.05
done
echo "together=$#" >&2
echo "guest-sum=$(seq 1 $N | sha256sum | cut -c1-64)" >&2
seq 1 $N
exit $((10 + I))
"#;

#[test]
fn job_concurrent_execs() -> Result<()> {
    let runner = Runner::detect()?;
    let script = format!(
        r#"
V="$PWD/v.sock"
"$KILN" run --kernel "$GUEST_VMLINUX" --initrd "$FILES/agent.cpio" --memory 256 --vcpus 2 \
  --vsock "$V" --serial console.log > run.out 2> run.err &
vm=$!
echo "KILN-CLOCKSOURCE=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
# The agent is ready once an exec goes through: try that, a bounded number of times.
ready=no
i=0
while [ $i -lt 600 ] && kill -0 $vm 2>/dev/null; do
  if "$KILN" exec --vsock "$V" -- true 2>/dev/null; then ready=yes; break; fi
  i=$((i + 1))
  sleep 0.1
done
echo KILN-READY=$ready
# Eight execs at once, each streaming its own data.
for i in 1 2 3 4 5 6 7 8; do
  n=$((i * 10000 + i))
  {{ "$KILN" exec --vsock "$V" --env I=$i --env N=$n -- sh -c '{exec_sh}'; echo $? > rc.$i; }} \
    2> err.$i | sha256sum > sum.$i &
  pids="$pids $!"
done
# (Not a bare `wait`: that would wait for the VM too.) sha256sum ends after rc.$i is written.
wait $pids
for i in 1 2 3 4 5 6 7 8; do
  n=$((i * 10000 + i))
  want=$(seq 1 $n | sha256sum | cut -d' ' -f1)
  got=$(cut -d' ' -f1 sum.$i)
  echo "KILN-EXEC-$i=$(cat rc.$i) $(grep together= err.$i) $(grep guest-sum= err.$i) host-sum=$got"
  echo "KILN-WANT-$i=$((10 + i)) together=8 guest-sum=$want host-sum=$want"
  grep -v 'together=\|guest-sum=' err.$i
done
# kiln cp, host -> guest -> host, and a file made in the guest -> host.
"$KILN" cp --vsock "$V" "$FILES/blob" vm:/tmp/blob; echo "KILN-CP-IN=$?"
echo "KILN-GUEST-BLOB=$("$KILN" exec --vsock "$V" -- sha256sum /tmp/blob | cut -d' ' -f1)"
echo "KILN-HOST-BLOB=$(sha256sum "$FILES/blob" | cut -d' ' -f1)"
"$KILN" cp --vsock "$V" vm:/tmp/blob blob.back; echo "KILN-CP-BACK=$?"
cmp "$FILES/blob" blob.back && echo KILN-BLOB-ROUND-TRIP=same
made=$("$KILN" exec --vsock "$V" -- sh -c \
  'seq 1 100000 | sed s/$/-made-in-the-guest/ > /tmp/made; chmod 640 /tmp/made; sha256sum /tmp/made')
echo "KILN-GUEST-MADE=$(echo "$made" | cut -d' ' -f1)"
"$KILN" cp --vsock "$V" vm:/tmp/made made; echo "KILN-CP-OUT=$?"
echo "KILN-HOST-MADE=$(sha256sum made | cut -d' ' -f1) $(wc -c < made) $(stat -c %a made)"
# A setuid file made in the guest lands without its setuid bit; a symbolic link at the
# destination is refused and what it points to is left alone.
"$KILN" exec --vsock "$V" -- sh -c 'echo suid > /tmp/suid && chmod 4755 /tmp/suid'
"$KILN" cp --vsock "$V" vm:/tmp/suid suid; echo "KILN-CP-SUID=$? $(stat -c %a suid)"
echo precious > victim; ln -s "$PWD/victim" link
"$KILN" cp --vsock "$V" vm:/tmp/suid link 2> link.err
echo "KILN-CP-LINK=$? $(cat victim) $(grep -c 'symbolic link' link.err)"
# Shut the VM down the way a runner would.
kill -TERM $vm
wait $vm
echo KILN-RUN-EXIT=$?
echo "KILN-PROCESSES-LEFT=$(pidof kiln | wc -w)"
echo "KILN-SOCKETS-LEFT=$(ls -d "$V"* 2>/dev/null | wc -l)"
echo "--- kiln run stderr"; cat run.err
"#,
        exec_sh = CONCURRENT_EXEC_SH
    );
    let mut files = files(&[])?;
    files.push(("blob".to_string(), pseudo_random_mib(7)));
    let out = runner.run(&script, &files, TIMEOUT)?;
    let console = &out.console;
    ensure!(
        value(console, "KILN-READY") == Some("yes"),
        "the agent never answered: {console}"
    );
    for i in 1..=8 {
        let got = value(console, &format!("KILN-EXEC-{i}"));
        let want = value(console, &format!("KILN-WANT-{i}"));
        ensure!(
            got.is_some() && got == want,
            "exec {i}: got {got:?}, want {want:?}: {console}"
        );
    }
    let same = |a: &str, b: &str| value(console, a).is_some_and(|v| Some(v) == value(console, b));
    for key in ["KILN-CP-IN", "KILN-CP-BACK", "KILN-CP-OUT"] {
        ensure!(value(console, key) == Some("0"), "{key}: {console}");
    }
    ensure!(
        same("KILN-GUEST-BLOB", "KILN-HOST-BLOB"),
        "host -> guest copy: {console}"
    );
    ensure!(
        value(console, "KILN-BLOB-ROUND-TRIP") == Some("same"),
        "round trip: {console}"
    );
    let made = value(console, "KILN-HOST-MADE").unwrap_or("");
    let guest_made = value(console, "KILN-GUEST-MADE").unwrap_or("?");
    let made_len = (1..=100_000)
        .map(|n: u32| n.to_string().len() + 19)
        .sum::<usize>();
    ensure!(
        made == format!("{guest_made} {made_len} 640"),
        "guest -> host copy (sum, size, mode): {made:?}: {console}"
    );
    ensure!(
        value(console, "KILN-CP-SUID") == Some("0 755"),
        "a setuid guest file copied out (exit, mode): {console}"
    );
    ensure!(
        value(console, "KILN-CP-LINK") == Some("1 precious 1"),
        "kiln cp to a symbolic link (exit, target, error): {console}"
    );
    ensure!(
        value(console, "KILN-RUN-EXIT") == Some("143"),
        "kiln run after SIGTERM: {console}"
    );
    ensure!(
        value(console, "KILN-PROCESSES-LEFT") == Some("0"),
        "kiln left running: {console}"
    );
    ensure!(
        value(console, "KILN-SOCKETS-LEFT") == Some("0"),
        "sockets left: {console}"
    );
    Ok(())
}
