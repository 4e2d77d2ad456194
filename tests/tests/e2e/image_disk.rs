//! Disks in the test bed, with a hand-made ext4 image: two VMs boot
//! from the busybox agent initramfs with one shared base image, each over its own overlay;
//! each sees the base's file and its own writes, never the other's, and the base image is
//! unchanged. Then a snapshot of one of them with its disk, a clone restored from it that
//! sees what was written before the snapshot, and whose writes reach only its own overlay.
//! And `kiln job` with a disk and no overlay: the job writes, the image does not change.

use std::time::Duration;

use anyhow::{ensure, Result};
use kiln_tests::guest_initramfs::GuestInitramfs;
use kiln_tests::output::value;
use kiln_tests::{shell, Runner};

const TIMEOUT: Duration = Duration::from_secs(500);

#[test]
fn image_overlays_are_per_vm_and_follow_snapshots() -> Result<()> {
    let runner = Runner::detect()?;
    let base = kiln_tests::ext4::image(16, &[("hello.txt", b"from-the-base\n")])?;
    let script = shell::PRELUDE.to_string()
        + r#"
D="$PWD"
B="$FILES/base.img"
sum() { sha256sum "$1" | cut -d' ' -f1; }
SHA0=$(sum "$B")
ex() { s=$1; shift; "$KILN" exec --vsock "$s" -- sh -c "$*"; }
for i in 0 1; do
  "$KILN" run --kernel "$GUEST_VMLINUX" --initrd "$FILES/agent.cpio" --memory 128 \
    --vsock "$D/v$i.sock" --api "$D/api$i.sock" --serial "$D/console$i" \
    --disk "$B,overlay=$D/vm$i.overlay" > "run$i.out" 2> "run$i.err" &
  eval "vm$i=$!"
done
for i in 0 1; do
  eval "pid=\$vm$i"
  echo "KILN-READY-$i=$(wait_exec "$D/v$i.sock" $pid)"
done
for i in 0 1; do
  ex "$D/v$i.sock" "mkdir -p /mnt && mount -t ext4 /dev/vda /mnt && echo written-by-vm-$i > /mnt/vm$i.txt && sync"
  echo "KILN-WRITE-$i=$?"
done
# Remount, so that what each VM lists comes from its disk, not its page cache.
for i in 0 1; do
  S="$D/v$i.sock"
  ex "$S" "umount /mnt && mount -t ext4 /dev/vda /mnt"
  echo "KILN-REMOUNT-$i=$?"
  echo "KILN-BASE-$i=$(ex "$S" cat /mnt/hello.txt)"
  echo "KILN-OWN-$i=$(ex "$S" cat /mnt/vm$i.txt)"
  echo "KILN-LS-$i=$(ex "$S" ls /mnt | tr '\n' ' ')"
  echo "KILN-SERIAL-$i=$(ex "$S" cat /sys/block/vda/serial 2>/dev/null)"
done

# Snapshot VM 0 with its disk; it resumes and writes on; a clone starts from the snapshot.
"$KILN" ctl --api "$D/api0.sock" snapshot --dir "$D/snap" > snap.out 2> snap.err
echo "KILN-SNAPSHOT=$?"
cat snap.out snap.err
SNAPSHA=$(sum "$D/snap/disk-0.overlay")
ex "$D/v0.sock" "echo after-the-snapshot > /mnt/after.txt && sync"
echo "KILN-AFTER=$?"
# The base is neither in the snapshot nor in an image store: the restore is given it again.
"$KILN" restore --snapshot "$D/snap" --vsock "$D/c.sock" --api "$D/capi.sock" \
  --disk-overlay "0=$D/clone.overlay" --disk-image "0=$B" --serial "$D/cconsole" > restore.out 2> restore.err &
clone=$!
echo "KILN-CLONE-READY=$(wait_exec "$D/c.sock" $clone)"
echo "KILN-CLONE-SEES=$(ex "$D/c.sock" cat /mnt/vm0.txt)"
ex "$D/c.sock" "echo clone-marker-7f3a9c > /mnt/clone.txt && sync"
echo "KILN-CLONE-WRITE=$?"
ex "$D/c.sock" "umount /mnt && mount -t ext4 /dev/vda /mnt"
echo "KILN-CLONE-REMOUNT=$?"
echo "KILN-CLONE-LS=$(ex "$D/c.sock" ls /mnt | tr '\n' ' ')"
echo "KILN-CLONE-READS=$(ex "$D/c.sock" cat /mnt/vm0.txt /mnt/clone.txt | tr '\n' ' ')"
if grep -q clone-marker-7f3a9c "$D/vm0.overlay"; then echo "KILN-MARKER-IN-ORIGINAL=yes"; else echo "KILN-MARKER-IN-ORIGINAL=no"; fi
if grep -q clone-marker-7f3a9c "$D/clone.overlay"; then echo "KILN-MARKER-IN-CLONE=yes"; else echo "KILN-MARKER-IN-CLONE=no"; fi
[ "$(sum "$D/snap/disk-0.overlay")" = "$SNAPSHA" ] && echo "KILN-SNAP-UNCHANGED=yes" || echo "KILN-SNAP-UNCHANGED=no"
for a in "$D/api0.sock" "$D/api1.sock" "$D/capi.sock"; do "$KILN" ctl --api "$a" shutdown > /dev/null; done
i=0
for p in $vm0 $vm1 $clone; do wait $p; echo "KILN-EXIT-$i=$?"; i=$((i + 1)); done

# A job with the disk and no overlay: it gets a temporary one, the image is not written.
cat > job.sh <<'JOB'
mkdir -p /mnt && mount -t ext4 /dev/vda /mnt && echo job-wrote > /mnt/job.txt && sync && cat /mnt/hello.txt /mnt/job.txt
JOB
"$KILN" job --kernel "$GUEST_VMLINUX" --initrd "$FILES/agent.cpio" --memory 128 \
  --disk "$B" --script job.sh > job.out 2> job.err
echo "KILN-JOB=$?"
echo "KILN-JOB-OUT=$(tr '\n' ' ' < job.out)"
echo "KILN-JOB-LEFT=$(ls -d /tmp/kiln-job-* 2>/dev/null | wc -l)"
[ "$(sum "$B")" = "$SHA0" ] && echo "KILN-BASE-UNCHANGED=yes" || echo "KILN-BASE-UNCHANGED=no"
echo "KILN-PROCESSES-LEFT=$(pidof kiln | wc -w)"
for f in run0.err run1.err restore.err job.err; do echo "--- $f"; cat "$f"; done
echo "--- console0 tail"; tail -n 15 "$D/console0"
"#;
    let files = vec![
        ("agent.cpio".to_string(), GuestInitramfs::new().build()?),
        ("base.img".to_string(), base),
    ];
    let started = std::time::Instant::now();
    let out = runner.run(&script, &files, TIMEOUT)?;
    eprintln!("test-bed run took {:.1} s", started.elapsed().as_secs_f64());
    let console = &out.console;
    let get = |key: &str| value(console, key);
    for i in 0..2 {
        let key = |k: &str| format!("KILN-{k}-{i}");
        ensure!(
            get(&key("READY")) == Some("yes"),
            "VM {i} never answered: {console}"
        );
        ensure!(get(&key("WRITE")) == Some("0"), "VM {i} write: {console}");
        ensure!(
            get(&key("REMOUNT")) == Some("0"),
            "VM {i} remount: {console}"
        );
        ensure!(
            get(&key("BASE")) == Some("from-the-base"),
            "VM {i} does not see the base file: {console}"
        );
        let own = format!("written-by-vm-{i}");
        ensure!(get(&key("OWN")) == Some(own.as_str()), "VM {i}: {console}");
        let ls = get(&key("LS")).unwrap_or_default();
        let (mine, other) = (format!("vm{i}.txt"), format!("vm{}.txt", 1 - i));
        ensure!(
            ls.split_whitespace().any(|f| f == mine) && !ls.contains(&other),
            "VM {i} lists {ls:?}: it must see its own file and not the other's: {console}"
        );
    }
    ensure!(get("KILN-SNAPSHOT") == Some("0"), "snapshot: {console}");
    ensure!(
        get("KILN-AFTER") == Some("0"),
        "write after snapshot: {console}"
    );
    ensure!(get("KILN-CLONE-READY") == Some("yes"), "clone: {console}");
    ensure!(
        get("KILN-CLONE-SEES") == Some("written-by-vm-0"),
        "the clone does not see the pre-snapshot write: {console}"
    );
    ensure!(
        get("KILN-CLONE-WRITE") == Some("0"),
        "clone write: {console}"
    );
    ensure!(
        get("KILN-CLONE-REMOUNT") == Some("0"),
        "clone remount: {console}"
    );
    let ls = get("KILN-CLONE-LS").unwrap_or_default();
    ensure!(
        ls.contains("clone.txt") && ls.contains("vm0.txt") && !ls.contains("after.txt"),
        "the clone lists {ls:?}: {console}"
    );
    ensure!(
        get("KILN-CLONE-READS") == Some("written-by-vm-0 clone-marker-7f3a9c"),
        "the clone's disk after a remount: {console}"
    );
    ensure!(
        get("KILN-MARKER-IN-ORIGINAL") == Some("no"),
        "the clone's write reached the original's overlay: {console}"
    );
    ensure!(
        get("KILN-MARKER-IN-CLONE") == Some("yes"),
        "the clone's write is not in its overlay: {console}"
    );
    ensure!(
        get("KILN-SNAP-UNCHANGED") == Some("yes"),
        "the snapshot's overlay changed: {console}"
    );
    for i in 0..3 {
        let key = format!("KILN-EXIT-{i}");
        ensure!(get(&key) == Some("0"), "VM {i} exit: {console}");
    }
    ensure!(get("KILN-JOB") == Some("0"), "job: {console}");
    ensure!(
        get("KILN-JOB-OUT") == Some("from-the-base job-wrote"),
        "job output: {console}"
    );
    ensure!(
        get("KILN-BASE-UNCHANGED") == Some("yes"),
        "the base image changed: {console}"
    );
    ensure!(
        get("KILN-JOB-LEFT") == Some("0"),
        "the job's runtime dir (and temporary overlay) was left behind: {console}"
    );
    ensure!(
        get("KILN-PROCESSES-LEFT") == Some("0"),
        "kiln processes left: {console}"
    );
    Ok(())
}

/// A guest booted from an ext4 root disk with no initramfs (`kiln job --root-disk`): the
/// agent from the image runs as init and runs the job, which sees the image's files and
/// writes to `/`; the image itself is not written (the job's temporary overlay takes it).
/// A second job from the same image does not see the first one's write.
#[test]
fn image_root_disk_boots_the_agent_and_runs_jobs() -> Result<()> {
    let runner = Runner::detect()?;
    let root = kiln_tests::ext4::agent_root_image(48, &[("etc/image-name", b"kiln-test-root\n")])?;
    let script = r#"
R="$FILES/root.img"
sum() { sha256sum "$1" | cut -d' ' -f1; }
SHA0=$(sum "$R")
cat > job.sh <<'JOB'
cat /etc/image-name
grep ' / ' /proc/mounts | cut -d' ' -f1-3
ls /written-by-a-job 2>/dev/null || echo fresh
echo job > /written-by-a-job && sync && echo wrote
JOB
for i in 0 1; do
  "$KILN" job --kernel "$GUEST_VMLINUX" --root-disk "$R" --memory 128 --script job.sh --json \
    > "job$i.out" 2> "job$i.err"
  echo "KILN-JOB-$i=$?"
  echo "KILN-JOB-OUT-$i=$(tr '\n' ' ' < "job$i.out")"
done
# Many disks: 15 besides the root (IRQs 5 to 21 with the vsock device), each one seen.
extra=""
for k in $(seq 1 15); do
  dd if=/dev/zero of="x$k.img" bs=1M count=1 2>/dev/null
  extra="$extra --disk $PWD/x$k.img,ro,serial=x$k"
done
echo 'ls /sys/block | grep vd | tr "\n" " "; cat /sys/block/vdp/serial' > many.sh
"$KILN" job --kernel "$GUEST_VMLINUX" --root-disk "$R" --memory 128 $extra --script many.sh \
  > many.out 2> many.err
echo "KILN-MANY=$?"
echo "KILN-MANY-OUT=$(tr '\n' ' ' < many.out)"
[ "$(sum "$R")" = "$SHA0" ] && echo "KILN-ROOT-UNCHANGED=yes" || echo "KILN-ROOT-UNCHANGED=no"
for i in 0 1; do echo "--- job $i stderr"; cat "job$i.err"; done
echo "--- many stderr"; cat many.err
"#;
    let files = vec![("root.img".to_string(), root)];
    let started = std::time::Instant::now();
    let out = runner.run(script, &files, Duration::from_secs(300))?;
    eprintln!("test-bed run took {:.1} s", started.elapsed().as_secs_f64());
    let console = &out.console;
    let get = |key: &str| value(console, key);
    for i in 0..2 {
        ensure!(
            get(&format!("KILN-JOB-{i}")) == Some("0"),
            "job {i}: {console}"
        );
        ensure!(
            get(&format!("KILN-JOB-OUT-{i}"))
                == Some("kiln-test-root /dev/root / ext4 fresh wrote"),
            "job {i} output: {console}"
        );
    }
    ensure!(get("KILN-MANY") == Some("0"), "16 disks: {console}");
    let many = get("KILN-MANY-OUT").unwrap_or_default();
    let want: Vec<String> = (b'a'..=b'p').map(|c| format!("vd{}", c as char)).collect();
    let seen: Vec<&str> = many.split_whitespace().collect();
    ensure!(
        seen.len() == 17 && seen[..16] == want[..] && seen[16] == "x15",
        "16 disks (vda..vdp, vdp's serial x15) expected, the guest listed {many:?}: {console}"
    );
    ensure!(
        get("KILN-ROOT-UNCHANGED") == Some("yes"),
        "the root image changed: {console}"
    );
    Ok(())
}
