//! `kiln-gitlab nesting serve` with its real backend, in the test bed: the runner's calls
//! boot a kiln VM of a Debian store image in a slot, with the slot's TAP and address, the
//! SSH login set and sshd answering on `<addr>`; a restarted server still lists it; Delete
//! stops it.

use std::time::Duration;

use anyhow::{ensure, Result};
use kiln_tests::output::value;
use kiln_tests::Runner;

#[test]
fn nesting_create_boots_a_vm_with_ssh_and_survives_a_server_restart() -> Result<()> {
    let bins = kiln_tests::artifacts::static_binaries()?;
    let image = kiln_tests::images::debian(
        &bins,
        "bookworm",
        &["bash", "openssh-server", "passwd"],
        None,
    )?;
    let script = format!(
        "{}{}",
        kiln_tests::shell::PRELUDE,
        r#"
# kiln run --slot needs cgroup v2.
[ -e /sys/fs/cgroup/cgroup.controllers ] || mount -t cgroup2 none /sys/fs/cgroup
NS=$PWD/ns
mkdir -p "$NS"
cp -a "$FILES/store" "$NS/store"
cat > "$NS/nesting.toml" <<EOF
kiln = "$KILN"
state_dir = "$NS/state"
image_store = "$NS/store"
image_kernel = "$GUEST_VMLINUX"
slots = 2
nat = false
memory_mib = 256
boot_timeout_secs = 400
EOF
serve() {
  "$KILN_GITLAB" nesting serve --socket "$NS/n.sock" --config "$NS/nesting.toml" 2>> "$NS/serve.log" &
  SERVER=$!
  n=0; while [ ! -S "$NS/n.sock" ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
}
call() { "$KILN_GITLAB" nesting call --socket "$NS/n.sock" "$@"; }
serve
echo "NS-BEFORE-INIT=$(call list 2>&1)"
call init '{"ssh_user":"ci","ssh_password":"s3cret"}'
out=$(call create IMAGE --slot 1 2>&1)
echo "NS-CREATE=$out"
id=$(echo "$out" | sed -n 's/.*"id":"\([^"]*\)".*/\1/p')
addr=$(echo "$out" | sed -n 's/.*"addr":"\([^"]*\)".*/\1/p')
echo "NS-ADDR=$addr"
echo "NS-BANNER=$(echo | nc -w 5 "${addr%:22}" 22 2>/dev/null | head -c 7)"
echo "NS-SHADOW=$("$KILN" exec --vsock "$NS/state/vm/$id/vsock.sock" -- sh -c 'grep "^ci:" /etc/shadow | cut -d: -f2 | cut -c1-1')"
kill -TERM $SERVER; wait $SERVER
echo "NS-SERVER-STOPPED=$?"
serve
call init
echo "NS-LIST-RESTARTED=$(call list)"
call delete "$id"; echo "NS-DELETE=$?"
echo "NS-LIST-AFTER=$(call list)"
echo "NS-KILN-LEFT=$(ps | grep -c '[k]iln run')"
kill -TERM $SERVER; wait $SERVER
sed 's/^/serve.log: /' "$NS/serve.log"
"#
        .replace("IMAGE", &image.name)
    );
    let files = image.files("store")?;
    let runner = match Runner::detect()? {
        Runner::Testbed(mut t) => {
            t.memory_mib = t.memory_mib.max(3072);
            Runner::Testbed(t)
        }
        direct => direct,
    };
    let out = runner.run(&script, &files, Duration::from_secs(900))?;
    let c = &out.console;
    eprintln!("{c}"); // shown with --nocapture
    ensure!(
        value(c, "NS-BEFORE-INIT")
            .is_some_and(|v| v.contains("FailedPrecondition: not initialized")),
        "{c}"
    );
    ensure!(value(c, "NS-ADDR") == Some("10.213.1.2:22"), "{c}");
    ensure!(
        value(c, "NS-BANNER") == Some("SSH-2.0"),
        "sshd does not answer: {c}"
    );
    ensure!(
        value(c, "NS-SHADOW") == Some("$"),
        "the SSH user has no password hash: {c}"
    );
    ensure!(value(c, "NS-SERVER-STOPPED") == Some("0"), "{c}");
    let id = value(c, "NS-CREATE")
        .and_then(|v| v.split("\"id\":\"").nth(1))
        .and_then(|v| v.split('"').next())
        .unwrap_or("?")
        .to_string();
    ensure!(
        value(c, "NS-LIST-RESTARTED").is_some_and(|v| v.contains(&id)),
        "the restarted server lost the VM: {c}"
    );
    ensure!(value(c, "NS-DELETE") == Some("0"), "{c}");
    ensure!(value(c, "NS-LIST-AFTER") == Some("[]"), "{c}");
    ensure!(value(c, "NS-KILN-LEFT") == Some("0"), "{c}");
    Ok(())
}
