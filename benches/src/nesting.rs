//! `nesting_create_boot` and `nesting_create_restore`: the nesting server's Create, from
//! the call to its answer (the VM's sshd sending its banner, the login set), over the
//! server's socket as GitLab Runner makes it. One server boots every VM
//! (`warm_snapshots = false`); another restores clones of its warm snapshot, made by a
//! first, untimed Create. Each VM is Deleted (untimed) before the next Create, so no stomp
//! is timed.

use std::time::Duration;

use anyhow::{bail, Result};
use kiln_tests::Runner;
use serde_json::{Map, Value};

use crate::stats;
use crate::vsock::{run_script, CLOCK_SH};

pub fn run(runner: &Runner, runs: usize) -> Result<Vec<Value>> {
    let bins = kiln_tests::artifacts::static_binaries()?;
    let image = kiln_tests::images::nesting_ssh(&bins)?;
    let script = format!(
        r#"{CLOCK_SH}
[ -e /sys/fs/cgroup/cgroup.controllers ] || mount -t cgroup2 none /sys/fs/cgroup
NS=$PWD/ns
mkdir -p "$NS"
cp -a "$FILES/store" "$NS/store"
call() {{ s=$1; shift; "$KILN_GITLAB" nesting call --socket "$NS/$s.sock" "$@"; }}
# bench NAME WARM TIMED: a server, one untimed Create if warm, then TIMED timed Creates.
bench() {{
  cat > "$NS/$1.toml" <<EOF
kiln = "$KILN"
state_dir = "$NS/$1-state"
snapshot_dir = "$NS/$1-warm"
warm_snapshots = $2
image_store = "$NS/store"
image_kernel = "$GUEST_VMLINUX"
nat = false
slots = 1
memory_mib = 256
ssh_password = "bench"
boot_timeout_secs = 600
EOF
  "$KILN_GITLAB" nesting serve --socket "$NS/$1.sock" --config "$NS/$1.toml" 2> "$NS/$1.log" &
  server=$!
  n=0
  while ! grep -q '^nesting: serving on' "$NS/$1.log" && [ $n -lt 300 ]; do sleep 0.1; n=$((n + 1)); done
  call "$1" init null > /dev/null || exit 1
  i=0
  while [ $i -lt $3 ]; do
    t0=$(now_us)
    out=$(call "$1" create {image} --slot 0) || {{ echo "$out"; cat "$NS/$1.log"; exit 1; }}
    t1=$(now_us)
    echo "BENCH-NESTING $1 $i $((t1 - t0))"
    id=$(echo "$out" | sed -n 's/.*"id":"\([^"]*\)".*/\1/p')
    call "$1" delete "$id" > /dev/null || exit 1
    i=$((i + 1))
  done
  kill -TERM $server; wait $server
}}
bench boot false {runs}
bench restore true $(({runs} + 1))
"#,
        image = image.name
    );
    let files = image.files("store")?;
    let runner = match runner.clone() {
        Runner::Testbed(mut t) => {
            t.memory_mib = t.memory_mib.max(3072);
            Runner::Testbed(t)
        }
        direct => direct,
    };
    let timeout = Duration::from_secs(300 + 400 * runs as u64);
    let (out, clock) = run_script(&runner, "nesting", &script, &files, timeout)?;
    let times = |name: &str, skip: usize| -> Vec<f64> {
        out.console
            .lines()
            .filter_map(|l| l.trim().strip_prefix("BENCH-NESTING "))
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                (f.next()? == name).then_some(())?;
                let i: usize = f.next()?.parse().ok()?;
                let us: f64 = f.next()?.parse().ok()?;
                (i >= skip).then_some(us / 1000.0)
            })
            .collect()
    };
    let boot = times("boot", 0);
    let first = times("restore", 0).first().copied();
    let restore = times("restore", 1);
    if boot.len() != runs || restore.len() != runs {
        bail!(
            "expected {runs} Creates of each kind, got {} and {}:\n{}",
            boot.len(),
            restore.len(),
            out.console
        );
    }
    let guest = "Debian bookworm store image (bash, openssh-server, passwd), 1 vCPU, 256 MiB";
    let mut e = Map::new();
    e.insert(
        "what".into(),
        "nesting Create of a booted VM, call to answer (sshd banner, login set)".into(),
    );
    e.insert("guest".into(), guest.into());
    e.insert("clock".into(), clock.clone().into());
    let boot_result = stats::result("nesting_create_boot", runner.path_name(), "ms", &boot, e);
    let mut e = Map::new();
    e.insert(
        "what".into(),
        "nesting Create restoring a clone of the slot's warm snapshot, call to answer".into(),
    );
    e.insert("guest".into(), guest.into());
    e.insert("clock".into(), clock.into());
    e.insert("first_create_ms".into(), first.into());
    let (boot_median, restore_median) = (stats::summary(&boot).0, stats::summary(&restore).0);
    e.insert("boot_ratio".into(), (restore_median / boot_median).into());
    let restore_result = stats::result(
        "nesting_create_restore",
        runner.path_name(),
        "ms",
        &restore,
        e,
    );
    Ok(vec![boot_result, restore_result])
}
