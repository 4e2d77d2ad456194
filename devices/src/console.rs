//! The serial console's output path: where the guest's console text goes, and the watch for a
//! kernel panic in it.
//!
//! The UART hands over one byte per guest `outb` and asks for a flush after every byte.
//! [`ConsoleOutput`] passes the bytes straight to the sink the VMM chose (stdout, a file) but
//! flushes only at the end of a line, so a file sink can be buffered without job output
//! sitting in the buffer.
//!
//! On the way through it keeps the current line (at most [`MAX_LINE`] bytes of it, so a guest
//! that never sends a newline cannot grow host memory) and remembers the first line that
//! contains [`PANIC_MARKER`]. With `panic=-1` on its command line a panicking Linux resets the
//! machine; a reset then looks exactly like a reboot, and [`PanicWatch`] is how the VMM tells
//! the two apart.
//!
//! The console is data, not a log: a sink that fails must not stop the guest, so write errors
//! are swallowed and reported once with `tracing::warn!`.

use std::io::{self, Write};
use std::sync::{Arc, OnceLock};

/// The text Linux prints when it panics (`panic()` in kernel/panic.c).
pub const PANIC_MARKER: &str = "Kernel panic - not syncing";

/// How much of one console line is kept for panic detection; the rest of a longer line still
/// goes to the sink but is not inspected.
pub const MAX_LINE: usize = 512;

/// A cheap, cloneable view of whether the guest kernel has panicked.
#[derive(Debug, Clone, Default)]
pub struct PanicWatch(Arc<OnceLock<String>>);

impl PanicWatch {
    /// The first console line that contained [`PANIC_MARKER`], trimmed, if one has been seen.
    pub fn panic_line(&self) -> Option<String> {
        self.0.get().cloned()
    }

    fn record(&self, line: String) {
        // Only the first panic line counts; later ones (the "---[ end Kernel panic" trailer)
        // are ignored.
        let _ = self.0.set(line);
    }
}

/// The `Write` the UART writes into: forwards to the sink, flushes per line, watches for a
/// panic.
pub struct ConsoleOutput {
    sink: Box<dyn Write + Send>,
    /// The start of the current line (without its newline), at most `MAX_LINE` bytes.
    line: Vec<u8>,
    watch: PanicWatch,
    sink_failed: bool,
}

impl ConsoleOutput {
    /// Send console text to `sink`.
    pub fn new(sink: Box<dyn Write + Send>) -> Self {
        Self {
            sink,
            line: Vec::with_capacity(MAX_LINE),
            watch: PanicWatch::default(),
            sink_failed: false,
        }
    }

    /// A handle that reports a panic seen on this console.
    pub fn panic_watch(&self) -> PanicWatch {
        self.watch.clone()
    }

    /// Flush the sink now, e.g. before the VMM exits with a partial line pending.
    pub fn flush_sink(&mut self) {
        if let Err(e) = self.sink.flush() {
            self.sink_error(&e);
        }
    }

    fn sink_error(&mut self, e: &io::Error) {
        if !self.sink_failed {
            self.sink_failed = true;
            tracing::warn!(
                "serial console output failed: {e}; guest console text is being lost \
                 (further errors are not reported)"
            );
        }
    }

    fn end_line(&mut self) {
        if self.watch.0.get().is_none() && contains(&self.line, PANIC_MARKER.as_bytes()) {
            let text = String::from_utf8_lossy(&self.line);
            self.watch.record(text.trim().to_owned());
        }
        self.line.clear();
    }

    fn take(&mut self, buf: &[u8]) {
        if let Err(e) = self.sink.write_all(buf) {
            self.sink_error(&e);
        }
        let mut saw_newline = false;
        for &b in buf {
            if b == b'\n' {
                self.end_line();
                saw_newline = true;
            } else if self.line.len() < MAX_LINE {
                self.line.push(b);
            }
        }
        if saw_newline {
            self.flush_sink();
        }
    }
}

impl Write for ConsoleOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.take(buf);
        Ok(buf.len())
    }

    /// The UART flushes after every byte; flushing the sink that often would make a buffered
    /// sink pointless, so this does nothing and the sink is flushed at each newline instead.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A sink shared with the test: what was written, and how much of it had been flushed.
    #[derive(Clone, Default)]
    pub(crate) struct TestSink {
        pub(crate) data: Arc<Mutex<Vec<u8>>>,
        pub(crate) flushed: Arc<Mutex<usize>>,
    }

    impl TestSink {
        pub(crate) fn text(&self) -> String {
            String::from_utf8(self.data.lock().unwrap().clone()).unwrap()
        }
        pub(crate) fn flushed_len(&self) -> usize {
            *self.flushed.lock().unwrap()
        }
    }

    impl Write for TestSink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.data.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            *self.flushed.lock().unwrap() = self.data.lock().unwrap().len();
            Ok(())
        }
    }

    /// A sink that always fails.
    pub(crate) struct BrokenSink;
    impl Write for BrokenSink {
        fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
            Err(io::Error::new(io::ErrorKind::BrokenPipe, "gone"))
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::Error::new(io::ErrorKind::BrokenPipe, "gone"))
        }
    }

    fn bytewise(out: &mut ConsoleOutput, text: &[u8]) {
        for b in text {
            out.write_all(std::slice::from_ref(b)).unwrap();
            out.flush().unwrap();
        }
    }

    #[test]
    fn bytes_reach_the_sink_and_flush_at_newline() {
        let sink = TestSink::default();
        let mut out = ConsoleOutput::new(Box::new(sink.clone()));
        bytewise(&mut out, b"hello");
        assert_eq!(sink.text(), "hello");
        assert_eq!(sink.flushed_len(), 0, "no flush before the newline");
        bytewise(&mut out, b"\r\nwor");
        assert_eq!(sink.text(), "hello\r\nwor");
        assert_eq!(sink.flushed_len(), 7, "flushed through the newline");
        out.flush_sink();
        assert_eq!(sink.flushed_len(), 10);
    }

    #[test]
    fn panic_line_detected_across_single_byte_writes() {
        let sink = TestSink::default();
        let mut out = ConsoleOutput::new(Box::new(sink.clone()));
        let watch = out.panic_watch();
        bytewise(&mut out, b"[    0.5] Run /init as init process\r\n");
        assert_eq!(watch.panic_line(), None);

        let panic =
            b"[    0.6] Kernel panic - not syncing: Attempted to kill init! exitcode=0x100\r\n";
        bytewise(&mut out, &panic[..20]);
        assert_eq!(
            watch.panic_line(),
            None,
            "not reported before the line ends"
        );
        bytewise(&mut out, &panic[20..]);
        assert_eq!(
            watch.panic_line().as_deref(),
            Some("[    0.6] Kernel panic - not syncing: Attempted to kill init! exitcode=0x100")
        );

        // The trailer also contains the marker; the first line is the one that is kept.
        bytewise(
            &mut out,
            b"---[ end Kernel panic - not syncing: Attempted to kill init! ]---\n",
        );
        assert!(watch.panic_line().unwrap().starts_with("[    0.6]"));
        assert_eq!(sink.text().lines().count(), 3);
    }

    #[test]
    fn marker_split_between_lines_is_not_a_panic() {
        let mut out = ConsoleOutput::new(Box::new(io::sink()));
        let watch = out.panic_watch();
        out.write_all(b"Kernel panic\n - not syncing\n").unwrap();
        assert_eq!(watch.panic_line(), None);
    }

    #[test]
    fn long_lines_are_bounded() {
        let sink = TestSink::default();
        let mut out = ConsoleOutput::new(Box::new(sink.clone()));
        let watch = out.panic_watch();
        let long = vec![b'x'; 100_000];
        out.write_all(&long).unwrap();
        assert_eq!(out.line.len(), MAX_LINE);
        assert!(out.line.capacity() <= 2 * MAX_LINE);
        // A marker far past the kept prefix is not seen, but the text still reaches the sink.
        out.write_all(PANIC_MARKER.as_bytes()).unwrap();
        out.write_all(b"\n").unwrap();
        assert_eq!(watch.panic_line(), None);
        assert_eq!(
            sink.data.lock().unwrap().len(),
            100_000 + PANIC_MARKER.len() + 1
        );
        // The next line starts fresh.
        out.write_all(b"Kernel panic - not syncing: x\n").unwrap();
        assert_eq!(
            watch.panic_line().as_deref(),
            Some("Kernel panic - not syncing: x")
        );
    }

    #[test]
    fn broken_sink_does_not_fail_the_writer() {
        let mut out = ConsoleOutput::new(Box::new(BrokenSink));
        let watch = out.panic_watch();
        out.write_all(b"Kernel panic - not syncing: oops\n")
            .unwrap();
        out.flush().unwrap();
        out.flush_sink();
        assert!(out.sink_failed);
        // The watch still works without a sink.
        assert_eq!(
            watch.panic_line().as_deref(),
            Some("Kernel panic - not syncing: oops")
        );
    }
}
