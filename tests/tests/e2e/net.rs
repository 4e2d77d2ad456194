//! Networking end to end: a guest on a TAP that `kiln net setup` made downloads from an
//! HTTP server on the host, byte-exact. Runs in the nested test bed (or directly on
//! hardware virtualization); all addresses are inside it.

use std::time::Duration;

use anyhow::{ensure, Result};
use kiln_tests::guest_initramfs::GuestInitramfs;
use kiln_tests::net_download;
use kiln_tests::Runner;

/// The test-bed host's clock in µs (its /proc/uptime; 10 ms is plenty for a bound).
const NOW_US: &str = r#"now_us() { read -r up _ < /proc/uptime; frac=${up#*.}; echo $((${up%.*} * 1000000 + 1$frac * 10000 - 1000000)); }
"#;

#[test]
fn net_guest_downloads_from_host_over_tap() -> Result<()> {
    let runner = Runner::detect()?;
    let script = format!("{NOW_US}{}", net_download::script(20, 1));
    let mut files = vec![("agent.cpio".to_string(), GuestInitramfs::new().build()?)];
    let script = net_download::isolated(&script, &mut files);
    let out = runner.run(&script, &files, Duration::from_secs(900))?;
    ensure!(out.exit_code == 0, "script failed:\n{}", out.console);
    let (host_sha, runs) = net_download::parse(&out.console);
    let host_sha = host_sha.ok_or_else(|| anyhow::anyhow!("no host sha:\n{}", out.console))?;
    ensure!(runs.len() == 1, "expected one download:\n{}", out.console);
    ensure!(
        runs[0].sha == host_sha,
        "the guest received other bytes ({} != {host_sha}):\n{}",
        runs[0].sha,
        out.console
    );
    eprintln!(
        "20 MiB in {:.2} s guest time ({:.1} MiB/s), {:.2} s around kiln exec",
        runs[0].guest_s,
        20.0 / runs[0].guest_s.max(0.01),
        runs[0].host_us / 1e6
    );
    Ok(())
}

/// The first half of the clone tests: a VM on the TAP `kilnorig` fetches a file from the
/// host (`KILN-ORIG-GET`), prints its MAC (`KILN-ORIG-MAC`, also in `$orig_mac`), is
/// snapshotted into `$PWD/snap` and stopped; the TAP is torn down. Defines `serve` (httpd
/// on the host address, pid in `$httpd`), `get SOCK` (the guest fetches the file and prints
/// it) and `new_mac SOCK` (waits, bounded, until the guest's eth0 has left `$orig_mac`: the
/// change comes from the restore's refresh, after the agent first answers, and prints it).
fn original_and_snapshot() -> String {
    use kiln_tests::net_download::{GUEST_IP, HOST_IP};
    format!(
        r#"{prelude}
set -e
mkdir -p www; echo kiln-net-ping > www/ping
serve() {{ httpd -f -p {HOST_IP}:8080 -h "$PWD/www" & httpd=$!; }}
get() {{ "$KILN" exec --vsock "$1" -- sh -c "timeout 60 wget -q -O /tmp/ping http://{HOST_IP}:8080/ping; cat /tmp/ping"; }}
new_mac() {{
  i=0
  while [ $i -lt 300 ]; do
    mac=$("$KILN" exec --vsock "$1" -- cat /sys/class/net/eth0/address)
    [ "$mac" != "$orig_mac" ] && break
    i=$((i + 1)); sleep 0.1
  done
  echo "$mac"
}}
"$KILN" net setup --tap kilnorig --host-ip {HOST_IP}/24
serve
"$KILN" run --kernel "$GUEST_VMLINUX" --initrd "$FILES/agent.cpio" --memory 256 --serial null \
  --vsock "$PWD/v.sock" --api "$PWD/api.sock" --net tap=kilnorig,ip={GUEST_IP}/24,gw={HOST_IP} 2> run.err &
vm=$!
echo "KILN-READY=$(wait_exec "$PWD/v.sock" $vm)"
echo "KILN-ORIG-GET=$(get "$PWD/v.sock")"
orig_mac=$("$KILN" exec --vsock "$PWD/v.sock" -- cat /sys/class/net/eth0/address)
echo "KILN-ORIG-MAC=$orig_mac"
"$KILN" ctl --api "$PWD/api.sock" snapshot --dir "$PWD/snap" --no-resume > /dev/null
"$KILN" ctl --api "$PWD/api.sock" shutdown > /dev/null
wait $vm || true
kill $httpd; wait $httpd || true
"$KILN" net teardown --tap kilnorig
"#,
        prelude = kiln_tests::shell::PRELUDE
    )
}

/// Runs `original_and_snapshot` then `rest` (with `extra` files beside the agent image);
/// checks the original's part.
fn run_clone_script(rest: &str, extra: &[(String, Vec<u8>)], timeout: Duration) -> Result<String> {
    use kiln_tests::output::value;
    let runner = Runner::detect()?;
    let script = format!("{}{rest}", original_and_snapshot());
    let mut files = vec![("agent.cpio".to_string(), GuestInitramfs::new().build()?)];
    files.extend_from_slice(extra);
    let script = net_download::isolated(&script, &mut files);
    let out = runner.run(&script, &files, timeout)?;
    let c = out.console;
    ensure!(out.exit_code == 0, "script failed:\n{c}");
    ensure!(value(&c, "KILN-READY") == Some("yes"), "{c}");
    ensure!(value(&c, "KILN-ORIG-GET") == Some("kiln-net-ping"), "{c}");
    ensure!(value(&c, "KILN-ORIG-MAC").is_some(), "{c}");
    Ok(c)
}

/// A clone restored from a snapshot of a VM on one TAP comes up on its own TAP with its own
/// MAC: the guest's eth0 takes the new address (the host tells the agent) and the clone
/// reaches the host through the new TAP, which knows it by the new MAC.
#[test]
fn net_clone_gets_its_own_tap_and_mac() -> Result<()> {
    use kiln_tests::net_download::{GUEST_IP, HOST_IP};
    use kiln_tests::output::value;
    let rest = format!(
        r#"
"$KILN" net setup --tap kilnclone --host-ip {HOST_IP}/24
serve
"$KILN" restore --snapshot "$PWD/snap" --vsock "$PWD/c.sock" --api "$PWD/capi.sock" \
  --serial null --net tap=kilnclone 2> restore.err &
clone=$!
echo "KILN-CLONE-READY=$(wait_exec "$PWD/c.sock" $clone)"
echo "KILN-CLONE-MAC=$(new_mac "$PWD/c.sock")"
echo "KILN-CLONE-GET=$(get "$PWD/c.sock")"
echo "KILN-HOST-NEIGH=$(awk '$1 == "{GUEST_IP}" {{ print $4 "@" $6 }}' /proc/net/arp)"
"$KILN" ctl --api "$PWD/capi.sock" shutdown > /dev/null
wait $clone || true
kill $httpd
"$KILN" net teardown --tap kilnclone
"#
    );
    let c = run_clone_script(&rest, &[], Duration::from_secs(600))?;
    ensure!(value(&c, "KILN-CLONE-READY") == Some("yes"), "{c}");
    let (orig, clone) = (value(&c, "KILN-ORIG-MAC"), value(&c, "KILN-CLONE-MAC"));
    ensure!(
        clone.is_some() && orig != clone,
        "MACs {orig:?} {clone:?}:\n{c}"
    );
    ensure!(value(&c, "KILN-CLONE-GET") == Some("kiln-net-ping"), "{c}");
    let neigh = format!("{}@kilnclone", clone.unwrap_or_default());
    ensure!(
        value(&c, "KILN-HOST-NEIGH") == Some(neigh.as_str()),
        "the host should know the clone by its new MAC on the new TAP ({neigh}):\n{c}"
    );
    Ok(())
}

/// `kiln fork --net-tap kf{i}`: each clone is attached to its own TAP (the TAP has carrier
/// while a queue is attached) and its eth0 has its own new MAC.
#[test]
fn net_fork_clones_each_get_their_own_tap_and_mac() -> Result<()> {
    use kiln_tests::output::value;
    let rest = r#"
"$KILN" net setup --tap kf0 --host-ip 10.0.3.1/24
"$KILN" net setup --tap kf1 --host-ip 10.0.4.1/24
echo "KILN-CARRIER-BEFORE=$(cat /sys/class/net/kf0/carrier)$(cat /sys/class/net/kf1/carrier)"
"$KILN" fork --snapshot "$PWD/snap" --count 2 --vsock-prefix "$PWD/f" --api-prefix "$PWD/fa" \
  --net-tap 'kf{i}' > fork.out 2> fork.err &
fork=$!
for i in 0 1; do
  # The socket exists once kiln fork has started the clone (bounded wait).
  n=0; while [ ! -S "$PWD/f-$i" ] && [ $n -lt 600 ] && kill -0 $fork 2>/dev/null; do n=$((n + 1)); sleep 0.1; done
  echo "KILN-FORK-READY-$i=$(wait_exec "$PWD/f-$i" $fork)"
  echo "KILN-FORK-MAC-$i=$(new_mac "$PWD/f-$i")"
done
echo "KILN-CARRIER=$(cat /sys/class/net/kf0/carrier)$(cat /sys/class/net/kf1/carrier)"
for i in 0 1; do "$KILN" ctl --api "$PWD/fa-$i" shutdown > /dev/null; done
wait $fork || { echo "kiln fork failed"; cat fork.err; exit 1; }
kill $httpd || true
"$KILN" net teardown --tap kf0
"$KILN" net teardown --tap kf1
"#;
    let c = run_clone_script(rest, &[], Duration::from_secs(600))?;
    let orig = value(&c, "KILN-ORIG-MAC");
    let macs = [value(&c, "KILN-FORK-MAC-0"), value(&c, "KILN-FORK-MAC-1")];
    for i in 0..2 {
        ensure!(
            value(&c, &format!("KILN-FORK-READY-{i}")) == Some("yes"),
            "{c}"
        );
    }
    ensure!(
        macs[0].is_some() && macs[0] != macs[1] && !macs.contains(&orig),
        "MACs: original {orig:?}, clones {macs:?}:\n{c}"
    );
    ensure!(value(&c, "KILN-CARRIER-BEFORE") == Some("00"), "{c}");
    ensure!(
        value(&c, "KILN-CARRIER") == Some("11"),
        "each TAP has its clone:\n{c}"
    );
    Ok(())
}

/// `kiln net setup --nat` on a host with neither nft nor iptables (a PATH without them)
/// fails with one clear line and leaves no TAP behind; without `--nat` the same TAP is made
/// and torn down. (The policy that `--nat` installs is tested in `net_policy.rs`.)
#[test]
fn net_setup_nat_without_a_firewall_tool_is_refused() -> Result<()> {
    use kiln_tests::output::value;
    let runner = Runner::detect()?;
    let script = r#"
if PATH=/nonexistent "$KILN" net setup --tap knat --host-ip 10.0.5.1/24 --nat 2> nat.err; then
  echo "KILN-NAT=made"
else
  echo "KILN-NAT-RC=$?"; echo "KILN-NAT=$(cat nat.err)"
fi
[ -e /sys/class/net/knat ] && echo "KILN-NAT-TAP=left" || echo "KILN-NAT-TAP=none"
"$KILN" net setup --tap knat --host-ip 10.0.5.1/24
echo "KILN-PLAIN-TAP=$(cat /sys/class/net/knat/operstate)"
"$KILN" net teardown --tap knat
[ -e /sys/class/net/knat ] && echo "KILN-AFTER=left" || echo "KILN-AFTER=none"
"#;
    let mut files = Vec::new();
    let script = net_download::isolated(script, &mut files);
    let out = runner.run(&script, &files, Duration::from_secs(300))?;
    let c = &out.console;
    ensure!(out.exit_code == 0, "{c}");
    ensure!(
        value(c, "KILN-NAT") != Some("made"),
        "--nat went through without nft or iptables in PATH:\n{c}"
    );
    ensure!(value(c, "KILN-NAT-RC") == Some("1"), "{c}");
    let line = value(c, "KILN-NAT").unwrap_or_default();
    ensure!(line.contains("needs nft or iptables"), "{c}");
    ensure!(value(c, "KILN-NAT-TAP") == Some("none"), "{c}");
    ensure!(
        matches!(value(c, "KILN-PLAIN-TAP"), Some("up" | "unknown" | "down")),
        "{c}"
    );
    ensure!(value(c, "KILN-AFTER") == Some("none"), "{c}");
    Ok(())
}

/// `kiln job --net …,dns=…`: the job's first line can use the network (the agent configured
/// eth0 before boot done), and /etc/resolv.conf names the DNS server given.
#[test]
fn net_job_uses_the_network_from_its_first_line() -> Result<()> {
    use kiln_tests::net_download::{GUEST_IP, HOST_IP};
    use kiln_tests::output::value;
    let runner = Runner::detect()?;
    let script = format!(
        r#"
mkdir -p www; echo kiln-net-job > www/ping
"$KILN" net setup --tap kilnjob --host-ip {HOST_IP}/24
httpd -f -p {HOST_IP}:8080 -h "$PWD/www" &
httpd=$!
"$KILN" job --kernel "$GUEST_VMLINUX" --initrd "$FILES/agent.cpio" --memory 256 --boot-timeout 60 \
  --net tap=kilnjob,ip={GUEST_IP}/24,gw={HOST_IP},dns={HOST_IP} --script "$FILES/job.sh"
echo "KILN-JOB-EXIT=$?"
kill $httpd
"$KILN" net teardown --tap kilnjob
"#
    );
    let job = format!(
        "echo \"KILN-GET=$(timeout 60 wget -q -O - http://{HOST_IP}:8080/ping)\"\n\
         echo \"KILN-RESOLV=$(cat /etc/resolv.conf)\"\n\
         echo \"KILN-ROUTE=$(awk '$2 == \"00000000\" {{ print $1 }}' /proc/net/route)\"\n"
    );
    let mut files = vec![
        ("agent.cpio".to_string(), GuestInitramfs::new().build()?),
        ("job.sh".to_string(), job.into_bytes()),
    ];
    let script = net_download::isolated(&script, &mut files);
    let out = runner.run(&script, &files, Duration::from_secs(300))?;
    let c = &out.console;
    ensure!(
        out.exit_code == 0 && value(c, "KILN-JOB-EXIT") == Some("0"),
        "{c}"
    );
    ensure!(value(c, "KILN-GET") == Some("kiln-net-job"), "{c}");
    ensure!(
        value(c, "KILN-RESOLV") == Some(format!("nameserver {HOST_IP}").as_str()),
        "{c}"
    );
    ensure!(
        value(c, "KILN-ROUTE") == Some("eth0"),
        "the default route: {c}"
    );
    Ok(())
}

/// `kiln job --from-snapshot … --net tap=…`: the job starts in a clone on its own TAP whose
/// eth0 already has its new MAC, and reaches the host through that TAP.
#[test]
fn net_job_from_snapshot_runs_on_its_own_tap() -> Result<()> {
    use kiln_tests::net_download::HOST_IP;
    use kiln_tests::output::value;
    let rest = format!(
        r#"
"$KILN" net setup --tap kilnjobc --host-ip {HOST_IP}/24
serve
"$KILN" job --from-snapshot "$PWD/snap" --net tap=kilnjobc --boot-timeout 60 --script "$FILES/job.sh"
echo "KILN-JOB-EXIT=$?"
kill $httpd
"$KILN" net teardown --tap kilnjobc
"#
    );
    let job = format!(
        "echo \"KILN-JOB-MAC=$(cat /sys/class/net/eth0/address)\"\n\
         echo \"KILN-JOB-GET=$(timeout 60 wget -q -O - http://{HOST_IP}:8080/ping)\"\n"
    );
    let c = run_clone_script(
        &rest,
        &[("job.sh".to_string(), job.into_bytes())],
        Duration::from_secs(600),
    )?;
    ensure!(value(&c, "KILN-JOB-EXIT") == Some("0"), "{c}");
    let (orig, mac) = (value(&c, "KILN-ORIG-MAC"), value(&c, "KILN-JOB-MAC"));
    ensure!(mac.is_some() && mac != orig, "MACs {orig:?} {mac:?}:\n{c}");
    ensure!(value(&c, "KILN-JOB-GET") == Some("kiln-net-ping"), "{c}");
    Ok(())
}
