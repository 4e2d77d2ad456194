//! `kiln job --from-snapshot`: jobs that start from a warm VM's snapshot, in the
//! test bed.

use std::time::Duration;

use anyhow::{ensure, Result};
use kiln_tests::guest_initramfs::GuestInitramfs;
use kiln_tests::output::{sections, value};
use kiln_tests::Runner;

const TIMEOUT: Duration = Duration::from_secs(400);

/// A VM "fetches sources" (writes a checkout), is snapshotted; two jobs then start from the
/// snapshot, both find the checkout, run different commands on it and exit with their own
/// codes; the snapshot is unchanged afterwards.
#[test]
fn snapshot_jobs_branch_from_one_warm_vm() -> Result<()> {
    let runner = Runner::detect()?;
    let script = r#"
D="$PWD"
"$KILN" run --kernel "$GUEST_VMLINUX" --initrd "$FILES/agent.cpio" --memory 256 \
  --vsock "$D/v.sock" --api "$D/api.sock" --serial "$D/console" > run.out 2> run.err &
vm=$!
n=0
until timeout 10 "$KILN" exec --vsock "$D/v.sock" -- true 2>/dev/null; do
  n=$((n + 1)); [ $n -lt 600 ] && kill -0 $vm 2>/dev/null || break; sleep 0.1
done
"$KILN" exec --vsock "$D/v.sock" -- sh -c 'mkdir -p /src && seq 1 1000 > /src/numbers && echo checkout-ok > /src/STATUS'
echo "KILN-CHECKOUT=$?"
"$KILN" ctl --api "$D/api.sock" snapshot --dir "$D/snap" --no-resume > /dev/null
echo "KILN-SNAPSHOT=$?"
"$KILN" ctl --api "$D/api.sock" shutdown > /dev/null
wait $vm
before=$(cat "$D/snap/state" "$D/snap/memory" | sha256sum)
echo "KILN-CASE=sum"
"$KILN" job --from-snapshot "$D/snap" --script "$FILES/sum.sh"
echo "KILN-JOB-EXIT=$?"
echo "KILN-CASE=count"
"$KILN" job --from-snapshot "$D/snap" --script "$FILES/count.sh" --env WANT=1000
echo "KILN-JOB-EXIT=$?"
after=$(cat "$D/snap/state" "$D/snap/memory" | sha256sum)
[ "$before" = "$after" ] && echo "KILN-SNAPSHOT-UNCHANGED=yes"
echo "KILN-CASE=bad"
"$KILN" job --from-snapshot "$D/nonexistent" --script "$FILES/sum.sh" 2> bad.err
echo "KILN-JOB-EXIT=$?"
cat bad.err
"#;
    let files = vec![
        ("agent.cpio".to_string(), GuestInitramfs::new().build()?),
        (
            "sum.sh".to_string(),
            b"cat /src/STATUS; echo \"sum=$(awk '{s+=$1} END {print s}' /src/numbers)\"; exit 5\n"
                .to_vec(),
        ),
        (
            "count.sh".to_string(),
            b"n=$(wc -l < /src/numbers); echo \"lines=$n\"; [ \"$n\" = \"$WANT\" ] && exit 0; exit 9\n"
                .to_vec(),
        ),
    ];
    let out = runner.run(script, &files, TIMEOUT)?;
    let c = &out.console;
    ensure!(
        value(c, "KILN-CHECKOUT") == Some("0"),
        "checkout failed: {c}"
    );
    ensure!(
        value(c, "KILN-SNAPSHOT") == Some("0"),
        "snapshot failed: {c}"
    );
    let cases = sections(c, "KILN-CASE");
    let case = |name: &str| {
        cases
            .iter()
            .find(|s| s.0 == name)
            .map(|s| s.1)
            .unwrap_or("")
    };
    ensure!(
        value(case("sum"), "KILN-JOB-EXIT") == Some("5"),
        "sum job: {c}"
    );
    ensure!(
        case("sum").contains("checkout-ok") && case("sum").contains("sum=500500"),
        "{c}"
    );
    ensure!(
        value(case("count"), "KILN-JOB-EXIT") == Some("0"),
        "count job: {c}"
    );
    ensure!(case("count").contains("lines=1000"), "{c}");
    ensure!(
        value(c, "KILN-SNAPSHOT-UNCHANGED") == Some("yes"),
        "snapshot changed: {c}"
    );
    ensure!(
        value(case("bad"), "KILN-JOB-EXIT") == Some("1"),
        "bad snapshot: {c}"
    );
    ensure!(
        case("bad").contains("cannot open snapshot directory"),
        "{c}"
    );
    Ok(())
}

/// A job snapshots itself after "fetching sources" (`kiln-snapshot` inside the script,
/// `kiln job --snapshot-at`), carries on to its end; a later job starts from that point and
/// snapshots itself again after "installing dependencies"; a third starts from there. A
/// job may not snapshot over the snapshot it started from.
#[test]
fn snapshot_job_takes_its_own_snapshot() -> Result<()> {
    let runner = Runner::detect()?;
    let script = r#"
D="$PWD"
"$KILN" job --kernel "$GUEST_VMLINUX" --initrd "$FILES/agent.cpio" --memory 256 \
  --snapshot-at "$D/warm" --script "$FILES/a.sh"
echo "KILN-A-EXIT=$?"
[ -f "$D/warm/state" ] && [ -f "$D/warm/memory" ] && echo "KILN-WARM=yes"
"$KILN" job --from-snapshot "$D/warm" --snapshot-at "$D/deps" --script "$FILES/b.sh"
echo "KILN-B-EXIT=$?"
"$KILN" job --from-snapshot "$D/deps" --script "$FILES/c.sh"
echo "KILN-C-EXIT=$?"
before=$(cat "$D/warm/state" "$D/warm/memory" | sha256sum)
"$KILN" job --from-snapshot "$D/warm" --snapshot-at "$D/warm" --script "$FILES/refused.sh"
echo "KILN-OVER-EXIT=$?"
after=$(cat "$D/warm/state" "$D/warm/memory" | sha256sum)
[ "$before" = "$after" ] && echo "KILN-WARM-UNCHANGED=yes"
"$KILN" job --kernel "$GUEST_VMLINUX" --initrd "$FILES/agent.cpio" --memory 256 \
  --script "$FILES/refused.sh"
echo "KILN-REFUSED-EXIT=$?"
"#;
    let files = vec![
        ("agent.cpio".to_string(), GuestInitramfs::new().build()?),
        (
            "a.sh".to_string(),
            b"mkdir -p /src && echo fetched > /src/STATUS\nkiln-snapshot || exit 7\necho after-snapshot\nexit 4\n"
                .to_vec(),
        ),
        (
            "b.sh".to_string(),
            b"cat /src/STATUS; echo installed > /src/DEPS\nkiln-snapshot || exit 8\nexit 6\n"
                .to_vec(),
        ),
        (
            "c.sh".to_string(),
            b"echo \"c-sees $(cat /src/STATUS) $(cat /src/DEPS)\"; exit 3\n".to_vec(),
        ),
        ("refused.sh".to_string(), b"kiln-snapshot; echo \"helper=$?\"\n".to_vec()),
    ];
    let out = runner.run(script, &files, TIMEOUT)?;
    let c = &out.console;
    ensure!(value(c, "KILN-A-EXIT") == Some("4"), "job A: {c}");
    ensure!(
        c.contains("kiln-snapshot: snapshot taken") && c.contains("after-snapshot"),
        "{c}"
    );
    ensure!(
        value(c, "KILN-WARM") == Some("yes"),
        "no snapshot written: {c}"
    );
    ensure!(
        value(c, "KILN-B-EXIT") == Some("6") && c.contains("fetched"),
        "job B: {c}"
    );
    ensure!(
        value(c, "KILN-C-EXIT") == Some("3") && c.contains("c-sees fetched installed"),
        "job C, from job B's snapshot: {c}"
    );
    ensure!(
        c.matches("helper=1").count() == 2,
        "kiln-snapshot without --snapshot-at, or over the snapshot the job started from, must fail: {c}"
    );
    ensure!(value(c, "KILN-REFUSED-EXIT") == Some("0"), "{c}");
    ensure!(value(c, "KILN-OVER-EXIT") == Some("0"), "{c}");
    ensure!(
        value(c, "KILN-WARM-UNCHANGED") == Some("yes"),
        "the snapshot a job started from was written over: {c}"
    );
    Ok(())
}
