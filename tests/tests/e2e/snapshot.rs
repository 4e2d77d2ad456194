//! Snapshots of a real guest in the test bed: `kiln run --api`, `kiln ctl snapshot`, and
//! clones brought up with `kiln restore`.

use std::time::Duration;

use anyhow::{ensure, Result};
use kiln_tests::guest_initramfs::GuestInitramfs;
use kiln_tests::output::value;
use kiln_tests::{shell, Runner};

const TIMEOUT: Duration = Duration::from_secs(400);

/// Boot, start a counter and write a file in the guest, snapshot, stop the original,
/// restore three clones; each sees the file and the counter going on from the snapshot,
/// then diverges, has the host's time and its own random numbers.
#[test]
fn snapshot_clones_resume_and_diverge() -> Result<()> {
    let runner = Runner::detect()?;
    let script = shell::PRELUDE.to_string()
        + r#"
D="$PWD"
echo "KILN-CLOCKSOURCE=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
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
# kiln's virtio-rng device, read straight from the guest's hwrng.
echo "KILN-HWRNG=$("$KILN" exec --vsock "$D/v.sock" -- cat /sys/class/misc/hw_random/rng_current)"
echo "KILN-HWRNG-BYTES=$("$KILN" exec --vsock "$D/v.sock" -- sh -c 'head -c 16 /dev/hwrng | od -An -x' | tr -d ' \n')"
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
    --hostname "clone-$i" --serial "$D/cconsole$i" > "restore$i.out" 2> "restore$i.err" &
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
  echo "KILN-CLONE-HOSTNAME-$i=$("$KILN" exec --vsock "$S" -- hostname)"
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
  # How far (µs) the guest's clock is outside the host's before and after reading it.
  before=$(adjtimex | now_us)
  guest=$("$KILN" exec --vsock "$S" -- adjtimex | now_us)
  after=$(adjtimex | now_us)
  if [ "$guest" -lt "$before" ]; then skew=$((before - guest))
  elif [ "$guest" -gt "$after" ]; then skew=$((guest - after))
  else skew=0; fi
  echo "KILN-CLONE-CLOCK-$i=$skew $((after - before))"
  echo "KILN-CLONE-RANDOM-$i=$("$KILN" exec --vsock "$S" -- sh -c 'head -c 16 /dev/urandom | od -An -x' | tr -d ' \n')"
  echo "KILN-CLONE-HWRNG-$i=$("$KILN" exec --vsock "$S" -- sh -c 'head -c 16 /dev/hwrng | od -An -x' | tr -d ' \n')"
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
    let out = runner.run(&script, &files, TIMEOUT)?;
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
    ensure!(
        get("KILN-HWRNG").is_some_and(|d| d.starts_with("virtio_rng")),
        "the guest's hwrng is not kiln's virtio-rng: {console}"
    );
    // The original's hwrng bytes, then each clone's: the restored device goes on serving
    // and every clone draws its own from the host.
    let mut hwrng = vec![get("KILN-HWRNG-BYTES").unwrap_or("").to_string()];
    ensure!(hwrng[0].len() == 32, "no bytes from /dev/hwrng: {console}");
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
        let name = format!("clone-{i}");
        ensure!(
            get(&key("HOSTNAME")) == Some(name.as_str()),
            "clone {i} hostname: {console}"
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
        // Microseconds the guest's clock lies outside the host's [before, after] window,
        // and the window's width (an exec's round trip).
        let clock: Vec<u64> = get(&key("CLOCK"))
            .unwrap_or("")
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        eprintln!("clone {i}: clock off by {clock:?} µs (skew, window)");
        ensure!(
            clock.len() == 2 && clock[0] <= 1_000_000,
            "clone {i} clock off by more than 1 s: {clock:?} µs: {console}"
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
        let bytes = get(&key("HWRNG")).unwrap_or("").to_string();
        ensure!(
            bytes.len() == 32 && !hwrng.contains(&bytes),
            "clone {i}: hwrng gave {bytes:?} after {hwrng:?}: {console}"
        );
        hwrng.push(bytes);
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

/// Memory sharing is real: a 256 MiB guest that touched ~200 MiB
/// before the snapshot, restored as 8 clones that all read those pages, adds far less
/// than 8 × 200 MiB of test-bed memory. Prints each clone's Pss and Rss and the page cache
/// and MemAvailable before and after.
#[test]
fn snapshot_clones_share_memory() -> Result<()> {
    let runner = Runner::detect()?;
    let script = shell::PRELUDE.to_string()
        + r#"
D="$PWD"
N=8
meminfo() { awk -v k="$1:" '$1 == k { print int($2 / 1024) }' /proc/meminfo; }
"$KILN" run --kernel "$GUEST_VMLINUX" --initrd "$FILES/agent.cpio" --memory 256 \
  --vsock "$D/v.sock" --api "$D/api.sock" --serial null > run.out 2> run.err &
vm=$!
echo "KILN-READY=$(wait_exec "$D/v.sock" $vm)"
"$KILN" exec --vsock "$D/v.sock" -- sh -c 'mkdir -p /tmp/big.d && \
  { mount -t tmpfs -o size=240m big /tmp/big.d || mount -t ramfs big /tmp/big.d; } && \
  head -c 209715200 /dev/urandom > /tmp/big.d/big'
echo "KILN-BIG-WRITTEN=$?"
echo "KILN-BIG-BYTES=$("$KILN" exec --vsock "$D/v.sock" -- sh -c 'wc -c < /tmp/big.d/big')"
echo "KILN-SUM-ORIGINAL=$("$KILN" exec --vsock "$D/v.sock" -- sha256sum /tmp/big.d/big | cut -d' ' -f1)"
"$KILN" ctl --api "$D/api.sock" snapshot --dir "$D/snap" --no-resume > snap.out 2> snap.err
echo "KILN-SNAPSHOT=$?"
cat snap.out snap.err
echo "KILN-MEMORY-FILE-MIB=$(du -m "$D/snap/memory" | cut -f1)"
"$KILN" ctl --api "$D/api.sock" shutdown > /dev/null
wait $vm
echo "KILN-ORIGINAL-EXIT=$?"
sync
echo "KILN-CACHED-BEFORE=$(meminfo Cached)"
echo "KILN-AVAILABLE-BEFORE=$(meminfo MemAvailable)"
i=0
while [ $i -lt $N ]; do
  "$KILN" restore --snapshot "$D/snap" --vsock "$D/c$i.sock" --api "$D/capi$i.sock" \
    --serial "$D/cconsole$i" > "restore$i.out" 2> "restore$i.err" &
  eval "clone$i=$!"
  i=$((i + 1))
done
i=0
while [ $i -lt $N ]; do
  eval "pid=\$clone$i"
  echo "KILN-CLONE-READY-$i=$(wait_exec "$D/c$i.sock" $pid)"
  i=$((i + 1))
done
# Every clone reads the whole file, so its pages are really mapped in every clone.
i=0
while [ $i -lt $N ]; do
  "$KILN" exec --vsock "$D/c$i.sock" -- sha256sum /tmp/big.d/big > "sum$i" 2> "sum$i.err" &
  eval "sum$i=$!"
  i=$((i + 1))
done
i=0
while [ $i -lt $N ]; do
  eval "wait \$sum$i"
  echo "KILN-SUM-$i=$(cut -d' ' -f1 "sum$i")"
  i=$((i + 1))
done
echo "KILN-CACHED-AFTER=$(meminfo Cached)"
echo "KILN-AVAILABLE-AFTER=$(meminfo MemAvailable)"
total_pss=0
total_rss=0
i=0
while [ $i -lt $N ]; do
  eval "pid=\$clone$i"
  pss=$(awk '$1 == "Pss:" { print int($2 / 1024) }' /proc/$pid/smaps_rollup)
  rss=$(awk '$1 == "Rss:" { print int($2 / 1024) }' /proc/$pid/smaps_rollup)
  echo "KILN-CLONE-MEM-$i=pss ${pss} MiB, rss ${rss} MiB"
  total_pss=$((total_pss + ${pss:-99999}))
  total_rss=$((total_rss + ${rss:-99999}))
  i=$((i + 1))
done
echo "KILN-TOTAL-PSS-MIB=$total_pss"
echo "KILN-TOTAL-RSS-MIB=$total_rss"
i=0
while [ $i -lt $N ]; do
  "$KILN" ctl --api "$D/capi$i.sock" shutdown > /dev/null
  eval "pid=\$clone$i"
  wait $pid
  echo "KILN-CLONE-EXIT-$i=$?"
  i=$((i + 1))
done
echo "KILN-PROCESSES-LEFT=$(pidof kiln | wc -w)"
echo "KILN-SOCKETS-LEFT=$(ls -d "$D"/*.sock 2>/dev/null | wc -l)"
echo "--- kiln run stderr"; cat run.err
i=0
while [ $i -lt $N ]; do
  echo "--- restore $i stderr"; tail -n 5 "restore$i.err"; cat "sum$i.err"
  # A clone that ended on its own: what its guest said last.
  grep -q 'guest reset\|panic' "restore$i.err" && { echo "--- clone $i console tail"; tail -n 40 "$D/cconsole$i"; }
  i=$((i + 1))
done
"#;
    let files = vec![("agent.cpio".to_string(), GuestInitramfs::new().build()?)];
    let out = runner.run(&script, &files, Duration::from_secs(900))?;
    let console = &out.console;
    let get = |key: &str| value(console, key);
    let mib = |key: &str| -> Option<i64> { get(key).and_then(|v| v.parse().ok()) };
    ensure!(
        get("KILN-READY") == Some("yes"),
        "the agent never answered: {console}"
    );
    ensure!(get("KILN-BIG-WRITTEN") == Some("0"), "big file: {console}");
    ensure!(
        get("KILN-BIG-BYTES") == Some("209715200"),
        "big file size: {console}"
    );
    let sum = get("KILN-SUM-ORIGINAL").unwrap_or("");
    ensure!(sum.len() == 64, "original checksum {sum:?}: {console}");
    ensure!(get("KILN-SNAPSHOT") == Some("0"), "snapshot: {console}");
    ensure!(
        get("KILN-ORIGINAL-EXIT") == Some("0"),
        "original VM: {console}"
    );
    for i in 0..8 {
        ensure!(
            get(&format!("KILN-CLONE-READY-{i}")) == Some("yes"),
            "clone {i} never answered: {console}"
        );
        ensure!(
            get(&format!("KILN-SUM-{i}")) == Some(sum),
            "clone {i} read a different file: {console}"
        );
        ensure!(
            get(&format!("KILN-CLONE-EXIT-{i}")) == Some("0"),
            "clone {i} exit: {console}"
        );
    }
    let total_pss = mib("KILN-TOTAL-PSS-MIB").unwrap_or(i64::MAX);
    let total_rss = mib("KILN-TOTAL-RSS-MIB").unwrap_or(i64::MAX);
    let (cached_before, cached_after) = (mib("KILN-CACHED-BEFORE"), mib("KILN-CACHED-AFTER"));
    let (avail_before, avail_after) = (mib("KILN-AVAILABLE-BEFORE"), mib("KILN-AVAILABLE-AFTER"));
    let avail_drop = match (avail_before, avail_after) {
        (Some(b), Some(a)) => b - a,
        _ => i64::MAX,
    };
    println!(
        "snapshot_clones_share_memory: memory file {:?} MiB on disk; 8 clones: total Pss \
         {total_pss} MiB, total Rss {total_rss} MiB; Cached {cached_before:?} -> \
         {cached_after:?} MiB; MemAvailable {avail_before:?} -> {avail_after:?} MiB (drop \
         {avail_drop} MiB)",
        get("KILN-MEMORY-FILE-MIB")
    );
    for i in 0..8 {
        println!(
            "  clone {i}: {}",
            get(&format!("KILN-CLONE-MEM-{i}")).unwrap_or("?")
        );
    }
    // Unshared, 8 clones that each read 200 MiB would hold 1600 MiB.
    ensure!(
        total_pss < 400,
        "8 clones' total Pss is {total_pss} MiB, not < 2 x 200 MiB: {console}"
    );
    ensure!(
        avail_drop < 400,
        "MemAvailable dropped by {avail_drop} MiB, not < 2 x 200 MiB: {console}"
    );
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
