//! cgroup v2 slots in the test bed: a slot's memory.max holds the
//! whole VM to it, and a second VM started in an occupied slot stops the first.

use std::time::Duration;

use anyhow::{ensure, Result};
use kiln_tests::guest_initramfs::GuestInitramfs;
use kiln_tests::output::value;
use kiln_tests::{shell, Runner};

const TIMEOUT: Duration = Duration::from_secs(400);

#[test]
fn slot_memory_is_enforced_and_a_new_vm_stomps_the_old() -> Result<()> {
    let runner = Runner::detect()?;
    let script = shell::PRELUDE.to_string()
        + r#"
D="$PWD"
C=/sys/fs/cgroup
[ -e $C/cgroup.controllers ] || mount -t cgroup2 none $C
vm() { # vm NAME SLOT [extra kiln run flags]
  name=$1; slot=$2; shift 2
  "$KILN" run --kernel "$GUEST_VMLINUX" --initrd "$FILES/agent.cpio" --memory 256 \
    --slot $slot --vsock "$D/$name.sock" --serial null "$@" > $name.out 2> $name.err &
}
# 1. A 256 MiB guest in slot 1 limited to 160 MiB: filling 200 MiB of its RAM gets the
#    VMM OOM-killed inside the slot, and nothing outside it.
vm big 1 --slot-memory 160
big=$!
echo "KILN-BIG-READY=$(wait_exec "$D/big.sock" $big)"
echo "KILN-BIG-CGROUP=$(cat /proc/$big/cgroup)"
echo "KILN-SLOT1-MAX=$(cat $C/kiln/slot-1/memory.max)"
echo "KILN-SLOT1-PIDS-MAX=$(cat $C/kiln/slot-1/pids.max)"
"$KILN" exec --vsock "$D/big.sock" -- sh -c 'mkdir -p /tmp/fill && \
  mount -t tmpfs -o size=240m fill /tmp/fill && head -c 209715200 /dev/zero > /tmp/fill/f' \
  > /dev/null 2>&1
wait $big
echo "KILN-BIG-EXIT=$?"
echo "KILN-SLOT1-OOM-KILLS=$(awk '$1 == "oom_kill" { print $2 }' $C/kiln/slot-1/memory.events)"

# 2. VM a in slot 2; then VM b in slot 2 stops a (SIGTERM: exit 143) and runs.
vm a 2
a=$!
echo "KILN-A-READY=$(wait_exec "$D/a.sock" $a)"
vm b 2
b=$!
wait $a
echo "KILN-A-EXIT=$?"
echo "KILN-B-READY=$(wait_exec "$D/b.sock" $b)"
echo "KILN-SLOT2-PROCS=$(cat $C/kiln/slot-2/cgroup.procs | tr '\n' ' ')"
echo "KILN-B-PID=$b"
echo "KILN-B-STOMP-LOG=$(grep -c 'occupied by pids' b.err)"
kill -TERM $b
wait $b
echo "KILN-B-EXIT=$?"
echo "KILN-PROCESSES-LEFT=$(pidof kiln | wc -w)"
for f in big a b; do echo "--- $f.err"; cat $f.err; done
"#;
    let files = vec![("agent.cpio".to_string(), GuestInitramfs::new().build()?)];
    let out = runner.run(&script, &files, TIMEOUT)?;
    let console = &out.console;
    let get = |key: &str| value(console, key);
    ensure!(get("KILN-BIG-READY") == Some("yes"), "big VM: {console}");
    ensure!(
        get("KILN-BIG-CGROUP") == Some("0::/kiln/slot-1"),
        "the VMM is not in its slot: {console}"
    );
    ensure!(
        get("KILN-SLOT1-MAX") == Some(&(160u64 << 20).to_string()),
        "memory.max: {console}"
    );
    ensure!(
        get("KILN-SLOT1-PIDS-MAX") == Some("128"),
        "pids.max: {console}"
    );
    ensure!(
        get("KILN-BIG-EXIT") == Some("137"),
        "the VM over its slot's memory was not killed: {console}"
    );
    ensure!(
        get("KILN-SLOT1-OOM-KILLS").and_then(|v| v.parse::<u64>().ok()) >= Some(1),
        "no OOM kill in the slot: {console}"
    );
    ensure!(get("KILN-A-READY") == Some("yes"), "VM a: {console}");
    ensure!(
        get("KILN-A-EXIT") == Some("143"),
        "VM a was not stopped by SIGTERM: {console}"
    );
    ensure!(get("KILN-B-READY") == Some("yes"), "VM b: {console}");
    let b = get("KILN-B-PID").unwrap_or("?");
    ensure!(
        get("KILN-SLOT2-PROCS") == Some(b),
        "slot 2 should hold only VM b ({b}): {console}"
    );
    ensure!(
        get("KILN-B-STOMP-LOG") == Some("1"),
        "no stomp log line: {console}"
    );
    ensure!(get("KILN-B-EXIT") == Some("143"), "VM b: {console}");
    ensure!(
        get("KILN-PROCESSES-LEFT") == Some("0"),
        "kiln left running: {console}"
    );
    Ok(())
}
