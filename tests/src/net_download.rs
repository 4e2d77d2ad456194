//! The host-to-guest download over a TAP that `net_` tests and the `net` bench share: in the
//! test bed, `kiln net setup` a TAP, serve a file of random bytes with busybox `httpd` on the
//! TAP's address, boot a VM with `--net`, and have the guest `wget` the file N times.
//!
//! Addresses: the TAP is [`HOST_IP`], the guest [`GUEST_IP`], a /24 that exists only
//! inside the test bed (which has no other network device).

use crate::shell::WAIT_AGENT;

/// The host's (test-bed host's) address on the TAP.
pub const HOST_IP: &str = "10.0.2.1";
/// The guest's address.
pub const GUEST_IP: &str = "10.0.2.2";
/// The TAP's name.
pub const TAP: &str = "kilntap0";

/// Runs `script` in a network namespace of its own: adds it to `files` as `net-test.sh`
/// and returns the script to run instead. The test bed has no network to disturb, but the
/// direct path runs on the machine itself, whose network a test must not touch (its TAPs,
/// addresses and HTTP server live and die in the namespace). A private mount namespace
/// with its own sysfs makes `/sys/class/net` show the new network namespace.
pub fn isolated(script: &str, files: &mut Vec<(String, Vec<u8>)>) -> String {
    files.push(("net-test.sh".to_string(), script.as_bytes().to_vec()));
    "exec unshare -m -n --propagation private \\\n  \
     sh -c 'mount -t sysfs sysfs /sys && exec sh \"$FILES/net-test.sh\"'\n"
        .to_string()
}

/// A test-bed script that downloads `mib` MiB `runs` times. It prints `NET-HOST-SHA=<sha>`
/// for the served file and one line per run: `NET-RUN <host µs> <guest start> <guest end>
/// <sha>` (host µs around `kiln exec`, guest times from /proc/uptime around `wget`, the
/// sha256 of what the guest received). It ends with the TAP torn down, or exits non-zero.
/// Needs `now_us` (the benches' clock prelude, or any shell function printing µs) and
/// `$FILES/agent.cpio` (the agent image).
pub fn script(mib: u64, runs: usize) -> String {
    format!(
        r#"set -e
"$KILN" net setup --tap {TAP} --host-ip {HOST_IP}/24
mkdir -p www
dd if=/dev/urandom of=www/blob bs=1048576 count={mib} 2>/dev/null
echo "NET-HOST-SHA=$(sha256sum www/blob | cut -d' ' -f1)"
httpd -f -p {HOST_IP}:8080 -h "$PWD/www" &
httpd=$!
V="$PWD/v.sock"
"$KILN" run --kernel "$GUEST_VMLINUX" --initrd "$FILES/agent.cpio" --vcpus 1 --memory 256 \
  --vsock "$V" --serial null --net tap={TAP},ip={GUEST_IP}/24,gw={HOST_IP} 2> run.err &
vm=$!
{WAIT_AGENT}
i=0
while [ $i -lt {runs} ]; do
  a=$(now_us)
  g=$("$KILN" exec --vsock "$V" -- sh -c \
    "read a _ < /proc/uptime; timeout 300 wget -q -O /tmp/blob http://{HOST_IP}:8080/blob || exit 1; \
     read b _ < /proc/uptime; echo \$a \$b \$(sha256sum /tmp/blob | cut -d' ' -f1); rm /tmp/blob")
  b=$(now_us)
  echo "NET-RUN $((b - a)) $g"
  i=$((i + 1))
done
kill -TERM $vm
rc=0; wait $vm || rc=$?
kill $httpd
[ $rc = 143 ] || {{ echo "kiln run ended with $rc"; cat run.err; exit 1; }}
"$KILN" net teardown --tap {TAP}
[ ! -e /sys/class/net/{TAP} ] || {{ echo "the TAP outlived teardown"; exit 1; }}
"#
    )
}

/// One `NET-RUN` line.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    /// Host µs around the `kiln exec` (download, exec set-up, the guest's sha256sum).
    pub host_us: f64,
    /// Guest seconds around `wget` alone (/proc/uptime, 10 ms resolution).
    pub guest_s: f64,
    /// sha256 of what the guest received.
    pub sha: String,
}

/// The served file's sha256 and the runs, from the script's output.
pub fn parse(console: &str) -> (Option<String>, Vec<Run>) {
    let host_sha = crate::output::value(console, "NET-HOST-SHA").map(String::from);
    let runs = console
        .lines()
        .filter_map(|l| {
            let mut w = l.trim().strip_prefix("NET-RUN ")?.split_whitespace();
            let host_us = w.next()?.parse().ok()?;
            let a: f64 = w.next()?.parse().ok()?;
            let b: f64 = w.next()?.parse().ok()?;
            Some(Run {
                host_us,
                guest_s: b - a,
                sha: w.next()?.to_string(),
            })
        })
        .collect();
    (host_sha, runs)
}
