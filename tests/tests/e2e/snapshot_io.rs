//! A snapshot taken while a vCPU is in the middle of a port write. KVM finishes
//! a port or MMIO access only when KVM_RUN is entered again; state saved before that
//! makes the restored guest repeat the write (or lose a read's result). On hardware KVM
//! (and so in the test bed) RIP still points at the OUT until then; this machine's PVM
//! /dev/kvm moves it on before the exit, so the test can only fail on the first two.

use std::time::Duration;

use anyhow::{ensure, Result};
use kiln_tests::output::value;
use kiln_tests::{tiny_kernel, Runner};

const TIMEOUT: Duration = Duration::from_secs(300);
/// More bytes than a pipe holds (64 KiB), so the guest's writes fill it.
const COUNT: u32 = 96 * 1024;

/// The guest writes a counter to a serial console that is a FIFO nobody reads: once the
/// pipe is full, the vCPU thread blocks in user space handling a port write. A snapshot is
/// asked for then, and the pipe drained, so the pause lands right after that write's exit.
/// The original's output followed by the restored clone's must be the counter's bytes, none
/// repeated and none lost.
#[test]
fn snapshot_between_port_writes_repeats_none() -> Result<()> {
    let runner = Runner::detect()?;
    let script = r#"
D="$PWD"
mkfifo console.fifo
"$KILN" run --kernel "$FILES/counting.elf" --memory 32 --api "$D/api.sock" \
  --serial console.fifo > run.out 2> run.err &
vm=$!
exec 3< console.fifo
# Wait (bounded) until a kiln thread is blocked in write(2) (syscall 1): the vCPU, on the
# full pipe.
n=0
blocked=no
while [ $n -lt 600 ] && kill -0 $vm 2>/dev/null; do
  if cat /proc/$vm/task/*/syscall 2>/dev/null | grep -q '^1 '; then blocked=yes; break; fi
  n=$((n + 1))
  sleep 0.1
done
echo "KILN-VCPU-BLOCKED=$blocked"
"$KILN" ctl --api "$D/api.sock" snapshot --dir "$D/snap" --no-resume > snap.out 2> snap.err &
snap=$!
# Give kiln's main thread a moment to take the request and set the pause before the pipe
# drains. Too short a wait can only make the test miss the moment and pass; never fail.
sleep 1
cat <&3 > before &
drain=$!
wait $snap
echo "KILN-SNAPSHOT=$?"
cat snap.err
"$KILN" ctl --api "$D/api.sock" shutdown > /dev/null
wait $vm
echo "KILN-ORIGINAL-EXIT=$?"
cat run.err
wait $drain
exec 3<&-
"$KILN" restore --snapshot "$D/snap" --serial after > restore.out 2> restore.err
echo "KILN-RESTORE-EXIT=$?"
cat restore.err
echo "KILN-BYTES=$(cat before | wc -c) $(cat after | wc -c)"
cat before after | cmp - "$FILES/expected"
echo "KILN-SAME=$?"
"#;
    let files = vec![
        ("counting.elf".to_string(), tiny_kernel::counting(COUNT)),
        ("expected".to_string(), tiny_kernel::counting_output(COUNT)),
    ];
    let out = runner.run(script, &files, TIMEOUT)?;
    let console = &out.console;
    let get = |key: &str| value(console, key);
    ensure!(
        get("KILN-VCPU-BLOCKED") == Some("yes"),
        "the vCPU never blocked on the console: {console}"
    );
    ensure!(get("KILN-SNAPSHOT") == Some("0"), "snapshot: {console}");
    ensure!(
        get("KILN-ORIGINAL-EXIT") == Some("0"),
        "original: {console}"
    );
    ensure!(get("KILN-RESTORE-EXIT") == Some("0"), "restore: {console}");
    eprintln!(
        "bytes before the snapshot, after the restore: {:?}",
        get("KILN-BYTES")
    );
    ensure!(
        get("KILN-SAME") == Some("0"),
        "the original's output and the clone's are not the counter's bytes, once each \
         (cmp's report above the KILN-SAME line): {console}"
    );
    Ok(())
}
