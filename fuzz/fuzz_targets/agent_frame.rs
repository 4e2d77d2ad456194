//! The guest agent's frame decoder on arbitrary bytes: `read_frame` until it errors or the
//! stream ends. It must never panic, and every frame it accepts must survive a round trip
//! (`write_frame` then `read_frame` gives the same frame back).
//!
//! The first input byte picks how the reader splits the stream (1..=16 bytes per `read`,
//! or whole), so the "keep reading until the header and body are whole" paths run too.

#![no_main]

use std::io::{Cursor, Read};

use kiln_agent::protocol::{read_frame, write_frame, ProtocolError};
use libfuzzer_sys::fuzz_target;

/// A reader that returns at most `step` bytes per call.
struct Trickle<'a> {
    data: &'a [u8],
    step: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.step).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&mode, data)) = input.split_first() else {
        return;
    };
    let step = match mode & 0x1f {
        0 => usize::MAX,
        n => usize::from(n & 0x0f) + 1,
    };
    let mut reader = Trickle { data, step };
    // Each frame consumes at least its 6-byte header, so this ends.
    loop {
        match read_frame(&mut reader) {
            Ok(Some(frame)) => {
                let mut bytes = Vec::new();
                match write_frame(&mut bytes, &frame) {
                    Ok(()) => {}
                    // A JSON body at the size limit may re-encode a little longer (a field
                    // the input left to its default is written out): not a bug.
                    Err(ProtocolError::TooLarge { .. }) => continue,
                    Err(e) => panic!("a decoded frame does not re-encode: {e}: {frame:?}"),
                }
                let again = read_frame(&mut Cursor::new(&bytes))
                    .unwrap_or_else(|e| panic!("a re-encoded frame does not decode: {e}"))
                    .expect("a re-encoded frame is not empty");
                assert_eq!(again, frame, "round trip changed the frame");
            }
            Ok(None) | Err(_) => break,
        }
    }
});
