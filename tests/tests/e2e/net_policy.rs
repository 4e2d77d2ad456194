//! The guest network policy of `kiln net setup --nat`, with a real guest kernel: a guest
//! behind the NAT reaches a server beyond it and its own TAP's host address, and nothing
//! else the host could route it to — not the host's other addresses, not a second guest or
//! that guest's TAP, not the metadata address 169.254.169.254.
//!
//! Every target is a live server that the test-bed host itself reaches (checked first), so
//! that only the policy stands between the guest and it. "The outside" is a network
//! namespace the script makes beyond a veth pair: a public-style address (198.51.100.2,
//! TEST-NET-2, outside the policy's private ranges) and a fake metadata service on
//! 169.254.169.254, both served by one busybox httpd there.

use std::time::Duration;

use anyhow::{ensure, Result};
use kiln_tests::guest_initramfs::GuestInitramfs;
use kiln_tests::net_download;
use kiln_tests::output::value;
use kiln_tests::Runner;

/// The test-bed script. Guest 0 is on TAP kpol0 (10.0.6.0/24), guest 1 on kpol1
/// (10.0.7.0/24), both set up with `--nat`. Prints `KILN-HOST-<target>=` (what the host
/// fetched), `KILN-GUEST-<target>=` (what guest 0 fetched; `none` when nothing came back),
/// `KILN-TABLES=` (nft tables while set up) and `KILN-AFTER=` (after teardown).
const SCRIPT: &str = r#"
set -e
command -v nft > /dev/null || { echo "KILN-ERROR=no nft in the test bed: install nftables on the machine that builds it (cargo xtask setup does)"; exit 1; }
mkdir -p host outside
echo kiln-host > host/id
echo kiln-outside > outside/id
# `timeout`, not wget's -T: Debian's static busybox wget crashes with -T.
fetch() { r=$(timeout 10 wget -q -O - "http://$1:8080/id" 2> /dev/null || true); echo "${r:-none}"; }
ip link set lo up

# The outside: a namespace held by a sleeping process, reached through the veth kout.
unshare -n sleep 1000 &
out=$!
n=0
until ns=$(readlink /proc/$out/ns/net) && [ "$ns" != "$(readlink /proc/$$/ns/net)" ]; do
  n=$((n + 1)); [ $n -lt 100 ] || { echo "KILN-ERROR=the outside namespace never appeared"; exit 1; }
  sleep 0.1
done
outside() { nsenter -t $out -n "$@"; }
# busybox ip names the peer itself (veth0); made in the fresh namespace, the name is free.
outside ip link add kout type veth
outside ip link set kout netns $$
outside ip addr add 198.51.100.2/24 dev veth0
outside ip addr add 169.254.169.254/32 dev lo
outside ip link set lo up
outside ip link set veth0 up
ip addr add 198.51.100.1/24 dev kout
ip link set kout up
ip route add 169.254.169.254/32 via 198.51.100.2
nsenter -t $out -n httpd -f -p 8080 -h "$PWD/outside" &
outside_httpd=$!
# The host's server, on every host address (the TAPs' and kout's).
httpd -f -p 8080 -h "$PWD/host" &
host_httpd=$!

"$KILN" net setup --tap kpol0 --host-ip 10.0.6.1/24 --nat
"$KILN" net setup --tap kpol1 --host-ip 10.0.7.1/24 --nat
echo "KILN-TABLES=$(nft list tables | tr '\n' ' ')"
"$KILN" run --kernel "$GUEST_VMLINUX" --initrd "$FILES/agent.cpio" --vcpus 1 --memory 256 --serial null \
  --vsock "$PWD/v0.sock" --net tap=kpol0,ip=10.0.6.2/24,gw=10.0.6.1 2> run0.err &
vm0=$!
"$KILN" run --kernel "$GUEST_VMLINUX" --initrd "$FILES/agent.cpio" --vcpus 1 --memory 256 --serial null \
  --vsock "$PWD/v1.sock" --net tap=kpol1,ip=10.0.7.2/24,gw=10.0.7.1 2> run1.err &
vm1=$!
[ "$(wait_exec "$PWD/v0.sock" $vm0)" = yes ] || { echo "KILN-ERROR=guest 0 never answered"; cat run0.err; exit 1; }
[ "$(wait_exec "$PWD/v1.sock" $vm1)" = yes ] || { echo "KILN-ERROR=guest 1 never answered"; cat run1.err; exit 1; }

# Guest 1 serves for as long as this exec runs.
"$KILN" exec --vsock "$PWD/v1.sock" -- sh -c \
  'mkdir -p /tmp/w && echo kiln-guest1 > /tmp/w/id && exec httpd -f -p 8080 -h /tmp/w' &
guest1_httpd=$!
n=0
until [ "$(fetch 10.0.7.2)" = kiln-guest1 ]; do
  n=$((n + 1)); [ $n -lt 100 ] || break
  sleep 0.1
done

# Every target is live from the host.
echo "KILN-HOST-OUTSIDE=$(fetch 198.51.100.2)"
echo "KILN-HOST-META=$(fetch 169.254.169.254)"
echo "KILN-HOST-GUEST1=$(fetch 10.0.7.2)"

# Guest 0 tries them all at once (a dropped connection costs the wget's timeout).
"$KILN" exec --vsock "$PWD/v0.sock" -- sh -c '
get() { r=$(timeout 8 wget -q -O - "http://$2:8080/id" 2> /dev/null); echo "KILN-GUEST-$1=${r:-none}"; }
get OUTSIDE 198.51.100.2 &
get OWN-HOST 10.0.6.1 &
get HOST-OTHER 198.51.100.1 &
get TAP1-HOST 10.0.7.1 &
get GUEST1 10.0.7.2 &
get META 169.254.169.254 &
wait'

kill $guest1_httpd $vm0 $vm1 $outside_httpd $host_httpd $out 2> /dev/null || true
for p in $guest1_httpd $vm0 $vm1 $outside_httpd $host_httpd $out; do wait $p || true; done
"$KILN" net teardown --tap kpol1
"$KILN" net teardown --tap kpol0
echo "KILN-AFTER=$(nft list tables | tr '\n' ' ')"
"#;

#[test]
fn net_nat_policy_confines_a_real_guest() -> Result<()> {
    let runner = Runner::detect()?;
    let mut files = vec![("agent.cpio".to_string(), GuestInitramfs::new().build()?)];
    let script = format!("{}{SCRIPT}", kiln_tests::shell::PRELUDE);
    let script = net_download::isolated(&script, &mut files);
    let out = runner.run(&script, &files, Duration::from_secs(600))?;
    let c = &out.console;
    ensure!(out.exit_code == 0, "script failed:\n{c}");
    let is = |key: &str, want: &str| value(c, key) == Some(want);

    // The targets are live: only the policy keeps the guest from them.
    ensure!(
        is("KILN-HOST-OUTSIDE", "kiln-outside"),
        "outside server:\n{c}"
    );
    ensure!(is("KILN-HOST-META", "kiln-outside"), "fake metadata:\n{c}");
    ensure!(
        is("KILN-HOST-GUEST1", "kiln-guest1"),
        "guest 1's server:\n{c}"
    );
    let tables = value(c, "KILN-TABLES").unwrap_or_default();
    ensure!(
        tables.contains("table ip kiln_kpol0") && tables.contains("table ip kiln_kpol1"),
        "each TAP has its policy table:\n{c}"
    );

    // What the guest may reach.
    ensure!(
        is("KILN-GUEST-OUTSIDE", "kiln-outside"),
        "the guest should reach the server beyond the NAT:\n{c}"
    );
    ensure!(
        is("KILN-GUEST-OWN-HOST", "kiln-host"),
        "the guest should reach its TAP's host address:\n{c}"
    );
    // What it may not.
    for (target, what) in [
        ("HOST-OTHER", "the host's other address 198.51.100.1"),
        ("TAP1-HOST", "the other TAP's host address 10.0.7.1"),
        ("GUEST1", "the other guest 10.0.7.2"),
        ("META", "the metadata address 169.254.169.254"),
    ] {
        let got = value(c, &format!("KILN-GUEST-{target}"));
        ensure!(
            got == Some("none"),
            "the guest reached {what} (got {got:?}):\n{c}"
        );
    }

    ensure!(
        !value(c, "KILN-AFTER").unwrap_or_default().contains("kiln_"),
        "teardown should remove the policy tables:\n{c}"
    );
    Ok(())
}
