//! Shell pieces test-bed scripts share: functions in [`PRELUDE`] (prepend it to a script)
//! and lines to paste in where a script waits for its guest agent, [`WAIT_AGENT`].

/// - `wait_exec SOCK PID`: bounded retries of `kiln exec -- true` on vsock socket SOCK
///   while process PID lives; prints `yes` once the guest agent answers, else `no`. Each
///   attempt is bounded too: right after a restore the guest may drop a connection.
/// - `now_us`: the wall clock in microseconds (busybox `date` has no sub-second format,
///   `adjtimex` has), reading `adjtimex` output on stdin: `adjtimex | now_us`.
pub const PRELUDE: &str = r#"
wait_exec() {
  n=0
  while [ $n -lt 600 ] && kill -0 $2 2>/dev/null; do
    if timeout 10 "$KILN" exec --vsock "$1" -- true 2>/dev/null; then echo yes; return; fi
    n=$((n + 1))
    sleep 0.1
  done
  echo no
}
now_us() { awk '/tv_sec/ { s = $2 } /tv_usec/ { u = $2 } END { printf "%d%06d\n", s, u }'; }
"#;

/// Script lines that wait for the guest agent of the VM a script just started with
/// `"$KILN" run … --vsock "$V" 2> run.err &` and `vm=$!`: the agent is ready once an exec
/// goes through. Bounded: after 600 tries 0.1 s apart, or once the VM has ended, they print
/// `agent not ready` and `run.err` and exit 1. Uses (and overwrites) `i`.
pub const WAIT_AGENT: &str = r#"i=0
until "$KILN" exec --vsock "$V" -- true 2>/dev/null; do
  i=$((i + 1))
  if [ $i -ge 600 ] || ! kill -0 $vm 2>/dev/null; then echo "agent not ready"; cat run.err; exit 1; fi
  sleep 0.1
done"#;
