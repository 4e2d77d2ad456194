//! `kiln-gitlab nesting serve` with its real backend, in the test bed, driven as GitLab
//! Runner drives it: every call goes over the server's Unix socket through the generated
//! gRPC client (`kiln-gitlab nesting call`), Init only after a call failed with exactly
//! `not initialized`, and the jobs' stages run through OpenSSH's `ssh` logging into the
//! VMs with the password from `nesting_config` (askpass, as the runner's connector does
//! with its `password`), never through the kiln agent. The first Create in a slot boots
//! and leaves a warm snapshot; the next one there restores a clone of it.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use kiln_tests::output::value;
use kiln_tests::Runner;
use serde_json::Value;

/// The runner's side, in shell. `rcall SOCK ARGS…` is one of the runner's calls: when it
/// fails with exactly FAILED_PRECONDITION `not initialized`, Init (the runner's
/// nesting_config as JSON; `already initialized` is fine) and the call once more. Each
/// Init is counted in `$NS/inits`. `sweep SOCK` is what the runner does when an instance
/// becomes ready: List, then Delete every VM listed; it prints the List.
const RUNNER: &str = r#"
NESTING_CONFIG='{"ssh_user":"ci","ssh_password":"s3cret"}'
rcall() {
  s=$1; shift
  out=$("$KILN_GITLAB" nesting call --socket "$s" "$@" 2>&1) && { echo "$out"; return 0; }
  case "$out" in
    *": FailedPrecondition: not initialized") ;;
    *) echo "$out"; return 1 ;;
  esac
  echo init >> "$NS/inits"
  i=$("$KILN_GITLAB" nesting call --socket "$s" init "$NESTING_CONFIG" 2>&1)
  case "$?$i" in 0*|*": FailedPrecondition: already initialized") ;; *) echo "$i"; return 1 ;; esac
  "$KILN_GITLAB" nesting call --socket "$s" "$@" 2>&1
}
ids() { tr '{' '\n' | sed -n 's/.*"id":"\([^"]*\)".*/\1/p'; }
sweep() {
  l=$(rcall "$1" list) || { echo "$l"; return 1; }
  for id in $(echo "$l" | ids); do rcall "$1" delete "$id" >/dev/null || echo "delete $id failed"; done
  echo "$l"
}
# A stage: `bash` with the script on stdin, over SSH as the runner's connector user with
# its password. `stage ADDR KNOWN_HOSTS < script`.
cat > "$NS/askpass" <<EOF
#!/bin/sh
echo s3cret
EOF
chmod 755 "$NS/askpass"
stage() {
  SSH_ASKPASS="$NS/askpass" SSH_ASKPASS_REQUIRE=force DISPLAY=none ssh -F /dev/null \
    -p "${1##*:}" -o StrictHostKeyChecking=accept-new -o UserKnownHostsFile="$2" \
    -o PubkeyAuthentication=no -o PreferredAuthentications=password \
    -o NumberOfPasswordPrompts=1 -o ConnectTimeout=60 -o LogLevel=ERROR \
    "ci@${1%:*}" bash
}
# A process that still runs (not gone, not a zombie).
alive() { [ -r /proc/$1/stat ] && ! grep -q ') [ZX] ' /proc/$1/stat; }
pid_of() { sed -n 's/.*"pid":\([0-9]*\).*/\1/p' "$NS/main-state/vms/$1.json"; }
"#;

const SCRIPT: &str = r#"
# kiln run --slot needs cgroup v2.
[ -e /sys/fs/cgroup/cgroup.controllers ] || mount -t cgroup2 none /sys/fs/cgroup
# ssh looks up the user it runs as.
mkdir -p /etc
grep -q '^root:' /etc/passwd 2>/dev/null || echo 'root:x:0:0:root:/root:/bin/sh' >> /etc/passwd
NS=$PWD/ns
mkdir -p "$NS"
cp -a "$FILES/store" "$NS/store"
RUNNER_FUNCTIONS
conf() {
  cat > "$NS/$1.toml" <<EOF
kiln = "$KILN"
state_dir = "$NS/$1-state"
snapshot_dir = "$NS/$1-warm"
image_store = "$NS/store"
image_kernel = "$GUEST_VMLINUX"
nat = false
slots = 2
$2
EOF
}
# serve NAME: starts the server NAME on $NS/NAME.sock and waits until it serves.
starts=0
serve() {
  starts=$((starts + 1))
  log="$NS/$1.$starts.log"
  "$KILN_GITLAB" nesting serve --socket "$NS/$1.sock" --config "$NS/$1.toml" 2> "$log" &
  SERVER=$!
  n=0
  while ! grep -q '^nesting: serving on' "$log" && kill -0 $SERVER 2>/dev/null && [ $n -lt 300 ]; do
    sleep 0.1; n=$((n + 1))
  done
}
conf main 'memory_mib = 256
boot_timeout_secs = 400'
M="$NS/main.sock"

serve main
echo "NS-SWEEP-1=$(sweep "$M")"
echo "NS-INITS-1=$(wc -l < "$NS/inits")"

# Two jobs start at once, in slots 0 and 1.
rcall "$M" create @IMAGE@ --slot 0 > "$NS/c0" 2>&1 & c0=$!
rcall "$M" create @IMAGE@ --slot 1 > "$NS/c1" 2>&1 & c1=$!
most=0
while kill -0 $c0 2>/dev/null && kill -0 $c1 2>/dev/null; do
  n=$(ls "$NS/main-state/vm" 2>/dev/null | wc -l)
  [ "$n" -gt "$most" ] && most=$n
  sleep 0.2
done
wait $c0; echo "NS-C0-RC=$?"
wait $c1; echo "NS-C1-RC=$?"
echo "NS-BOOTING-AT-ONCE=$most"
echo "NS-C0=$(cat "$NS/c0")"
echo "NS-C1=$(cat "$NS/c1")"
A=$(ids < "$NS/c0"); B=$(ids < "$NS/c1")
addr() { sed -n 's/.*"addr":"\([^"]*\)".*/\1/p' "$1"; }
AA=$(addr "$NS/c0"); BA=$(addr "$NS/c1")

# Stages of a job in slot 0: one that succeeds, one that fails.
printf 'echo "stage as $(id -un) in $HOME"\necho "to stderr" >&2\nls / >/dev/null\n' \
  | stage "$AA" "$NS/kh-a" > "$NS/s1.out" 2> "$NS/s1.err"
echo "NS-STAGE-OK-RC=$?"
echo "NS-STAGE-OK-OUT=$(tr '\n' '|' < "$NS/s1.out")"
echo "NS-STAGE-OK-ERR=$(tr '\n' '|' < "$NS/s1.err")"
printf 'set -eo pipefail\necho "before the failure"\n(exit 7)\necho "never printed"\n' \
  | stage "$AA" "$NS/kh-a" > "$NS/s2.out" 2> "$NS/s2.err"
echo "NS-STAGE-FAIL-RC=$?"
echo "NS-STAGE-FAIL-OUT=$(tr '\n' '|' < "$NS/s2.out")$(tr '\n' '|' < "$NS/s2.err")"
echo 'echo $((6 * 7))' | stage "$BA" "$NS/kh-b" > "$NS/s3.out" 2>&1
echo "NS-STAGE-B=$?:$(tr '\n' '|' < "$NS/s3.out")"
echo "NS-HOSTKEY-A=$(cut -d' ' -f2- "$NS/kh-a")"
echo "NS-HOSTKEY-B=$(cut -d' ' -f2- "$NS/kh-b")"

# The next job in slot 0 stomps the first VM.
pa=$(pid_of "$A")
echo "NS-A-PID-FOUND=$([ -n "$pa" ] && alive "$pa" && echo yes || echo no)"
echo "NS-C2=$(rcall "$M" create @IMAGE@ --slot 0)"
echo "NS-A-ALIVE=$(alive "$pa" && echo yes || echo no)"
echo "NS-A-LEFT=$(ls "$NS/main-state/vm/$A" "$NS/main-state/vms/$A.json" 2>/dev/null | wc -l)"
echo 'echo third' | stage "$AA" "$NS/kh-c" > "$NS/s4.out" 2>&1
echo "NS-STAGE-C=$?:$(tr '\n' '|' < "$NS/s4.out")"
echo "NS-HOSTKEY-C=$(cut -d' ' -f2- "$NS/kh-c")"
# The first Create in each slot left a warm snapshot; the third VM is a clone of slot 0's.
echo "NS-WARM-MADE=$(ls "$NS"/main-warm/*/slot-*/*/ready 2>/dev/null | wc -l)"
C=$(rcall "$M" list | ids | grep -v "^$B\$")
echo "NS-C-RESTORED=$(grep -c 'restore' /proc/$(pid_of "$C")/cmdline)"

# Bad input, each with its exact status.
echo "NS-BAD-IMAGE=$(rcall "$M" create nope --slot 0)"
echo "NS-BAD-SLOT-NEG=$(rcall "$M" create @IMAGE@ --slot=-1)"
echo "NS-BAD-SLOT-HIGH=$(rcall "$M" create @IMAGE@ --slot 2)"
echo "NS-BAD-DELETE=$(rcall "$M" delete no-such-vm)"

# The server is killed; meanwhile the VM in slot 1 dies too.
pb=$(pid_of "$B"); pc=$(pid_of "$C")
kill -9 $SERVER; wait $SERVER 2>/dev/null
kill -9 "$pb"
n=0; while alive "$pb" && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
echo "NS-KILLED=$(alive "$pb" && echo no || echo yes) $(alive "$pc" && echo live || echo gone)"
echo "NS-IDS=$A $B $C"
rm -f "$NS/inits"
serve main
echo "NS-B-LEFT=$(ls "$NS/main-state/vm/$B" "$NS/main-state/vms/$B.json" 2>/dev/null | wc -l)"
echo "NS-SWEEP-2=$(sweep "$M")"
echo "NS-INITS-2=$(wc -l < "$NS/inits")"
echo "NS-C-ALIVE=$(alive "$pc" && echo yes || echo no)"
echo "NS-LIST-END=$(rcall "$M" list)"
echo "NS-DELETE-DEAD=$(rcall "$M" delete "$B")"
# Shutdown destroys every VM and leaves nothing of them.
D=$(rcall "$M" create @IMAGE@ --slot 0 | ids)
pd=$(pid_of "$D")
echo "NS-D-UP=$([ -n "$pd" ] && alive "$pd" && echo yes || echo no)"
echo "NS-SHUTDOWN=$(rcall "$M" shutdown)"
echo "NS-SHUTDOWN-LEFT=$(alive "$pd" && echo running || echo gone) \
$(ls "$NS/main-state/vm" "$NS/main-state/vms" | grep -c kiln-)"
kill -TERM $SERVER; wait $SERVER
echo "NS-SERVER-STOPPED=$?"

# Not enough memory for the VM.
conf mem 'memory_mib = 1000000
warm_snapshots = false'
serve mem
echo "NS-BAD-MEMORY=$(rcall "$NS/mem.sock" create @IMAGE@ --slot 0)"
kill -TERM $SERVER; wait $SERVER

# A VM whose SSH port never answers (the host drops what it sends to port 22): destroyed
# once boot_timeout_secs has passed.
conf slow 'network = "10.214.0.0/16"
tap_prefix = "kslow"
memory_mib = 256
warm_snapshots = false
boot_timeout_secs = 30'
nft add table inet nsdrop
nft add chain inet nsdrop out '{ type filter hook output priority 0; }'
nft add rule inet nsdrop out ip daddr 10.214.0.2 tcp dport 22 drop
serve slow
# The server is killed in a Create whose VM has started: the next start destroys that VM.
rcall "$NS/slow.sock" create @IMAGE@ --slot 0 > "$NS/unfinished" 2>&1 & uc=$!
n=0
until ls "$NS"/slow-state/vm/*/vm.json > /dev/null 2>&1 || [ $n -ge 900 ]; do
  sleep 0.1; n=$((n + 1))
done
up=$(sed -n 's/.*"pid":\([0-9]*\).*/\1/p' "$NS"/slow-state/vm/*/vm.json)
echo "NS-UNFINISHED-UP=$([ -n "$up" ] && alive "$up" && echo yes || echo no)"
kill -9 $SERVER; wait $SERVER 2>/dev/null; wait $uc 2>/dev/null
serve slow
echo "NS-UNFINISHED-LEFT=$(alive "$up" && echo running || echo gone) \
$(ls "$NS/slow-state/vm" | wc -l)"
echo "NS-NO-SSH=$(rcall "$NS/slow.sock" create @IMAGE@ --slot 0)"
echo "NS-NO-SSH-LIST=$(rcall "$NS/slow.sock" list)"
echo "NS-NO-SSH-LEFT=$(ls "$NS/slow-state/vm" "$NS/slow-state/vms" | grep -c kiln-)"
kill -TERM $SERVER; wait $SERVER
nft delete table inet nsdrop

echo "NS-KILN-LEFT=$(ps | grep -c '[k]iln run')"
for f in "$NS"/*.log; do sed "s|^|$(basename "$f"): |" "$f"; done
"#;

#[test]
fn nesting_runner_contract_over_ssh_with_stomp_restart_and_bad_input() -> Result<()> {
    let bins = kiln_tests::artifacts::static_binaries()?;
    let image = kiln_tests::images::nesting_ssh(&bins)?;
    let script = format!(
        "{}{}",
        kiln_tests::shell::PRELUDE,
        SCRIPT
            .replace("RUNNER_FUNCTIONS", RUNNER)
            .replace("@IMAGE@", &image.name)
    );
    let files = image.files("store")?;
    let runner = match Runner::detect()? {
        Runner::Testbed(mut t) => {
            // Three VMs of 256 MiB at most at once, and two warm snapshots in the
            // test bed's tmpfs.
            t.memory_mib = t.memory_mib.max(3584);
            Runner::Testbed(t)
        }
        direct => direct,
    };
    let out = runner.run(&script, &files, Duration::from_secs(1500))?;
    let c = &out.console;
    eprintln!("{c}"); // shown with --nocapture
    let v = |key: &str| value(c, key).unwrap_or("<missing>");
    let json = |key: &str| -> Result<Value> {
        serde_json::from_str(v(key)).with_context(|| format!("{key} is not JSON: {c}"))
    };

    // Instance ready: the List fails with `not initialized`, the runner Inits once and
    // lists nothing.
    ensure!(v("NS-SWEEP-1") == "[]", "{c}");
    ensure!(v("NS-INITS-1") == "1", "{c}");

    // Two Creates at once, in parallel, each in its slot's address.
    ensure!(v("NS-C0-RC") == "0" && v("NS-C1-RC") == "0", "{c}");
    ensure!(
        v("NS-BOOTING-AT-ONCE") == "2",
        "the second Create did not start its VM while the first was running: {c}"
    );
    let (c0, c1) = (json("NS-C0")?, json("NS-C1")?);
    ensure!(
        c0["addr"] == "10.213.0.2:22" && c1["addr"] == "10.213.1.2:22",
        "{c}"
    );
    ensure!(
        c0["name"] == image.name.as_str() && c0["stomped"].is_null(),
        "{c}"
    );
    let (a, b) = (
        c0["id"].as_str().unwrap_or("?"),
        c1["id"].as_str().unwrap_or("?"),
    );

    // Stages over SSH with the password: output and exit status exact.
    ensure!(v("NS-STAGE-OK-RC") == "0", "{c}");
    ensure!(v("NS-STAGE-OK-OUT") == "stage as ci in /home/ci|", "{c}");
    ensure!(v("NS-STAGE-OK-ERR") == "to stderr|", "{c}");
    ensure!(v("NS-STAGE-FAIL-RC") == "7", "{c}");
    ensure!(v("NS-STAGE-FAIL-OUT") == "before the failure|", "{c}");
    ensure!(v("NS-STAGE-B") == "0:42|", "{c}");

    // Each VM its own host key.
    let keys = [v("NS-HOSTKEY-A"), v("NS-HOSTKEY-B"), v("NS-HOSTKEY-C")];
    for k in keys {
        ensure!(k.starts_with("ssh-ed25519 AAAA"), "no host key: {c}");
    }
    ensure!(
        keys[0] != keys[1] && keys[0] != keys[2] && keys[1] != keys[2],
        "VMs share a host key: {c}"
    );

    // The stomp: slot 0's next Create names the first VM, whose process is gone.
    ensure!(v("NS-A-PID-FOUND") == "yes", "{c}");
    let c2 = json("NS-C2")?;
    ensure!(c2["stomped"] == a, "the stomped VM is not the first: {c}");
    ensure!(c2["addr"] == "10.213.0.2:22", "{c}");
    ensure!(v("NS-A-ALIVE") == "no" && v("NS-A-LEFT") == "0", "{c}");
    ensure!(v("NS-STAGE-C") == "0:third|", "{c}");
    ensure!(v("NS-WARM-MADE") == "2", "no warm snapshot per slot: {c}");
    ensure!(
        v("NS-C-RESTORED") == "1",
        "the third VM was not restored from the warm snapshot: {c}"
    );
    let third = c2["id"].as_str().unwrap_or("?");

    // Bad input.
    let err = "kiln-gitlab nesting call: ";
    ensure!(
        v("NS-BAD-IMAGE")
            == format!(
                "{err}NotFound: no image \"nope\"; the images there are: {}",
                image.name
            ),
        "{c}"
    );
    let slot_err = |s: i32| {
        format!(
            "{err}InvalidArgument: slot {s} is out of range: this server has slots 0 to 1 \
             (its `slots` setting; the runner's capacity_per_instance must not be larger)"
        )
    };
    ensure!(v("NS-BAD-SLOT-NEG") == slot_err(-1), "{c}");
    ensure!(v("NS-BAD-SLOT-HIGH") == slot_err(2), "{c}");
    ensure!(
        v("NS-BAD-DELETE") == format!("{err}NotFound: no VM with id \"no-such-vm\""),
        "{c}"
    );
    let mem = v("NS-BAD-MEMORY");
    ensure!(
        mem.starts_with(&format!(
            "{err}ResourceExhausted: not enough memory for a VM of 1000000 MiB (+64 MiB for \
             its VMM): "
        )) && mem.ends_with(" MiB available"),
        "{c}"
    );

    // Killed server, dead VM: the restarted server lists the live VM only, the runner's
    // sweep Inits once and Deletes it, and nothing of the dead one is left.
    ensure!(v("NS-IDS") == format!("{a} {b} {third}"), "{c}");
    ensure!(v("NS-KILLED") == "yes live", "{c}");
    ensure!(v("NS-B-LEFT") == "0", "the dead VM's files stayed: {c}");
    let swept = json("NS-SWEEP-2")?;
    let listed: Vec<&str> = swept
        .as_array()
        .map(|l| l.iter().filter_map(|vm| vm["id"].as_str()).collect())
        .unwrap_or_default();
    ensure!(
        listed == [third],
        "the restarted server lists {listed:?}: {c}"
    );
    ensure!(v("NS-INITS-2") == "1", "{c}");
    ensure!(v("NS-C-ALIVE") == "no" && v("NS-LIST-END") == "[]", "{c}");
    ensure!(
        v("NS-DELETE-DEAD") == format!("{err}NotFound: no VM with id \"{b}\""),
        "{c}"
    );
    ensure!(v("NS-SERVER-STOPPED") == "0", "{c}");

    // Shutdown with a VM running: the VM and everything of it are gone.
    ensure!(v("NS-D-UP") == "yes", "{c}");
    ensure!(v("NS-SHUTDOWN") == "{}", "{c}");
    ensure!(v("NS-SHUTDOWN-LEFT") == "gone 0", "{c}");

    // A server killed in a Create: its next start destroys the VM it had started.
    ensure!(v("NS-UNFINISHED-UP") == "yes", "{c}");
    ensure!(v("NS-UNFINISHED-LEFT") == "gone 0", "{c}");

    // A VM that never answers SSH.
    let no_ssh = v("NS-NO-SSH");
    ensure!(
        no_ssh.starts_with(&format!("{err}DeadlineExceeded: VM kiln-s0-"))
            && no_ssh.contains("did not accept SSH on 10.214.0.2:22 within 30s"),
        "{c}"
    );
    ensure!(
        v("NS-NO-SSH-LIST") == "[]" && v("NS-NO-SSH-LEFT") == "0",
        "{c}"
    );
    ensure!(v("NS-KILN-LEFT") == "0", "{c}");
    Ok(())
}
