//! Timers in restored guests (test bed): a guest's pending timers and new `sleep`s fire in
//! every clone of every snapshot. A restore that lost the guest's timer state (the TSC
//! deadline or kvmclock MSRs, say) leaves clones whose `sleep` never returns.

use std::time::Duration;

use anyhow::{ensure, Result};
use kiln_tests::guest_initramfs::GuestInitramfs;
use kiln_tests::output::value;
use kiln_tests::{shell, Runner};

// Generous: a clone whose timers hang costs each of its bounded waits in full.
const TIMEOUT: Duration = Duration::from_secs(900);

/// Snapshots taken of one running guest.
const SNAPSHOTS: usize = 3;
/// Clones restored, all at once, from each snapshot.
const CLONES: usize = 3;

/// One guest, three snapshots of it while it runs, each taken while a background
/// `sleep 4` is pending in the guest; three clones of each snapshot run at the same time.
/// In every clone the pending `sleep` finishes (its marker file appears) and a new
/// `sleep 2` started through the agent returns; the original goes on too.
#[test]
fn snapshot_clones_timers_fire_after_restore() -> Result<()> {
    let runner = Runner::detect()?;
    let script = format!(
        "{}SNAPSHOTS={SNAPSHOTS}\nCLONES={CLONES}\n{}",
        shell::PRELUDE,
        r#"
D="$PWD"
"$KILN" run --kernel "$GUEST_VMLINUX" --initrd "$FILES/agent.cpio" --memory 128 \
  --vsock "$D/v.sock" --api "$D/api.sock" --serial "$D/console" > run.out 2> run.err &
vm=$!
echo "KILN-READY=$(wait_exec "$D/v.sock" $vm)"
# wait_file SOCK FILE: bounded wait until FILE exists in the guest behind SOCK.
wait_file() {
  n=0
  while [ $n -lt 150 ]; do
    timeout 10 "$KILN" exec --vsock "$1" -- test -e "$2" 2>/dev/null && { echo yes; return; }
    n=$((n + 1))
    sleep 0.1
  done
  echo no
}
s=0
while [ $s -lt $SNAPSHOTS ]; do
  # A timer armed in the guest: a detached `sleep 4` that writes /tmp/bg-$s when it ends.
  "$KILN" exec --vsock "$D/v.sock" -- sh -c "setsid sh -c \
    'echo armed > /tmp/armed-$s; sleep 4; echo done > /tmp/bg-$s' \
    < /dev/null > /dev/null 2>&1 &"
  echo "KILN-ARMED-$s=$(wait_file "$D/v.sock" /tmp/armed-$s)"
  # Still pending right before the snapshot (an exec takes well under the 4 s).
  if "$KILN" exec --vsock "$D/v.sock" -- test -e /tmp/bg-$s; then p=no; else p=yes; fi
  echo "KILN-PENDING-$s=$p"
  "$KILN" ctl --api "$D/api.sock" snapshot --dir "$D/snap$s" > "snap$s.out" 2> "snap$s.err"
  echo "KILN-SNAPSHOT-$s=$?"
  cat "snap$s.out" "snap$s.err"
  i=0
  while [ $i -lt $CLONES ]; do
    "$KILN" restore --snapshot "$D/snap$s" --vsock "$D/c$s-$i.sock" --api "$D/capi$s-$i.sock" \
      --serial "$D/cconsole$s-$i" > "restore$s-$i.out" 2> "restore$s-$i.err" &
    eval "clone$i=$!"
    i=$((i + 1))
  done
  i=0
  while [ $i -lt $CLONES ]; do
    eval "pid=\$clone$i"
    echo "KILN-CLONE-READY-$s-$i=$(wait_exec "$D/c$s-$i.sock" $pid)"
    i=$((i + 1))
  done
  # Every clone sleeps at once, each bounded from outside.
  i=0
  while [ $i -lt $CLONES ]; do
    ( timeout 60 "$KILN" exec --vsock "$D/c$s-$i.sock" -- sh -c 'sleep 2; echo slept' \
        > "sleep$s-$i.out" 2>&1; echo $? > "sleep$s-$i.rc" ) &
    eval "sleeper$i=$!"
    i=$((i + 1))
  done
  i=0
  while [ $i -lt $CLONES ]; do
    eval "wait \$sleeper$i"
    echo "KILN-SLEEP-$s-$i=$(cat "sleep$s-$i.rc") $(cat "sleep$s-$i.out")"
    echo "KILN-PENDING-FIRED-$s-$i=$(wait_file "$D/c$s-$i.sock" /tmp/bg-$s)"
    i=$((i + 1))
  done
  # What a hung clone's clock and timer interrupts look like, for the failure message.
  i=0
  while [ $i -lt $CLONES ]; do
    echo "--- clone $s-$i uptime and timer interrupts"
    timeout 10 "$KILN" exec --vsock "$D/c$s-$i.sock" -- sh -c \
      'cat /proc/uptime; grep -i -E "timer|LOC" /proc/interrupts'
    "$KILN" ctl --api "$D/capi$s-$i.sock" shutdown > /dev/null
    eval "pid=\$clone$i"
    wait $pid
    echo "KILN-CLONE-EXIT-$s-$i=$?"
    i=$((i + 1))
  done
  echo "KILN-ORIGINAL-FIRED-$s=$(wait_file "$D/v.sock" /tmp/bg-$s)"
  s=$((s + 1))
done
"$KILN" ctl --api "$D/api.sock" shutdown > /dev/null
wait $vm
echo "KILN-ORIGINAL-EXIT=$?"
echo "KILN-PROCESSES-LEFT=$(pidof kiln | wc -w)"
echo "--- kiln run stderr"; cat run.err
for f in restore*.err; do echo "--- $f"; cat "$f"; done
"#
    );
    let files = vec![("agent.cpio".to_string(), GuestInitramfs::new().build()?)];
    let out = runner.run(&script, &files, TIMEOUT)?;
    let console = &out.console;
    let get = |key: &str| value(console, key);
    ensure!(
        get("KILN-READY") == Some("yes"),
        "the agent never answered: {console}"
    );
    for s in 0..SNAPSHOTS {
        ensure!(
            get(&format!("KILN-ARMED-{s}")) == Some("yes"),
            "snapshot {s}: the background sleep never started: {console}"
        );
        ensure!(
            get(&format!("KILN-PENDING-{s}")) == Some("yes"),
            "snapshot {s}: the background sleep ended before the snapshot: {console}"
        );
        ensure!(
            get(&format!("KILN-SNAPSHOT-{s}")) == Some("0"),
            "snapshot {s} failed: {console}"
        );
        for i in 0..CLONES {
            let key = |k: &str| format!("KILN-{k}-{s}-{i}");
            ensure!(
                get(&key("CLONE-READY")) == Some("yes"),
                "clone {s}-{i} never answered: {console}"
            );
            ensure!(
                get(&key("SLEEP")) == Some("0 slept"),
                "clone {s}-{i}: `sleep 2` did not return (timeout's 124 means it hung): \
                 {console}"
            );
            ensure!(
                get(&key("PENDING-FIRED")) == Some("yes"),
                "clone {s}-{i}: the sleep pending at snapshot time never ended: {console}"
            );
            ensure!(
                get(&key("CLONE-EXIT")) == Some("0"),
                "clone {s}-{i} exit: {console}"
            );
        }
        ensure!(
            get(&format!("KILN-ORIGINAL-FIRED-{s}")) == Some("yes"),
            "the original's sleep {s} never ended: {console}"
        );
    }
    ensure!(
        get("KILN-ORIGINAL-EXIT") == Some("0"),
        "original VM: {console}"
    );
    ensure!(
        get("KILN-PROCESSES-LEFT") == Some("0"),
        "kiln left running: {console}"
    );
    Ok(())
}
