//! Snapshots of a real guest in the test bed: `kiln run --api`, `kiln ctl snapshot`, and
//! clones brought up with `kiln restore` (issue 4, acceptance 1 and 3).

use std::time::Duration;

use anyhow::{ensure, Result};
use kiln_tests::guest_initramfs::GuestInitramfs;
use kiln_tests::output::value;
use kiln_tests::Runner;

const TIMEOUT: Duration = Duration::from_secs(400);

/// Boot, start a counter and write a file in the guest, snapshot, stop the original,
/// restore three clones; each sees the file and the counter going on from the snapshot,
/// then diverges, has the host's time and its own random numbers.
#[test]
fn snapshot_clones_resume_and_diverge() -> Result<()> {
    let runner = Runner::detect()?;
    let script = r#"
D="$PWD"
echo "KILN-CLOCKSOURCE=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
# wait_exec SOCK PID: bounded retries of `kiln exec -- true` while PID lives; prints yes/no.
wait_exec() {
  n=0
  while [ $n -lt 600 ] && kill -0 $2 2>/dev/null; do
    # (An attempt can hang if the guest drops its connection; bound each one.)
    if timeout 10 "$KILN" exec --vsock "$1" -- true 2>/dev/null; then echo yes; return; fi
    n=$((n + 1))
    sleep 0.1
  done
  echo no
}
"$KILN" run --kernel "$GUEST_VMLINUX" --initrd "$FILES/agent.cpio" --memory 256 \
  --vsock "$D/v.sock" --api "$D/api.sock" --serial "$D/console" > run.out 2> run.err &
vm=$!
echo "KILN-READY=$(wait_exec "$D/v.sock" $vm)"
# The counter runs in its own session, so the exec that starts it returns at once.
"$KILN" exec --vsock "$D/v.sock" -- sh -c 'setsid sh -c \
  "i=0; while true; do i=\$((i+1)); echo \$i > /tmp/count; sleep 0.2; done" \
  < /dev/null > /dev/null 2>&1 &'
echo "KILN-COUNTER-START=$?"
"$KILN" exec --vsock "$D/v.sock" -- sh -c 'echo before-snapshot > /tmp/file'
echo "KILN-FILE-WRITTEN=$?"
# The counter has started once it has counted past 2.
n=0
while [ $n -lt 300 ]; do
  c=$("$KILN" exec --vsock "$D/v.sock" -- cat /tmp/count 2>/dev/null)
  [ "${c:-0}" -gt 2 ] && break
  n=$((n + 1))
  sleep 0.1
done
"$KILN" ctl --api "$D/api.sock" snapshot --dir "$D/snap" --no-resume > snap.out 2> snap.err
echo "KILN-SNAPSHOT=$?"
cat snap.out snap.err
# The counter's value in the snapshot: it is read from a paused VM's memory below, after
# restore; here the last value seen before the pause is a lower bound.
echo "KILN-COUNT-BEFORE=${c:-0}"
"$KILN" ctl --api "$D/api.sock" shutdown > /dev/null
wait $vm
echo "KILN-ORIGINAL-EXIT=$?"
for i in 0 1 2; do
  "$KILN" restore --snapshot "$D/snap" --vsock "$D/c$i.sock" --api "$D/capi$i.sock" \
    --serial "$D/cconsole$i" > "restore$i.out" 2> "restore$i.err" &
  eval "clone$i=$!"
done
for i in 0 1 2; do
  eval "pid=\$clone$i"
  echo "KILN-CLONE-READY-$i=$(wait_exec "$D/c$i.sock" $pid)"
done
# kiln restore refreshes the guest's clock and entropy in the background and logs the
# outcome: wait (bounded) for that line.
for i in 0 1 2; do
  n=0
  refreshed=no
  while [ $n -lt 600 ]; do
    if grep -q 'guest clock set' "restore$i.err"; then refreshed=yes; break; fi
    if grep -q 'not refreshed' "restore$i.err"; then refreshed=failed; break; fi
    n=$((n + 1))
    sleep 0.1
  done
  echo "KILN-CLONE-REFRESHED-$i=$refreshed"
done
for i in 0 1 2; do
  S="$D/c$i.sock"
  echo "KILN-CLONE-FILE-$i=$("$KILN" exec --vsock "$S" -- cat /tmp/file)"
  first=$("$KILN" exec --vsock "$S" -- cat /tmp/count)
  # The counter keeps counting: wait (bounded) until it has moved on.
  n=0
  later=$first
  while [ $n -lt 300 ]; do
    later=$("$KILN" exec --vsock "$S" -- cat /tmp/count)
    [ "${later:-0}" -gt "${first:-0}" ] && break
    n=$((n + 1))
    sleep 0.1
  done
  echo "KILN-CLONE-COUNT-$i=$first $later"
  "$KILN" exec --vsock "$S" -- sh -c "echo clone-$i > /tmp/mine"
  echo "KILN-CLONE-WRITE-$i=$?"
done
for i in 0 1 2; do
  S="$D/c$i.sock"
  echo "KILN-CLONE-MINE-$i=$("$KILN" exec --vsock "$S" -- cat /tmp/mine)"
  guest=$("$KILN" exec --vsock "$S" -- date +%s)
  host=$(date +%s)
  echo "KILN-CLONE-CLOCK-$i=$((guest - host))"
  echo "KILN-CLONE-RANDOM-$i=$("$KILN" exec --vsock "$S" -- sh -c 'head -c 16 /dev/urandom | od -An -x' | tr -d ' \n')"
done
for i in 0 1 2; do
  "$KILN" ctl --api "$D/capi$i.sock" shutdown > /dev/null
  eval "pid=\$clone$i"
  wait $pid
  echo "KILN-CLONE-EXIT-$i=$?"
done
echo "KILN-PROCESSES-LEFT=$(pidof kiln | wc -w)"
echo "KILN-SOCKETS-LEFT=$(ls -d "$D"/*.sock 2>/dev/null | wc -l)"
echo "--- kiln run stderr"; cat run.err
for i in 0 1 2; do echo "--- restore $i stderr"; cat "restore$i.err"; echo "--- clone $i console tail"; tail -n 20 "$D/cconsole$i"; done
"#;
    let files = vec![("agent.cpio".to_string(), GuestInitramfs::new().build()?)];
    let out = runner.run(script, &files, TIMEOUT)?;
    let console = &out.console;
    let get = |key: &str| value(console, key);
    ensure!(
        get("KILN-READY") == Some("yes"),
        "the agent never answered: {console}"
    );
    ensure!(get("KILN-COUNTER-START") == Some("0"), "counter: {console}");
    ensure!(get("KILN-FILE-WRITTEN") == Some("0"), "file: {console}");
    ensure!(get("KILN-SNAPSHOT") == Some("0"), "snapshot: {console}");
    ensure!(
        get("KILN-ORIGINAL-EXIT") == Some("0"),
        "original VM: {console}"
    );
    let before: u64 = get("KILN-COUNT-BEFORE")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    ensure!(before > 2, "the counter never counted: {console}");
    let mut randoms = Vec::new();
    for i in 0..3 {
        let key = |k: &str| format!("KILN-CLONE-{k}-{i}");
        ensure!(
            get(&key("READY")) == Some("yes"),
            "clone {i} never answered: {console}"
        );
        ensure!(
            get(&key("REFRESHED")) == Some("yes"),
            "clone {i}: clock and entropy not refreshed: {console}"
        );
        ensure!(
            get(&key("FILE")) == Some("before-snapshot"),
            "clone {i} lost the file: {console}"
        );
        let counts: Vec<u64> = get(&key("COUNT"))
            .unwrap_or("")
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        ensure!(
            counts.len() == 2 && counts[0] >= before && counts[1] > counts[0],
            "clone {i}: counter {counts:?}, want from >= {before} and increasing: {console}"
        );
        ensure!(
            get(&key("WRITE")) == Some("0"),
            "clone {i} write: {console}"
        );
        let mine = format!("clone-{i}");
        ensure!(
            get(&key("MINE")) == Some(mine.as_str()),
            "clone {i} sees another's file: {console}"
        );
        let skew: i64 = get(&key("CLOCK"))
            .and_then(|v| v.parse().ok())
            .unwrap_or(i64::MAX);
        ensure!(
            skew.abs() <= 2,
            "clone {i} clock off by {skew} s: {console}"
        );
        let random = get(&key("RANDOM")).unwrap_or("").to_string();
        ensure!(
            random.len() == 32,
            "clone {i} random: {random:?}: {console}"
        );
        ensure!(
            !randoms.contains(&random),
            "clone {i} repeats RNG output: {console}"
        );
        randoms.push(random);
        ensure!(get(&key("EXIT")) == Some("0"), "clone {i} exit: {console}");
    }
    ensure!(
        get("KILN-PROCESSES-LEFT") == Some("0"),
        "kiln left running: {console}"
    );
    ensure!(
        get("KILN-SOCKETS-LEFT") == Some("0"),
        "sockets left: {console}"
    );
    Ok(())
}
