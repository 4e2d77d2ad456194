//! Shell functions test-bed scripts share (prepend [`PRELUDE`] to a script).

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
