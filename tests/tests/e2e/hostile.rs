//! Hostile guests with the real guest kernel: what a guest's userland can make kiln do must
//! stay bounded, and the VM must keep serving its agent.

use std::time::Duration;

use anyhow::{ensure, Result};
use kiln_tests::guest_initramfs::GuestInitramfs;
use kiln_tests::output::value;
use kiln_tests::Runner;

/// The log cap the test sets (`KILN_LOG_MAX_BYTES`): small enough that the flood's
/// rate-limited warnings pass it, so that the log rotates and the cap is what holds it.
const LOG_CAP: u64 = 4096;
/// How long the guest floods, in its own seconds.
const FLOOD_S: u32 = 30;
/// The first virtio-mmio window (kiln's MMIO device window starts at 0xd000_0000), and its
/// register 0, MagicValue: read-only, so every write is refused and warned about.
const MAGIC_REG: &str = "0xd0000000";

/// A guest writes a read-only virtio-mmio register from userland (busybox `devmem` on
/// /dev/mem) in a loop for 30 s. kiln's log, a file as under `kiln-gitlab`, stays under the
/// cap set with `KILN_LOG_MAX_BYTES` (it rotated into `.1`, also under the cap), and the VM
/// still runs commands afterwards.
#[test]
fn hostile_guest_mmio_flood_keeps_the_log_under_its_cap() -> Result<()> {
    let runner = Runner::detect()?;
    let script = format!(
        r#"{prelude}
V="$PWD/v.sock"
KILN_LOG_MAX_BYTES={LOG_CAP} "$KILN" run --kernel "$GUEST_VMLINUX" --initrd "$FILES/agent.cpio" \
  --vcpus 1 --memory 256 --serial null --vsock "$V" 2> kiln.log &
vm=$!
[ "$(wait_exec "$V" $vm)" = yes ] || {{ echo "agent not ready"; cat kiln.log; exit 1; }}
echo "KILN-MAGIC=$("$KILN" exec --vsock "$V" -- devmem {MAGIC_REG} 32)"
echo "KILN-WRITES=$("$KILN" exec --vsock "$V" -- sh -c '
read s _ < /proc/uptime; end=$((${{s%.*}} + {FLOOD_S})); n=0
while read t _ < /proc/uptime && [ ${{t%.*}} -lt $end ]; do
  devmem {MAGIC_REG} 32 0x12345678 || exit 1
  n=$((n + 1))
done
echo $n')"
kill -0 $vm 2> /dev/null && echo "KILN-RUNNING=yes" || echo "KILN-RUNNING=no"
timeout 60 "$KILN" exec --vsock "$V" -- true; echo "KILN-EXEC=$?"
echo "KILN-LOG-SIZE=$(stat -c %s kiln.log)"
echo "KILN-LOG1-SIZE=$(stat -c %s kiln.log.1 2> /dev/null || echo 0)"
echo "KILN-WARNED=$(cat kiln.log.1 kiln.log 2> /dev/null | grep -c 'read-only or unknown register')"
echo "KILN-SUPPRESSED=$(cat kiln.log.1 kiln.log 2> /dev/null | grep -c 'warnings were suppressed')"
kill $vm; wait $vm || true
tail -c 600 kiln.log
"#,
        prelude = kiln_tests::shell::PRELUDE
    );
    let files = vec![("agent.cpio".to_string(), GuestInitramfs::new().build()?)];
    let out = runner.run(&script, &files, Duration::from_secs(600))?;
    let c = &out.console;
    ensure!(out.exit_code == 0, "script failed:\n{c}");
    let num = |key: &str| value(c, key).and_then(|v| v.parse::<u64>().ok());

    // The guest reached the register from userland, and kept writing it for the whole flood.
    ensure!(
        value(c, "KILN-MAGIC") == Some("0x74726976"),
        "devmem should read the virtio-mmio magic (\"virt\") at {MAGIC_REG}:\n{c}"
    );
    let writes = num("KILN-WRITES").unwrap_or(0);
    ensure!(writes > 0, "the guest's flood did not run:\n{c}");

    // The VM lived through it and still serves its agent.
    ensure!(value(c, "KILN-RUNNING") == Some("yes"), "{c}");
    ensure!(
        value(c, "KILN-EXEC") == Some("0"),
        "kiln exec after the flood:\n{c}"
    );

    // kiln saw the writes and warned about them (rate-limited: in the test bed each devmem
    // run costs a fraction of a second, so the limit may never have to drop a line), and
    // the warnings passed the cap: the log rotated, and neither file is over the cap.
    ensure!(
        num("KILN-WARNED").unwrap_or(0) > 0,
        "no warnings logged:\n{c}"
    );
    let (log, old) = (num("KILN-LOG-SIZE"), num("KILN-LOG1-SIZE"));
    ensure!(
        log.is_some_and(|s| s <= LOG_CAP),
        "kiln.log is {log:?} bytes, over the {LOG_CAP}-byte cap:\n{c}"
    );
    ensure!(
        old.is_some_and(|s| s > 0 && s <= LOG_CAP),
        "kiln.log.1 is {old:?} bytes: the log should have rotated once at the cap, \
         and stay under it:\n{c}"
    );
    eprintln!(
        "{writes} register writes in {FLOOD_S} s ({:?} suppressed-warning lines); log {log:?} + {old:?} bytes",
        num("KILN-SUPPRESSED")
    );
    Ok(())
}
