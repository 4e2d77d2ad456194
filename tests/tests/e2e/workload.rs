//! Real programs in the guest: a Debian image made by `kiln image build` with what CI jobs
//! use (PostgreSQL, Python, gcc, git, util-linux, Docker), booted once in the test bed for every
//! workload (see `kiln_tests::workload`). Each test asserts on its program's own output in
//! its section of that one run.

use anyhow::{ensure, Result};
use kiln_tests::output::value;
use kiln_tests::workload::{self, Battery};

/// The job: one section per workload, each bounded by `timeout` and each going on whatever
/// the one before did. stderr joins stdout so that a failing program's message lands in
/// its own section.
const JOB: &str = r#"
exec 2>&1
section() { echo "WL-SECTION=$1"; }

section machine
echo "WL-CGROUP-SELF=$(cat /proc/self/cgroup)"
echo "WL-CONTROLLERS=$(cat /sys/fs/cgroup/cgroup.controllers)"
echo "WL-SUBTREE=$(cat /sys/fs/cgroup/cgroup.subtree_control)"
echo "WL-NOFILE=$(ulimit -n)"
echo "WL-MOUNTS=$(awk '{print $2 ":" $3}' /proc/mounts | tr '\n' ' ')"
echo "WL-LO=$(awk '$6 == "lo" {print $1}' /proc/net/if_inet6)"
echo "WL-PTY=$(python3 -c 'import os; m, s = os.openpty(); print(os.ttyname(s))')"
echo "WL-DEVFD=$(bash -c 'cat <(echo process-substitution)')"
echo "WL-HOSTNAME=$(hostname)"
echo "WL-LOCALHOST=$(getent hosts localhost | awk '{print $1}' | sort | tr '\n' ' ')"
# No loop device exists at boot; losetup makes one through /dev/loop-control.
echo "WL-LOOPS-AT-BOOT=$(ls /sys/block | grep -c '^loop')"
head -c 1048576 /dev/zero > /tmp/loop.img
loopdev=$(losetup -f --show /tmp/loop.img 2>&1)
echo "WL-LOOP=$loopdev $(blockdev --getsize64 "$loopdev" 2>&1)"
losetup -d "$loopdev"

section python
timeout 300 python3 - <<'PY'
import multiprocessing as mp
import socket
import threading

def square(q, i):
    q.put(i * i)

if __name__ == "__main__":
    q = mp.Queue()
    procs = [mp.Process(target=square, args=(q, i)) for i in range(4)]
    for p in procs:
        p.start()
    got = sorted(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join()
    print("WL-PY-MP=" + ",".join(map(str, got)), flush=True)

    srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    srv.bind(("::1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]

    def serve():
        conn, peer = srv.accept()
        conn.sendall(b"echo " + conn.recv(64) + b" from " + peer[0].encode())
        conn.close()

    server = mp.Process(target=serve)
    server.start()
    with socket.create_connection(("::1", port), timeout=60) as c:
        c.sendall(b"ping")
        print("WL-PY-TCP6=" + c.recv(128).decode(), flush=True)
    server.join(60)
PY
echo "WL-PY-RC=$?"

section unshare
timeout 120 unshare --user --map-root-user --pid --net --mount --fork \
  sh -c 'echo "WL-NS-ROOT=uid=$(id -u) pid=$$ ifaces=$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d " " | tr "\n" " ")"'
echo "WL-NS-ROOT-RC=$?"
timeout 120 setpriv --reuid=65534 --regid=65534 --clear-groups \
  unshare --user --map-root-user --pid --net --mount --fork sh -c 'echo "WL-NS-NOBODY=uid=$(id -u) pid=$$"'
echo "WL-NS-NOBODY-RC=$?"

section cbuild
(
  set -e
  mkdir -p /tmp/cbuild/upstream && cd /tmp/cbuild/upstream
  git init -q
  printf '#include <stdio.h>\nint answer(void);\nint main(void) { printf("WL-C-OUT=answer %%d\\n", answer()); return 0; }\n' > main.c
  printf 'int answer(void) { return 6 * 7; }\n' > answer.c
  printf 'hello: main.o answer.o\n\t$(CC) -o $@ $^\n%%.o: %%.c\n\t$(CC) -O2 -Wall -Werror -c $<\n' > Makefile
  git add .
  git -c user.name=kiln -c user.email=kiln@localhost commit -q -m 'hello'
  cd /tmp/cbuild
  git clone -q /tmp/cbuild/upstream clone
  cd clone
  timeout 300 make -j"$(nproc)"
  ./hello
)
echo "WL-C-RC=$?"

section postgres
(
  set -e
  PGBIN=$(ls -d /usr/lib/postgresql/*/bin | tail -n 1)
  mkdir -p /tmp/pg && chown postgres:postgres /tmp/pg
  as_pg() { setpriv --reuid=postgres --regid=postgres --init-groups env HOME=/tmp/pg "$@"; }
  as_pg "$PGBIN/initdb" -D /tmp/pg/data -A trust -U postgres --no-sync > /tmp/pg/initdb.log
  echo "WL-PG-INITDB=ok"
  as_pg timeout 300 "$PGBIN/pg_ctl" -D /tmp/pg/data -l /tmp/pg/server.log -w -t 240 \
    -o "-k /tmp/pg -c listen_addresses=127.0.0.1,::1 -c fsync=off" start
  psql -X -v ON_ERROR_STOP=1 -h /tmp/pg -U postgres -q \
    -c "CREATE TABLE jobs (id int PRIMARY KEY, name text)" \
    -c "INSERT INTO jobs VALUES (1, 'build'), (2, 'test'), (3, 'deploy')"
  echo "WL-PG-QUERY=$(psql -X -h 127.0.0.1 -U postgres -tA -c "SELECT string_agg(name, ',' ORDER BY id) || ' ' || count(*) FROM jobs")"
  echo "WL-PG-QUERY6=$(psql -X -h ::1 -U postgres -tA -c "SELECT count(*) FROM jobs WHERE id > 1")"
  as_pg "$PGBIN/pg_ctl" -D /tmp/pg/data -m fast -w stop
) || { echo "WL-PG-FAILED"; cat /tmp/pg/initdb.log /tmp/pg/server.log 2>/dev/null | tail -n 40; }

section oom
CG=/sys/fs/cgroup/workload-oom
mkdir "$CG" && echo 32M > "$CG/memory.max"
sh -c "echo \$\$ > $CG/cgroup.procs && exec python3 -c \"b = b'x' * (128 << 20); print('WL-OOM-SURVIVED')\""
echo "WL-OOM-RC=$?"
echo "WL-OOM-EVENTS=$(grep '^oom_kill ' "$CG/memory.events" | tr '\n' ' ')"
echo "WL-OOM-AFTER=the job goes on"

section docker
# dockerd was started by `kiln job --docker`: the job uses it from its first line.
echo "WL-DOCKER-SERVER=$(timeout 120 docker version --format '{{.Server.Os}}/{{.Server.Arch}}')"
echo "WL-DOCKER-INFO=$(timeout 120 docker info --format '{{.Driver}} cgroup-v{{.CgroupVersion}}')"
# An image in `docker save` format, made here from the static busybox: one layer, its
# config (whose diff_ids name the layer's sha256) and the manifest.
D=/tmp/docker-wl
rm -rf "$D" && mkdir -p "$D/layer/bin" "$D/image" "$D/context"
cp /bin/busybox "$D/layer/bin/busybox"
for applet in sh echo cat wget ip; do ln -s busybox "$D/layer/bin/$applet"; done
tar -C "$D/layer" -cf "$D/image/layer.tar" .
diff_id=$(sha256sum "$D/image/layer.tar" | cut -d' ' -f1)
printf '{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin"],"Cmd":["sh"]},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
  "$diff_id" > "$D/image/config.json"
config=$(sha256sum "$D/image/config.json" | cut -d' ' -f1)
mv "$D/image/config.json" "$D/image/$config.json"
printf '[{"Config":"%s.json","RepoTags":["kiln-wl/busybox:1"],"Layers":["layer.tar"]}]' "$config" \
  > "$D/image/manifest.json"
tar -C "$D/image" -cf "$D/busybox.tar" .
timeout 300 docker load -i "$D/busybox.tar"
echo "WL-DOCKER-LOAD-RC=$?"
echo "WL-DOCKER-RUN=$(timeout 300 docker run --rm kiln-wl/busybox:1 sh -c 'echo "busybox in a container, pid $$"')"
printf 'FROM kiln-wl/busybox:1\nRUN echo "built by a RUN step, pid $$" > /built.txt\n' > "$D/context/Dockerfile"
DOCKER_BUILDKIT=0 timeout 600 docker build -q -t kiln-wl/built:1 "$D/context"
echo "WL-DOCKER-BUILD-RC=$?"
echo "WL-DOCKER-BUILT=$(timeout 300 docker run --rm kiln-wl/built:1 cat /built.txt)"
# Through Docker's bridge and the guest's NAT to the test-bed host on the TAP side.
echo "WL-DOCKER-NET=$(timeout 300 docker run --rm kiln-wl/busybox:1 sh -c "echo \$(wget -q -O - http://$WL_HOST_IP:8080/token) from \$(ip -4 -o addr show dev eth0)")"
echo "WL-DOCKER-LOG=$(grep -c . /var/log/kiln-dockerd.log)"

section end
"#;

fn battery() -> Result<&'static Battery> {
    workload::battery(JOB)
}

/// Asserts that `key` has the value `want` in `section`, quoting the section if not.
fn expect(section: &str, key: &str, want: &str) -> Result<()> {
    let got = value(section, key);
    ensure!(
        got == Some(want),
        "{key}: expected {want:?}, got {got:?}; the section's output:\n{section}"
    );
    Ok(())
}

/// The guest's init gives jobs what a CI machine has: cgroup v2 with its controllers
/// enabled and the job in a cgroup of its own, /dev/pts, /dev/shm, /dev/mqueue, /dev/fd,
/// loopback on both families, a hostname, nofile 1048576, and loop devices made on demand
/// (none at boot).
#[test]
fn workload_machine_has_cgroups_ptys_and_loopback() -> Result<()> {
    let out = battery()?.section("machine")?;
    expect(out, "WL-CGROUP-SELF", "0::/job")?;
    let controllers = value(out, "WL-CONTROLLERS").unwrap_or_default();
    let subtree = value(out, "WL-SUBTREE").unwrap_or_default();
    for c in ["cpu", "cpuset", "io", "memory", "pids"] {
        ensure!(
            controllers.split_whitespace().any(|x| x == c),
            "cgroup.controllers lacks {c}: {out}"
        );
        ensure!(
            subtree.split_whitespace().any(|x| x == c),
            "the root's cgroup.subtree_control lacks {c} (not delegated): {out}"
        );
    }
    expect(out, "WL-NOFILE", "1048576")?;
    let mounts = value(out, "WL-MOUNTS").unwrap_or_default();
    for m in [
        "/dev/pts:devpts",
        "/dev/shm:tmpfs",
        "/dev/mqueue:mqueue",
        "/sys/fs/cgroup:cgroup2",
    ] {
        ensure!(
            mounts.split_whitespace().any(|x| x == m),
            "{m} is not mounted: {out}"
        );
    }
    // ::1 on lo is 00000000000000000000000000000001 in /proc/net/if_inet6.
    let lo = value(out, "WL-LO").unwrap_or_default();
    ensure!(
        lo.starts_with("00000000000000000000000000000001"),
        "lo has no ::1: {out}"
    );
    ensure!(
        value(out, "WL-PTY").is_some_and(|p| p.starts_with("/dev/pts/")),
        "openpty gave no /dev/pts terminal: {out}"
    );
    expect(out, "WL-DEVFD", "process-substitution")?;
    expect(out, "WL-HOSTNAME", "kiln")?;
    expect(out, "WL-LOOPS-AT-BOOT", "0")?;
    ensure!(
        value(out, "WL-LOOP")
            .is_some_and(|l| l.starts_with("/dev/loop") && l.ends_with(" 1048576")),
        "losetup made no 1 MiB loop device: {out}"
    );
    ensure!(
        value(out, "WL-LOCALHOST").is_some_and(|l| l.contains("127.0.0.1") || l.contains("::1")),
        "localhost does not resolve: {out}"
    );
    Ok(())
}

/// Python: multiprocessing with a shared Queue (SemLock on /dev/shm), and a TCP server in
/// another process answering a client over ::1.
#[test]
fn workload_python_multiprocessing_queue_and_tcp_on_ipv6_loopback() -> Result<()> {
    let out = battery()?.section("python")?;
    expect(out, "WL-PY-MP", "0,1,4,9")?;
    expect(out, "WL-PY-TCP6", "echo ping from ::1")?;
    expect(out, "WL-PY-RC", "0")
}

/// `unshare --user --map-root-user --pid --net --mount --fork`: root in a new user
/// namespace, PID 1 of a new PID namespace, only `lo` in a new network namespace; as root
/// and as an unprivileged user.
#[test]
fn workload_unshare_user_pid_net_mount_namespaces() -> Result<()> {
    let out = battery()?.section("unshare")?;
    expect(out, "WL-NS-ROOT", "uid=0 pid=1 ifaces=lo")?;
    expect(out, "WL-NS-ROOT-RC", "0")?;
    expect(out, "WL-NS-NOBODY", "uid=0 pid=1")?;
    expect(out, "WL-NS-NOBODY-RC", "0")
}

/// A C build: git clone of a local repository, `make -j` with gcc, and the program runs.
#[test]
fn workload_c_build_git_clone_and_parallel_make() -> Result<()> {
    let out = battery()?.section("cbuild")?;
    expect(out, "WL-C-OUT", "answer 42")?;
    expect(out, "WL-C-RC", "0")
}

/// PostgreSQL: initdb, the server started with pg_ctl (SysV and POSIX shared memory), a
/// table created and queried with psql over the socket, 127.0.0.1 and ::1.
#[test]
fn workload_postgresql_initdb_server_and_psql() -> Result<()> {
    let out = battery()?.section("postgres")?;
    ensure!(!out.contains("WL-PG-FAILED"), "PostgreSQL failed:\n{out}");
    expect(out, "WL-PG-INITDB", "ok")?;
    expect(out, "WL-PG-QUERY", "build,test,deploy 3")?;
    expect(out, "WL-PG-QUERY6", "2")
}

/// cgroup v2 memory control from a job: a child cgroup with memory.max 32M, a process over
/// it is OOM-killed (SIGKILL: exit 137, oom_kill 1 in memory.events), and the job goes on.
#[test]
fn workload_cgroup_memory_max_oom_kills_only_the_offender() -> Result<()> {
    let out = battery()?.section("oom")?;
    ensure!(
        !out.contains("WL-OOM-SURVIVED"),
        "the process over memory.max was not killed:\n{out}"
    );
    expect(out, "WL-OOM-RC", "137")?;
    expect(out, "WL-OOM-EVENTS", "oom_kill 1")?;
    expect(out, "WL-OOM-AFTER", "the job goes on")
}

/// Docker started by `kiln job --docker` answers from the job's first line, on overlay2
/// and cgroup v2; `docker load` takes an image in `docker save` format made in the job
/// from the static busybox, and `docker run` runs it as PID 1 of its own PID namespace.
#[test]
fn workload_docker_load_and_run_an_image_made_in_the_job() -> Result<()> {
    let out = battery()?.section("docker")?;
    expect(out, "WL-DOCKER-SERVER", "linux/amd64")?;
    expect(out, "WL-DOCKER-INFO", "overlay2 cgroup-v2")?;
    ensure!(
        out.contains("Loaded image: kiln-wl/busybox:1"),
        "docker load did not load the image:\n{out}"
    );
    expect(out, "WL-DOCKER-LOAD-RC", "0")?;
    expect(out, "WL-DOCKER-RUN", "busybox in a container, pid 1")
}

/// `docker build` of a two-line Dockerfile (FROM the loaded image, one RUN step), and a
/// container of the new image shows what the RUN step wrote.
#[test]
fn workload_docker_build_a_two_line_dockerfile() -> Result<()> {
    let out = battery()?.section("docker")?;
    expect(out, "WL-DOCKER-BUILD-RC", "0")?;
    expect(out, "WL-DOCKER-BUILT", "built by a RUN step, pid 1")
}

/// A container reaches a server on the test-bed host's side of the VM's TAP through
/// Docker's bridge and the NAT in the guest: it fetches the random token the test bed
/// served, from an address of Docker's bridge (which the test-bed host has no route to, so
/// the answer came back only through the guest's masquerading).
#[test]
fn workload_docker_container_reaches_the_tap_side_through_bridge_and_nat() -> Result<()> {
    let battery = battery()?;
    let out = battery.section("docker")?;
    let token = value(&battery.console, "WL-HOST-TOKEN")
        .filter(|t| t.starts_with("kiln-") && t.len() > "kiln-".len())
        .ok_or_else(|| anyhow::anyhow!("no host token:\n{}", battery.console))?;
    // "<token> from 2: eth0    inet 172.17.0.2/16 brd …" (busybox `ip -o`).
    let got = value(out, "WL-DOCKER-NET").unwrap_or_default();
    let (fetched, from) = got.split_once(" from ").unwrap_or((got, ""));
    ensure!(
        fetched == token,
        "the container fetched {fetched:?}, the test bed served {token:?}:\n{out}"
    );
    let inet = from
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .unwrap_or("");
    let addr: std::net::Ipv4Addr = inet
        .split('/')
        .next()
        .unwrap_or("")
        .parse()
        .map_err(|e| anyhow::anyhow!("the container's address {from:?}: {e}\n{out}"))?;
    ensure!(
        addr.octets()[..2] == [172, 17],
        "the container should sit on Docker's default bridge (172.17.0.0/16), not {addr}:\n{out}"
    );
    ensure!(
        !battery.console.contains("WL-TAP-FAILED"),
        "the TAP was not set up:\n{}",
        battery.console
    );
    Ok(())
}

/// Without Docker in the image, `docker` is the shell's usual "not found" (127); a job
/// that asks for Docker (`--docker`) in such an image fails before its script with one
/// error line from kiln.
#[test]
fn workload_docker_absent_is_not_found_and_asking_for_it_is_one_error_line() -> Result<()> {
    let out = battery()?.section("docker-absent")?;
    ensure!(
        value(out, "WL-NODOCKER-STDERR").is_some_and(|e| e.ends_with("docker: not found")),
        "`docker` without Docker should be the shell's \"not found\":\n{out}"
    );
    expect(out, "WL-NODOCKER-RC", "127")?;
    expect(out, "WL-NODOCKER-EXIT", "127")?;
    expect(out, "WL-ASKS-EXIT", "1")?;
    expect(out, "WL-ASKS-STDOUT", "")?;
    expect(out, "WL-ASKS-STDERR-LINES", "1")?;
    let line = value(out, "WL-ASKS-STDERR").unwrap_or_default();
    ensure!(
        line.starts_with("kiln: error: --docker: this image has no dockerd"),
        "the error line: {line:?}\n{out}"
    );
    Ok(())
}
