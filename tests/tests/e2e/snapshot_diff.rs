//! Diff snapshots in the test bed: a diff taken after a small
//! change is much smaller than the full snapshot under it, and restoring it (base + diff,
//! and a diff of a restored diff) gives the right guest state.

use std::time::Duration;

use anyhow::{ensure, Result};
use kiln_tests::guest_initramfs::GuestInitramfs;
use kiln_tests::output::value;
use kiln_tests::{shell, Runner};

const TIMEOUT: Duration = Duration::from_secs(400);

#[test]
fn snapshot_diff_is_small_and_layers_over_its_base() -> Result<()> {
    let runner = Runner::detect()?;
    let script = format!(
        "{}{}",
        shell::PRELUDE,
        r#"
D="$PWD"
written() { grep -o '"memory_bytes_written":[0-9]*' "$1" | cut -d: -f2; }
"$KILN" run --kernel "$GUEST_VMLINUX" --initrd "$FILES/agent.cpio" --memory 256 \
  --track-dirty-pages --vsock "$D/v.sock" --api "$D/api.sock" --serial null > run.out 2> run.err &
vm=$!
echo "KILN-READY=$(wait_exec "$D/v.sock" $vm)"
# 32 MiB of data that the full snapshot carries and the diff must not.
"$KILN" exec --vsock "$D/v.sock" -- sh -c 'head -c 33554432 /dev/urandom > /tmp/bulk && sha256sum /tmp/bulk > /tmp/bulk.sum && echo in-base > /tmp/base'
echo "KILN-BASE-WRITTEN=$?"
"$KILN" ctl --api "$D/api.sock" snapshot --dir "$D/full" > full.out 2> full.err
echo "KILN-FULL=$?"
"$KILN" exec --vsock "$D/v.sock" -- sh -c 'echo in-diff > /tmp/diff'
"$KILN" ctl --api "$D/api.sock" snapshot --diff --dir "$D/diff" > diff.out 2> diff.err
echo "KILN-DIFF=$?"
cat full.out full.err diff.out diff.err
echo "KILN-FULL-BYTES=$(written full.out)"
echo "KILN-DIFF-BYTES=$(written diff.out)"
echo "KILN-FULL-DISK-KB=$(du -k "$D/full/memory" | cut -f1)"
echo "KILN-DIFF-DISK-KB=$(du -k "$D/diff/memory" | cut -f1)"
"$KILN" ctl --api "$D/api.sock" shutdown > /dev/null
wait $vm
echo "KILN-ORIGINAL-EXIT=$?"
full_sum=$(cat "$D/full/state" "$D/full/memory" | sha256sum)

# base + diff, tracking dirty pages again for a second diff on top.
"$KILN" restore --snapshot "$D/diff" --vsock "$D/c1.sock" --api "$D/capi1.sock" \
  --track-dirty-pages --serial null > r1.out 2> r1.err &
c1=$!
echo "KILN-C1-READY=$(wait_exec "$D/c1.sock" $c1)"
echo "KILN-C1-FILES=$("$KILN" exec --vsock "$D/c1.sock" -- cat /tmp/base /tmp/diff | tr '\n' ' ')"
echo "KILN-C1-BULK=$("$KILN" exec --vsock "$D/c1.sock" -- sha256sum -c /tmp/bulk.sum)"
"$KILN" exec --vsock "$D/c1.sock" -- sh -c 'echo in-diff2 > /tmp/diff2'
"$KILN" ctl --api "$D/capi1.sock" snapshot --diff --dir "$D/diff2" > diff2.out 2> diff2.err
echo "KILN-DIFF2=$?"
cat diff2.out diff2.err
"$KILN" ctl --api "$D/capi1.sock" shutdown > /dev/null
wait $c1

# base + diff + diff2.
"$KILN" restore --snapshot "$D/diff2" --vsock "$D/c2.sock" --api "$D/capi2.sock" \
  --serial null > r2.out 2> r2.err &
c2=$!
echo "KILN-C2-READY=$(wait_exec "$D/c2.sock" $c2)"
echo "KILN-C2-FILES=$("$KILN" exec --vsock "$D/c2.sock" -- cat /tmp/base /tmp/diff /tmp/diff2 | tr '\n' ' ')"
echo "KILN-C2-BULK=$("$KILN" exec --vsock "$D/c2.sock" -- sha256sum -c /tmp/bulk.sum)"
"$KILN" ctl --api "$D/capi2.sock" shutdown > /dev/null
wait $c2

# The base alone: no trace of the later writes.
"$KILN" restore --snapshot "$D/full" --vsock "$D/c3.sock" --api "$D/capi3.sock" \
  --serial null > r3.out 2> r3.err &
c3=$!
echo "KILN-C3-READY=$(wait_exec "$D/c3.sock" $c3)"
echo "KILN-C3-FILES=$("$KILN" exec --vsock "$D/c3.sock" -- sh -c 'cat /tmp/base; ls /tmp/diff 2>/dev/null || echo no-diff' | tr '\n' ' ')"
"$KILN" ctl --api "$D/capi3.sock" shutdown > /dev/null
wait $c3
[ "$full_sum" = "$(cat "$D/full/state" "$D/full/memory" | sha256sum)" ] && echo "KILN-BASE-UNCHANGED=yes"

# A diff without tracking is refused, and says how to get one.
"$KILN" restore --snapshot "$D/full" --vsock "$D/c4.sock" --api "$D/capi4.sock" \
  --serial null > r4.out 2> r4.err &
c4=$!
echo "KILN-C4-READY=$(wait_exec "$D/c4.sock" $c4)"
"$KILN" ctl --api "$D/capi4.sock" snapshot --diff --dir "$D/refused" > refused.out 2> refused.err
echo "KILN-REFUSED=$?"
echo "KILN-REFUSED-WHY=$(cat refused.err)"
"$KILN" ctl --api "$D/capi4.sock" shutdown > /dev/null
wait $c4
echo "KILN-PROCESSES-LEFT=$(pidof kiln | wc -w)"
for f in run r1 r2 r3 r4; do echo "--- $f.err"; cat $f.err; done
"#
    );
    let files = vec![("agent.cpio".to_string(), GuestInitramfs::new().build()?)];
    let out = runner.run(&script, &files, TIMEOUT)?;
    let console = &out.console;
    let get = |key: &str| value(console, key);
    let number = |key: &str| get(key).and_then(|v| v.parse::<u64>().ok());
    for key in [
        "KILN-READY",
        "KILN-C1-READY",
        "KILN-C2-READY",
        "KILN-C3-READY",
        "KILN-C4-READY",
    ] {
        ensure!(get(key) == Some("yes"), "{key}: {console}");
    }
    for key in [
        "KILN-BASE-WRITTEN",
        "KILN-FULL",
        "KILN-DIFF",
        "KILN-DIFF2",
        "KILN-ORIGINAL-EXIT",
    ] {
        ensure!(get(key) == Some("0"), "{key}: {console}");
    }
    let (full, diff) = (number("KILN-FULL-BYTES"), number("KILN-DIFF-BYTES"));
    let (full_kb, diff_kb) = (number("KILN-FULL-DISK-KB"), number("KILN-DIFF-DISK-KB"));
    eprintln!(
        "memory written: full {full:?} bytes, diff {diff:?} bytes; on disk: full {full_kb:?} KiB, diff {diff_kb:?} KiB"
    );
    let (Some(full), Some(diff), Some(full_kb), Some(diff_kb)) = (full, diff, full_kb, diff_kb)
    else {
        return Err(anyhow::anyhow!("sizes missing: {console}"));
    };
    ensure!(
        full > 32 << 20,
        "the full snapshot lacks the bulk data: {console}"
    );
    ensure!(
        diff > 0 && diff * 8 < full && diff_kb * 8 < full_kb,
        "the diff is not much smaller than the full snapshot: {console}"
    );
    ensure!(
        get("KILN-C1-FILES") == Some("in-base in-diff"),
        "base + diff: {console}"
    );
    ensure!(
        get("KILN-C2-FILES") == Some("in-base in-diff in-diff2"),
        "base + diff + diff2: {console}"
    );
    for key in ["KILN-C1-BULK", "KILN-C2-BULK"] {
        ensure!(
            get(key) == Some("/tmp/bulk: OK"),
            "{key}: the base's data under the diffs: {console}"
        );
    }
    ensure!(
        get("KILN-C3-FILES") == Some("in-base no-diff"),
        "the base alone: {console}"
    );
    ensure!(
        get("KILN-BASE-UNCHANGED") == Some("yes"),
        "restores wrote to the base: {console}"
    );
    ensure!(
        get("KILN-REFUSED") != Some("0"),
        "diff without tracking: {console}"
    );
    ensure!(
        get("KILN-REFUSED-WHY").is_some_and(|why| why.contains("--track-dirty-pages")),
        "the refusal does not say what to do: {console}"
    );
    ensure!(
        get("KILN-PROCESSES-LEFT") == Some("0"),
        "kiln left running: {console}"
    );
    Ok(())
}
