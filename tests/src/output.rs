//! Reading what scripts and kiln printed: `KEY=value` lines, sections, kiln's `--json` line.
//!
//! Console text may carry `\r` (a guest's tty) and kernel messages between lines, so every
//! helper works line by line and trims whitespace.

/// The value of the last line of the form `KEY=value` (after trimming), if any.
pub fn value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .rev()
        .filter_map(|line| line.trim().strip_prefix(key)?.strip_prefix('='))
        .map(str::trim)
        .next()
}

/// [`value`] parsed as a number.
pub fn number<T: std::str::FromStr>(text: &str, key: &str) -> Option<T> {
    value(text, key)?.parse().ok()
}

/// The text after the line `KEY=name` up to the next `KEY=` line (or the end), for each
/// `name`: lets one script report several cases (`echo CASE=vcpus-1; …`).
pub fn sections<'a>(text: &'a str, key: &str) -> Vec<(&'a str, &'a str)> {
    let prefix = format!("{key}=");
    let mut found: Vec<(&str, usize, usize)> = Vec::new(); // name, body start, line start
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if let Some(name) = line.trim().strip_prefix(&prefix) {
            found.push((name, offset + line.len(), offset));
        }
        offset += line.len();
    }
    let ends = found.iter().skip(1).map(|f| f.2).chain([text.len()]);
    found
        .iter()
        .zip(ends)
        .map(|(&(name, start, _), end)| (name, &text[start..end]))
        .collect()
}

/// The last line that is a JSON object: what `kiln … --json` prints last on stdout.
pub fn last_json(text: &str) -> Option<serde_json::Value> {
    text.lines()
        .rev()
        .map(str::trim)
        .filter(|l| l.starts_with('{') && l.ends_with('}'))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(serde_json::Value::is_object)
}

/// The kernel's reports of a bug it ran into, from console or `dmesg` text: the first line
/// of each `WARN()` ("WARNING: CPU: 0 PID: 0 at arch/x86/…") and `BUG:` ("BUG: kernel NULL
/// pointer dereference", "BUG: scheduling while atomic"). Only lines whose message starts
/// so count (after the `[ seconds]` timestamp): "Speculative Return Stack Overflow:
/// WARNING: See …" is advice, not a splat.
pub fn kernel_splats(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|line| {
            let message = match line.strip_prefix('[') {
                Some(rest) => rest.split_once(']').map_or(rest, |(_, m)| m),
                None => line,
            };
            let message = message.trim_start();
            message.starts_with("WARNING:") || message.starts_with("BUG:")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_found_line_by_line() {
        let text = "KILN-NPROC=1\r\n[ 0.1] noise\nKILN-NPROC=2\nKILN-NPROCS=9\n  KILN-MEM=12 \n";
        assert_eq!(value(text, "KILN-NPROC"), Some("2"));
        assert_eq!(number::<u64>(text, "KILN-MEM"), Some(12));
        assert_eq!(value(text, "MISSING"), None);
    }

    #[test]
    fn sections_split_on_the_key() {
        let text = "pre\nCASE=a\none\nCASE=b\ntwo\nthree\n";
        assert_eq!(
            sections(text, "CASE"),
            [("a", "one\n"), ("b", "two\nthree\n")]
        );
        assert!(sections("nothing\n", "CASE").is_empty());
    }

    #[test]
    fn the_last_json_object_wins() {
        let text =
            "{\"a\":1}\nguest says {not json}\n{\"result\":\"reset\",\"boot_ms\":12.5}\r\nlog\n";
        let json = last_json(text).unwrap();
        assert_eq!(json["boot_ms"].as_f64(), Some(12.5));
        assert!(last_json("[1]\n").is_none());
    }

    #[test]
    fn kernel_splats_are_warn_and_bug_lines() {
        let log = "[    0.000000] Linux version 6.12\n\
                   [   11.811453] XSAVE consistency problem: size 832 != kernel_size 576\n\
                   [   11.819967] WARNING: CPU: 0 PID: 0 at arch/x86/kernel/fpu/xstate.c:606 fpu__init_system_xstate+0x85a/0xb19\n\
                   [   11.754571] Speculative Return Stack Overflow: WARNING: See https://kernel.org/doc\n\
                   [   35.881491] i8042: Warning: Keylock active\n\
                   BUG: kernel NULL pointer dereference, address: 0000000000000000\r\n\
                   [    2.1] bugs fixed: none\n";
        assert_eq!(
            kernel_splats(log),
            [
                "[   11.819967] WARNING: CPU: 0 PID: 0 at arch/x86/kernel/fpu/xstate.c:606 fpu__init_system_xstate+0x85a/0xb19",
                "BUG: kernel NULL pointer dereference, address: 0000000000000000",
            ]
        );
        assert!(kernel_splats("[ 0.1] all well\n").is_empty());
    }
}
