//! The jailer in the test bed: a jailed VM boots the agent guest
//! and runs commands; from the host's /proc, its VMM runs as the unprivileged ids with no
//! capabilities, in namespaces of its own, with a root that holds only its own files; a
//! jailed `kiln job` runs a script; the jail directories are gone afterwards.

use std::time::Duration;

use anyhow::{ensure, Result};
use kiln_tests::guest_initramfs::GuestInitramfs;
use kiln_tests::output::value;
use kiln_tests::{shell, Runner};

const TIMEOUT: Duration = Duration::from_secs(500);

#[test]
fn jail_vm_runs_jobs_unprivileged_and_sees_only_its_files() -> Result<()> {
    let runner = Runner::detect()?;
    let script = shell::PRELUDE.to_string()
        + r#"
B=/tmp/jails
"$KILN" jail --id vm1 --uid 1000 --gid 1001 --base $B --file "$GUEST_VMLINUX" \
  --file "$FILES/agent.cpio" -- run --kernel vmlinux --initrd agent.cpio --memory 256 \
  --vsock v.sock --serial null > vm1.out 2> vm1.err &
j=$!
S=$B/vm1/root/v.sock
echo "KILN-READY=$(wait_exec $S $j)"
echo "KILN-ECHO=$("$KILN" exec --vsock $S -- echo hi)"
pid=$(sed -n 's/.*runs as pid \([0-9]*\).*/\1/p' vm1.err)
echo "KILN-MAPPED=$(grep -c "vsock v.sock is $S on the host" vm1.err)"
st=/proc/$pid/status
echo "KILN-UID=$(awk '/^Uid:/ { print $2, $3, $4, $5 }' $st)"
echo "KILN-GID=$(awk '/^Gid:/ { print $2, $3, $4, $5 }' $st)"
for c in CapInh CapPrm CapEff CapBnd CapAmb NoNewPrivs Seccomp; do
  echo "KILN-$c=$(awk -v k=$c: '$1 == k { print $2 }' $st)"
done
echo "KILN-ROOT=$(ls /proc/$pid/root | tr '\n' ' ')"
echo "KILN-DEV=$(cd /proc/$pid/root/dev && find . | sort | tr '\n' ' ')"
for ns in mnt pid net uts ipc; do
  [ "$(readlink /proc/$pid/ns/$ns)" != "$(readlink /proc/self/ns/$ns)" ] && echo "KILN-OWN-NS-$ns=yes"
done
kill -TERM $j
wait $j
echo "KILN-VM1-EXIT=$?"
[ -e $B/vm1 ] || echo "KILN-VM1-DIR-GONE=yes"

printf 'echo job says hi\nexit 7\n' > job.sh
"$KILN" jail --id job2 --uid 1000 --gid 1000 --base $B --file "$GUEST_VMLINUX" \
  --file "$FILES/agent.cpio" --file job.sh -- job --kernel vmlinux --initrd agent.cpio \
  --memory 256 --script job.sh > job2.out 2> job2.err
echo "KILN-JOB-EXIT=$?"
echo "KILN-JOB-OUT=$(cat job2.out)"
[ -e $B/job2 ] || echo "KILN-JOB-DIR-GONE=yes"
echo "KILN-PROCESSES-LEFT=$(pidof kiln | wc -w)"
for f in vm1 job2; do echo "--- $f.err"; cat $f.err; done
"#;
    let files = vec![("agent.cpio".to_string(), GuestInitramfs::new().build()?)];
    let out = runner.run(&script, &files, TIMEOUT)?;
    let console = &out.console;
    eprintln!("{console}");
    let get = |key: &str| value(console, key);
    ensure!(get("KILN-READY") == Some("yes"), "jailed VM: {console}");
    ensure!(get("KILN-ECHO") == Some("hi"), "exec: {console}");
    ensure!(
        get("KILN-MAPPED") == Some("1"),
        "no path mapping line: {console}"
    );
    ensure!(
        get("KILN-UID") == Some("1000 1000 1000 1000"),
        "uid: {console}"
    );
    ensure!(
        get("KILN-GID") == Some("1001 1001 1001 1001"),
        "gid: {console}"
    );
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        ensure!(
            get(&format!("KILN-{caps}")) == Some("0000000000000000"),
            "{caps}: {console}"
        );
    }
    ensure!(
        get("KILN-NoNewPrivs") == Some("1"),
        "no_new_privs: {console}"
    );
    ensure!(get("KILN-Seccomp") == Some("2"), "seccomp: {console}");
    // The static kiln needs no libraries: the root is exactly the VM's files.
    ensure!(
        get("KILN-ROOT") == Some("agent.cpio dev kiln v.sock vmlinux"),
        "jail root: {console}"
    );
    let dev = get("KILN-DEV").unwrap_or("");
    ensure!(
        dev == ". ./kvm" || dev == ". ./kvm ./net ./net/tun",
        "jail /dev: {console}"
    );
    for ns in ["mnt", "pid", "net", "uts", "ipc"] {
        ensure!(
            get(&format!("KILN-OWN-NS-{ns}")) == Some("yes"),
            "{ns} namespace is the host's: {console}"
        );
    }
    ensure!(get("KILN-VM1-EXIT") == Some("143"), "SIGTERM: {console}");
    ensure!(
        get("KILN-VM1-DIR-GONE") == Some("yes"),
        "vm1 dir: {console}"
    );
    ensure!(get("KILN-JOB-EXIT") == Some("7"), "job exit: {console}");
    ensure!(
        get("KILN-JOB-OUT") == Some("job says hi"),
        "job output: {console}"
    );
    ensure!(
        get("KILN-JOB-DIR-GONE") == Some("yes"),
        "job2 dir: {console}"
    );
    ensure!(
        get("KILN-PROCESSES-LEFT") == Some("0"),
        "kiln left running: {console}"
    );
    Ok(())
}

/// A jailed VM on a host TAP: `kiln jail --tap` attaches to the
/// TAP that `kiln net setup` made and hands the VMM only that device. The guest downloads a
/// file from the host over it, byte-exact, while the VMM's network namespace has no
/// interface but its loopback. A TAP that does not exist is refused before the jail starts.
#[test]
fn jail_vm_reaches_the_host_over_a_tap_it_cannot_see() -> Result<()> {
    use kiln_tests::net_download::{GUEST_IP, HOST_IP, TAP};
    let runner = Runner::detect()?;
    let script = shell::PRELUDE.to_string()
        + &format!(
            r#"
B=/tmp/jails
"$KILN" net setup --tap {TAP} --host-ip {HOST_IP}/24
mkdir -p www
dd if=/dev/urandom of=www/blob bs=65536 count=16 2>/dev/null
echo "KILN-HOST-SHA=$(sha256sum www/blob | cut -d' ' -f1)"
httpd -f -p {HOST_IP}:8080 -h "$PWD/www" &
httpd=$!
"$KILN" jail --id netvm --uid 1000 --gid 1000 --base $B --tap {TAP} --file "$GUEST_VMLINUX" \
  --file "$FILES/agent.cpio" -- run --kernel vmlinux --initrd agent.cpio --memory 256 \
  --vsock v.sock --serial null --net tap={TAP},ip={GUEST_IP}/24,gw={HOST_IP} > vm.out 2> vm.err &
j=$!
S=$B/netvm/root/v.sock
echo "KILN-READY=$(wait_exec $S $j)"
echo "KILN-GUEST-SHA=$("$KILN" exec --vsock $S -- sh -c \
  'timeout 60 wget -q -O /tmp/blob http://{HOST_IP}:8080/blob && sha256sum /tmp/blob' | cut -d' ' -f1)"
pid=$(sed -n 's/.*runs as pid \([0-9]*\).*/\1/p' vm.err)
echo "KILN-VMM-NETDEVS=$(awk -F: 'NR > 2 {{ gsub(/ /, "", $1); print $1 }}' /proc/$pid/net/dev | tr '\n' ' ')"
echo "KILN-VMM-UID=$(awk '/^Uid:/ {{ print $2 }}' /proc/$pid/status)"
kill -TERM $j
wait $j
echo "KILN-VM-EXIT=$?"
kill $httpd
"$KILN" jail --id nonet --base $B --tap kiln-no-such --file "$GUEST_VMLINUX" -- run \
  --kernel vmlinux > bad.out 2> bad.err
echo "KILN-BAD-EXIT=$?"
echo "KILN-BAD-ERR=$(head -n 1 bad.err)"
[ -e $B/nonet ] || echo "KILN-BAD-DIR-GONE=yes"
"$KILN" net teardown --tap {TAP}
echo "--- vm.err"; cat vm.err
"#
        );
    let mut files = vec![("agent.cpio".to_string(), GuestInitramfs::new().build()?)];
    let script = kiln_tests::net_download::isolated(&script, &mut files);
    let out = runner.run(&script, &files, TIMEOUT)?;
    let console = &out.console;
    eprintln!("{console}");
    let get = |key: &str| value(console, key);
    ensure!(get("KILN-READY") == Some("yes"), "jailed VM: {console}");
    let host_sha = get("KILN-HOST-SHA").unwrap_or("");
    ensure!(
        host_sha.len() == 64 && get("KILN-GUEST-SHA") == Some(host_sha),
        "the guest did not get the host's file over the TAP: {console}"
    );
    // Every new network namespace has its loopback, and the fallback tunnel devices of
    // the tunnel drivers built in (sit0, …): none of them reaches anything.
    let fallback = ["lo", "sit0", "tunl0", "ip6tnl0", "gre0", "ip6gre0"];
    let netdevs: Vec<&str> = get("KILN-VMM-NETDEVS")
        .unwrap_or("")
        .split_whitespace()
        .collect();
    ensure!(
        netdevs.contains(&"lo") && netdevs.iter().all(|d| fallback.contains(d)),
        "the jailed VMM sees network devices {netdevs:?}: {console}"
    );
    ensure!(get("KILN-VMM-UID") == Some("1000"), "uid: {console}");
    ensure!(get("KILN-VM-EXIT") == Some("143"), "SIGTERM: {console}");
    ensure!(get("KILN-BAD-EXIT") == Some("1"), "missing TAP: {console}");
    let bad = get("KILN-BAD-ERR").unwrap_or("");
    ensure!(
        bad.contains("--tap") && bad.contains("kiln-no-such") && bad.contains("does not exist"),
        "missing TAP error: {console}"
    );
    ensure!(
        get("KILN-BAD-DIR-GONE") == Some("yes"),
        "a refused jail left its directory: {console}"
    );
    Ok(())
}
