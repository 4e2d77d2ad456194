//! The real backend: each VM is a `kiln run` of a store image (or a `kiln restore` of the
//! slot's [`super::warm`] snapshot of it), in the cgroup slot `kiln/slot-<slot>`
//! (`--slot`), on the slot's own TAP and address. Create returns once the guest's SSH
//! server, started and given the runner's login through the guest agent, sends its banner.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use kiln_agent::client::{connect_ready, wait_ready, ExecIo};
use kiln_agent::protocol::{ExecRequest, StdinMode, AGENT_PORT};

use super::backend::{BackendError, VmBackend, VmRecord, VmSpec};
use super::config::NestingConfig;
use super::provider::VMM_OVERHEAD_MIB;
use super::warm::WarmKey;

/// Run in the guest (as root, through the agent) before Create returns: the login the
/// runner's `connector_config` uses (the user is made if missing; `user:password` comes
/// on stdin, so it is never on a command line), a host key of this VM's own, and sshd.
/// Host keys the image holds are removed first: every VM of an image would otherwise show
/// the same key, and one VM could impersonate another. An Ed25519 key alone is generated
/// (fast, and every SSH client the runner uses speaks it); sshd is pointed at it with
/// `-h` so that it looks for no other.
const PROVISION: &str = r#"set -e
u="$KILN_SSH_USER"
if ! id -u "$u" >/dev/null 2>&1; then
  if command -v useradd >/dev/null 2>&1; then useradd -m -s /bin/bash "$u"
  else adduser -D "$u"; fi
fi
chpasswd
command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ] || { echo "the image has no SSH server (sshd)" >&2; exit 1; }
mkdir -p /etc/ssh /run/sshd
rm -f /etc/ssh/ssh_host_*key /etc/ssh/ssh_host_*key.pub
ssh-keygen -q -t ed25519 -N '' -C "$KILN_VM_ID" -f /etc/ssh/ssh_host_ed25519_key
/usr/sbin/sshd -h /etc/ssh/ssh_host_ed25519_key -o PasswordAuthentication=yes </dev/null >/dev/null 2>&1
"#;

/// What an SSH server sends first (RFC 4253, 4.2): Create waits for it, not only for the
/// TCP handshake, so that the runner's first connection finds sshd answering.
const SSH_BANNER: &[u8] = b"SSH-";

pub struct KilnBackend {
    config: NestingConfig,
}

impl KilnBackend {
    pub fn new(config: NestingConfig) -> KilnBackend {
        KilnBackend { config }
    }

    fn vm_dir(&self, id: &str) -> PathBuf {
        self.config.state_dir.join("vm").join(id)
    }

    /// The slot's TAP, made by `kiln net setup` the first time the slot is used and kept
    /// for the next VMs of the slot.
    async fn ensure_tap(&self, slot: u32) -> Result<(), BackendError> {
        let tap = self.config.tap(slot);
        if Path::new("/sys/class/net").join(&tap).exists() {
            return Ok(());
        }
        let (host, _) = self.config.slot_addrs(slot);
        let mut cmd = tokio::process::Command::new(&self.config.kiln);
        cmd.args([
            "net",
            "setup",
            "--tap",
            &tap,
            "--host-ip",
            &format!("{host}/24"),
        ]);
        if self.config.nat {
            cmd.arg("--nat");
            for a in &self.config.nat_allow {
                cmd.args(["--allow", a]);
            }
        }
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| failed(format!("cannot run {}: {e}", self.config.kiln.display())))?;
        if !out.status.success() {
            return Err(failed(format!(
                "kiln net setup --tap {tap} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    /// Starts the VM's `kiln run` in a process group of its own (it outlives a restart of
    /// the server) and returns its record.
    /// With `from`, the VM is a clone of that snapshot (a new MAC on the slot's TAP; the
    /// address is the slot's, which the snapshot's guest already has). With
    /// `will_snapshot`, the slot's memory limit also has room for the snapshot's copy of
    /// the guest memory, which the kernel charges to the VMM that writes it (and cannot
    /// reclaim when `snapshot_dir` is a tmpfs).
    async fn spawn(
        &self,
        spec: &VmSpec,
        slot: u32,
        dir: &Path,
        from: Option<&Path>,
        will_snapshot: bool,
    ) -> Result<VmRecord, BackendError> {
        let snapshot_room = if will_snapshot { spec.memory_mib } else { 0 };
        let c = &self.config;
        let (host, guest) = c.slot_addrs(slot);
        let mut net = format!("tap={},ip={guest}/24,gw={host}", c.tap(slot));
        if let Some(dns) = &c.dns {
            net.push_str(&format!(",dns={dns}"));
        }
        let log = std::fs::File::create(dir.join("kiln.log"))
            .map_err(|e| failed(format!("cannot create {}: {e}", dir.display())))?;
        let log2 = log
            .try_clone()
            .map_err(|e| failed(format!("cannot dup the log: {e}")))?;
        let mut cmd = tokio::process::Command::new(&c.kiln);
        match from {
            None => {
                cmd.arg("run")
                    .arg("--kernel")
                    .arg(&c.image_kernel)
                    .args(["--image", &spec.image])
                    .args(["--memory", &spec.memory_mib.to_string()])
                    .args(["--vcpus", &spec.vcpus.to_string()])
                    .args(["--net", &net]);
            }
            Some(snapshot) => {
                cmd.arg("restore")
                    .arg("--snapshot")
                    .arg(snapshot)
                    .args(["--hostname", &spec.id])
                    .args(["--net", &format!("tap={}", c.tap(slot))]);
            }
        }
        cmd.arg("--store")
            .arg(&c.image_store)
            .args(["--slot", &slot.to_string()])
            .args([
                "--slot-memory",
                &(spec.memory_mib + VMM_OVERHEAD_MIB + snapshot_room).to_string(),
            ])
            .arg("--vsock")
            .arg(dir.join("vsock.sock"))
            .arg("--api")
            .arg(dir.join("api.sock"))
            .arg("--serial")
            .arg(dir.join("console.log"))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0);
        let child = cmd
            .spawn()
            .map_err(|e| failed(format!("cannot start {}: {e}", c.kiln.display())))?;
        let pid = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .ok_or_else(|| failed("kiln exited at once".into()))?;
        // Dropped, not waited on: tokio reaps it when it ends; liveness is checked by pid
        // and start time.
        drop(child);
        let start_time = start_time(pid).ok_or_else(|| failed("kiln exited at once".into()))?;
        Ok(VmRecord {
            id: spec.id.clone(),
            slot: spec.slot,
            image: spec.image.clone(),
            pid,
            start_time,
            addr: format!("{guest}:22"),
        })
    }

    /// Waits for the agent, sets the login and starts sshd, then waits for port 22.
    /// With `snapshot`, the VM is first snapshotted there once its agent answers (a failed
    /// snapshot is reported, and the Create goes on).
    async fn bring_up(
        &self,
        spec: &VmSpec,
        vm: &VmRecord,
        dir: &Path,
        snapshot: Option<&WarmKey<'_>>,
    ) -> Result<(), BackendError> {
        let deadline = Instant::now() + self.config.boot_timeout;
        let vsock = dir.join("vsock.sock");
        let timeout = || {
            BackendError::Timeout(format!(
                "VM {} did not accept SSH on {} within {:?}{}",
                vm.id,
                vm.addr,
                self.config.boot_timeout,
                tail(&dir.join("console.log"))
            ))
        };
        loop {
            if !self.alive(vm) {
                return Err(failed(format!(
                    "VM {} stopped while booting{}{}",
                    vm.id,
                    tail(&dir.join("kiln.log")),
                    tail(&dir.join("console.log"))
                )));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(timeout());
            }
            let v = vsock.clone();
            let step = left.min(Duration::from_millis(500));
            let ready = tokio::task::spawn_blocking(move || wait_ready(v, AGENT_PORT, step))
                .await
                .map_err(|e| failed(e.to_string()))?;
            if ready.is_ok() {
                break;
            }
            if !vsock.exists() {
                // Not even the socket yet: the VMM is still starting.
                tokio::time::sleep(step).await;
            }
        }
        if let Some(key) = snapshot {
            if let Err(e) = self.snapshot(key, vm, dir, deadline).await {
                eprintln!(
                    "nesting: no warm snapshot of {} in slot {} from {}: {e}",
                    spec.image, spec.slot, vm.id
                );
            }
        }
        if let Err(e) = self.provision(spec, &vsock, deadline).await {
            // An agent that stopped answering as time ran out is the boot timeout too.
            return Err(if Instant::now() >= deadline {
                timeout()
            } else {
                e
            });
        }
        let addr: std::net::SocketAddr = vm
            .addr
            .parse()
            .map_err(|e| failed(format!("bad address {}: {e}", vm.addr)))?;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(timeout());
            }
            let step = left.min(Duration::from_secs(2));
            if let Ok(true) = tokio::time::timeout(step, ssh_answers(addr)).await {
                return Ok(());
            }
            if !self.alive(vm) {
                return Err(failed(format!(
                    "VM {} stopped{}",
                    vm.id,
                    tail(&dir.join("console.log"))
                )));
            }
            // Refused at once (sshd not listening yet): try again shortly.
            tokio::time::sleep(Duration::from_millis(200).min(left)).await;
        }
    }

    /// Writes a snapshot of the running VM (paused meanwhile) and puts it in place.
    async fn snapshot(
        &self,
        key: &WarmKey<'_>,
        vm: &VmRecord,
        dir: &Path,
        deadline: Instant,
    ) -> Result<(), String> {
        let staged = key.staging(&vm.id).map_err(|e| e.to_string())?;
        let left = deadline.saturating_duration_since(Instant::now()).as_secs();
        let out = tokio::process::Command::new(&self.config.kiln)
            .arg("ctl")
            .arg("--api")
            .arg(dir.join("api.sock"))
            .args(["--timeout", &left.max(1).to_string()])
            .arg("snapshot")
            .arg("--dir")
            .arg(&staged)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| format!("cannot run {}: {e}", self.config.kiln.display()))?;
        if !out.status.success() {
            let _ = std::fs::remove_dir_all(&staged);
            return Err(format!(
                "kiln ctl snapshot: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let published = key.publish(&staged).map_err(|e| e.to_string())?;
        eprintln!(
            "nesting: warm snapshot of {} for slot {} in {}",
            vm.image,
            vm.slot,
            published.display()
        );
        Ok(())
    }

    async fn provision(
        &self,
        spec: &VmSpec,
        vsock: &Path,
        deadline: Instant,
    ) -> Result<(), BackendError> {
        let vsock = vsock.to_owned();
        let user = spec.ssh_user.clone();
        let id = spec.id.clone();
        let secret = format!("{}:{}\n", spec.ssh_user, spec.ssh_password);
        let left = deadline.saturating_duration_since(Instant::now());
        let task = tokio::task::spawn_blocking(move || -> Result<(i32, String), String> {
            let mut client =
                connect_ready(&vsock, AGENT_PORT, left).map_err(|e| format!("agent: {e}"))?;
            let mut req = ExecRequest::new(["/bin/sh", "-c", PROVISION]);
            req.env = vec![
                ("KILN_SSH_USER".into(), user),
                ("KILN_VM_ID".into(), id),
                (
                    "PATH".into(),
                    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
                ),
            ];
            req.stdin = StdinMode::Pipe;
            let mut stdin = std::io::Cursor::new(secret.into_bytes());
            let (mut out, mut err) = (Vec::new(), Vec::new());
            let status = client
                .exec_with(
                    &req,
                    ExecIo {
                        stdin: Some(&mut stdin),
                        stdout: &mut out,
                        stderr: &mut err,
                        on_started: None,
                    },
                )
                .map_err(|e| format!("agent exec: {e}"))?;
            out.extend_from_slice(&err);
            Ok((
                status.shell_code(),
                String::from_utf8_lossy(&out).trim().to_string(),
            ))
        });
        // Bounded by the boot deadline too: a guest that hangs in the set-up fails the
        // Create (the caller destroys the VM, which ends the blocked exec).
        let result = tokio::time::timeout(left, task)
            .await
            .map_err(|_| failed("setting up SSH in the VM: no answer from the agent".into()))?
            .map_err(|e| failed(e.to_string()))?;
        match result {
            Ok((0, _)) => Ok(()),
            Ok((code, output)) => Err(failed(format!(
                "setting up SSH in the VM failed (exit {code}): {output}"
            ))),
            Err(e) => Err(failed(format!("setting up SSH in the VM: {e}"))),
        }
    }
}

/// Whether an SSH server at `addr` accepts a connection and sends its banner.
async fn ssh_answers(addr: std::net::SocketAddr) -> bool {
    use tokio::io::AsyncReadExt;
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    let mut first = [0u8; 4];
    stream.read_exact(&mut first).await.is_ok() && first == SSH_BANNER
}

fn failed(m: String) -> BackendError {
    BackendError::Failed(m)
}

/// The last lines of a log, for an error message.
fn tail(path: &Path) -> String {
    let Ok(text) = std::fs::read(path) else {
        return String::new();
    };
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    if lines.is_empty() {
        return String::new();
    }
    let mut lines = lines;
    lines.reverse();
    format!("; {}: {}", path.display(), lines.join(" | "))
}

/// Field 22 of /proc/PID/stat (start time in clock ticks since boot), if the process
/// exists and is not a zombie.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields resume after the
    // last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    // `rest` starts at field 3; field 22 is the 20th from there.
    fields.nth(18)?.parse().ok()
}

fn pid_alive(pid: i32, started: u64) -> bool {
    start_time(pid) == Some(started)
}

#[tonic::async_trait]
impl VmBackend for KilnBackend {
    fn images(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.config.image_store)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().join("rootfs.ext4").is_file())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        names
    }

    fn available_memory_mib(&self) -> u64 {
        std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemAvailable:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .map_or(u64::MAX, |kib| kib / 1024)
    }

    async fn create(&self, spec: &VmSpec) -> Result<VmRecord, BackendError> {
        let slot = u32::try_from(spec.slot).map_err(|_| failed("negative slot".into()))?;
        if !self.config.image_kernel.is_file() {
            return Err(failed(format!(
                "the kernel that boots store images, {}, is missing: set image_kernel in the \
                 nesting config",
                self.config.image_kernel.display()
            )));
        }
        let dir = self.vm_dir(&spec.id);
        std::fs::create_dir_all(&dir)
            .map_err(|e| failed(format!("cannot create {}: {e}", dir.display())))?;
        self.ensure_tap(slot).await?;
        let image_disk = self
            .config
            .image_store
            .join(&spec.image)
            .join("rootfs.ext4");
        let warm = self.config.warm_dir.as_deref().map(|root| WarmKey {
            root,
            image: &spec.image,
            slot,
            image_disk: &image_disk,
            kernel: &self.config.image_kernel,
            kiln: &self.config.kiln,
            memory_mib: spec.memory_mib,
            vcpus: spec.vcpus,
            guest_addr: self.config.slot_addrs(slot).1,
        });
        let from = warm.as_ref().and_then(WarmKey::ready);
        let make_snapshot = if from.is_none() { warm.as_ref() } else { None };
        let spawned = self
            .spawn(spec, slot, &dir, from.as_deref(), make_snapshot.is_some())
            .await;
        let vm = match spawned {
            Ok(vm) => vm,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        // Beside the VM from now on, so that a server killed before this Create answers
        // (before the provider records the VM) finds it again and sweeps it.
        if let Err(e) = write_spawned(&dir, &vm) {
            let _ = self.destroy(&vm).await;
            return Err(failed(format!(
                "cannot record the VM in {}: {e}",
                dir.display()
            )));
        }
        if let Err(e) = self.bring_up(spec, &vm, &dir, make_snapshot).await {
            if let Err(d) = self.destroy(&vm).await {
                eprintln!("nesting: cannot destroy the failed VM {}: {d}", vm.id);
            }
            if let (Some(key), Some(_)) = (&warm, &from) {
                // A clone that did not come up: the next Create boots (and snapshots anew).
                if let Err(d) = key.discard() {
                    eprintln!("nesting: cannot remove the warm snapshot: {d}");
                }
            }
            return Err(e);
        }
        Ok(vm)
    }

    async fn destroy(&self, vm: &VmRecord) -> Result<(), BackendError> {
        // SIGTERM lets kiln stop the VM and clean up; SIGKILL if it has not after 10 s.
        for (signal, wait) in [(libc::SIGTERM, 10), (libc::SIGKILL, 5)] {
            if !self.alive(vm) {
                break;
            }
            // SAFETY: kill(2) with plain integers; the pid was checked to still be the
            // VM's process (same start time) just above.
            if unsafe { libc::kill(vm.pid, signal) } != 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::ESRCH) {
                    return Err(failed(format!("cannot signal kiln (pid {}): {e}", vm.pid)));
                }
            }
            let until = Instant::now() + Duration::from_secs(wait);
            while self.alive(vm) && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        if self.alive(vm) {
            return Err(failed(format!("kiln (pid {}) did not stop", vm.pid)));
        }
        let dir = self.vm_dir(&vm.id);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(failed(format!("cannot remove {}: {e}", dir.display())));
            }
        }
        Ok(())
    }

    fn alive(&self, vm: &VmRecord) -> bool {
        pid_alive(vm.pid, vm.start_time)
    }

    async fn sweep(&self, keep: &[VmRecord]) -> Vec<String> {
        let root = self.config.state_dir.join("vm");
        let Ok(entries) = std::fs::read_dir(&root) else {
            return Vec::new();
        };
        let mut swept = Vec::new();
        for entry in entries.flatten() {
            let id = entry.file_name().to_string_lossy().into_owned();
            if keep.iter().any(|vm| vm.id == id) {
                continue;
            }
            let dir = entry.path();
            let gone = match read_spawned(&dir) {
                // Its process, if it still runs, then its directory.
                Some(vm) => self.destroy(&vm).await.map_err(|e| e.to_string()),
                // Never started: the directory alone.
                None => std::fs::remove_dir_all(&dir).map_err(|e| e.to_string()),
            };
            match gone {
                Ok(()) => swept.push(id),
                Err(e) => eprintln!("nesting: cannot sweep {}: {e}", dir.display()),
            }
        }
        swept.sort();
        swept
    }
}

/// The record of a spawned VM, kept in its directory until the VM is destroyed.
const SPAWNED: &str = "vm.json";

fn write_spawned(dir: &Path, vm: &VmRecord) -> std::io::Result<()> {
    let json = serde_json::to_vec(vm).map_err(std::io::Error::other)?;
    std::fs::write(dir.join(SPAWNED), json)
}

fn read_spawned(dir: &Path) -> Option<VmRecord> {
    let bytes = std::fs::read(dir.join(SPAWNED)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_tells_a_live_process_from_a_gone_one() {
        let me = i32::try_from(std::process::id()).unwrap();
        let t = start_time(me).expect("this process has a start time");
        assert!(pid_alive(me, t));
        assert!(
            !pid_alive(me, t + 1),
            "another start time is another process"
        );
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        child.wait().unwrap();
        assert_eq!(start_time(pid), None);
    }
}

#[cfg(test)]
mod sweep_tests {
    use super::*;
    use crate::nesting::config::{Env, NestingFile};

    fn backend(state_dir: &Path) -> KilnBackend {
        let mut config = NestingConfig::from_file(NestingFile::default(), &Env::default()).unwrap();
        config.state_dir = state_dir.to_owned();
        KilnBackend::new(config)
    }

    /// A running stand-in for a VM's kiln, with its directory and record as `create`
    /// leaves them.
    fn spawned(b: &KilnBackend, id: &str) -> (std::process::Child, VmRecord) {
        let child = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        let vm = VmRecord {
            id: id.into(),
            slot: 0,
            image: "debian-ci".into(),
            pid,
            start_time: start_time(pid).unwrap(),
            addr: "10.213.0.2:22".into(),
        };
        std::fs::create_dir_all(b.vm_dir(id)).unwrap();
        write_spawned(&b.vm_dir(id), &vm).unwrap();
        (child, vm)
    }

    #[tokio::test]
    async fn sweep_destroys_the_vms_of_unfinished_creates_and_keeps_the_recorded_ones() {
        let dir = tempfile::tempdir().unwrap();
        let b = backend(dir.path());
        assert!(b.sweep(&[]).await.is_empty(), "no vm directory yet");
        let (mut orphan, orphan_vm) = spawned(&b, "kiln-s0-a-0");
        let (mut kept, kept_vm) = spawned(&b, "kiln-s1-b-1");
        // A Create killed before its VM started leaves an empty directory.
        std::fs::create_dir_all(b.vm_dir("kiln-s2-c-2")).unwrap();

        let swept = b.sweep(std::slice::from_ref(&kept_vm)).await;
        assert_eq!(swept, ["kiln-s0-a-0", "kiln-s2-c-2"]);
        orphan.wait().unwrap();
        assert!(!b.alive(&orphan_vm));
        assert!(!b.vm_dir("kiln-s0-a-0").exists());
        assert!(!b.vm_dir("kiln-s2-c-2").exists());
        assert!(b.alive(&kept_vm), "a recorded VM is not swept");
        assert!(b.vm_dir("kiln-s1-b-1").exists());
        kept.kill().unwrap();
        kept.wait().unwrap();
    }
}

#[cfg(test)]
mod ssh_wait_tests {
    use super::*;

    /// A server on loopback that sends `greeting` to each connection.
    async fn server(greeting: &'static [u8]) -> std::net::SocketAddr {
        use tokio::io::AsyncWriteExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let _ = s.write_all(greeting).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn only_an_ssh_banner_counts_as_ssh_ready() {
        assert!(ssh_answers(server(b"SSH-2.0-OpenSSH_9.2\r\n").await).await);
        assert!(!ssh_answers(server(b"HTTP/1.1 400\r\n").await).await);
        assert!(!ssh_answers(server(b"").await).await);
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        assert!(!ssh_answers(closed).await);
    }
}
