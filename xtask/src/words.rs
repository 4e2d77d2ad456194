//! The repository describes the product, not how it was made: this check finds
//! development-log wording in tracked files — numbered or "this" work sessions, numbered
//! tracker issues and acceptance points, and remarks about who else loaded the machine
//! (the patterns are in `offence`; the tests plant examples). History belongs in git and
//! CHANGELOG.md, which is exempt. An SSH or terminal session, `setsid` and "feature acceptance" are fine:
//! the rules look at the words around "session", "issue" and "acceptance", not the words
//! alone.
//!
//! Run by the `tracked_files_say_nothing_about_how_they_were_made` test (so by
//! `cargo xtask test`) and by `cargo xtask docs-check`, which lists every offending line.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Files the check skips: the changelog (history is its subject) and this file, whose
/// rules and tests must spell out what they look for.
const EXEMPT: &[&str] = &["CHANGELOG.md", "xtask/src/words.rs"];

/// One offending line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub path: String,
    pub line: usize,
    pub text: String,
    /// What the line says that it should not (the matched words).
    pub rule: &'static str,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}: {} [{}]",
            self.path,
            self.line,
            self.text.trim(),
            self.rule
        )
    }
}

/// Every finding in the files `git ls-files` lists under `root` (text files only).
pub fn scan_repo(root: &Path) -> Result<Vec<Finding>> {
    let out = Command::new("git")
        .current_dir(root)
        .args(["ls-files", "-z"])
        .output()
        .context("could not run git ls-files (the check needs a git checkout)")?;
    if !out.status.success() {
        bail!(
            "git ls-files failed in {}: {}",
            root.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let mut findings = Vec::new();
    for path in out.stdout.split(|&b| b == 0).filter(|p| !p.is_empty()) {
        let path = String::from_utf8_lossy(path).into_owned();
        if EXEMPT.contains(&path.as_str()) {
            continue;
        }
        // A file deleted in the work tree but not yet in the index is not there to check.
        let Ok(bytes) = std::fs::read(root.join(&path)) else {
            continue;
        };
        // Binary files (fuzz corpora, images) hold no prose.
        let Ok(text) = String::from_utf8(bytes) else {
            continue;
        };
        findings.extend(scan_text(&path, &text));
    }
    Ok(findings)
}

/// Every finding in `text`, reported as file `path`.
///
/// A phrase wrapped across two lines ("the acceptance" / "test boots") is reported on its
/// first line: each line is read with the first words of the next one appended.
pub fn scan_text(path: &str, text: &str) -> Vec<Finding> {
    let lines: Vec<&str> = text.lines().collect();
    lines
        .iter()
        .enumerate()
        .filter_map(|(i, line)| {
            let rule = offence(line).or_else(|| {
                let next = lines.get(i + 1)?;
                let head: Vec<&str> = next
                    .trim_start_matches(|c: char| c.is_whitespace() || "/!#*>-".contains(c))
                    .split_whitespace()
                    .take(3)
                    .collect();
                let head = head.join(" ");
                // Only what the two lines say together: the next line's own words are
                // reported on that line.
                if offence(&head).is_some() {
                    return None;
                }
                offence(&format!("{line} {head}"))
            })?;
            Some(Finding {
                path: path.to_string(),
                line: i + 1,
                text: line.to_string(),
                rule,
            })
        })
        .collect()
}

/// Words before "session(s)" that make it a work session rather than a terminal's.
const SESSION_QUALIFIERS: &[&str] = &[
    "this", "that", "last", "previous", "next", "earlier", "later", "one", "two", "three", "four",
    "five", "six", "same",
];

/// The first rule `line` breaks, if any.
fn offence(line: &str) -> Option<&'static str> {
    let lower = line.to_lowercase();
    let words = words(&lower);
    for (i, &(word, end)) in words.iter().enumerate() {
        let next = words.get(i + 1).map(|&(w, _)| w);
        let prev = i.checked_sub(1).map(|p| words[p].0);
        // The word followed by a number (after a space, a dash or `#`); a plural
        // followed by a count is not one.
        let rest = &lower[end..];
        let rest = rest
            .strip_prefix(' ')
            .or_else(|| rest.strip_prefix('-'))
            .unwrap_or("x");
        let next_is_number = rest
            .trim_start_matches('#')
            .starts_with(|c: char| c.is_ascii_digit());
        match word {
            "session" | "sessions" if next_is_number => return Some("session N"),
            "session" | "sessions" if prev.is_some_and(|p| SESSION_QUALIFIERS.contains(&p)) => {
                return Some("this/that/N sessions")
            }
            "issue" | "issues" if next_is_number => return Some("issue N"),
            "issue" if prev == Some("the") && next != Some("tracker") => return Some("the issue"),
            "acceptance" if next_is_number || lower[end..].starts_with(':') => {
                return Some("acceptance N")
            }
            "acceptance" if prev == Some("the") && next == Some("test") => {
                return Some("the acceptance test")
            }
            "build" if prev == Some("to") && next_is_number => return Some("what to build N"),
            "average" if prev == Some("load") => return Some("load average"),
            "engineer" | "engineers" => return Some("engineers"),
            "other" if prev == Some("with") && i >= 2 && words[i - 2].0 == "shared" => {
                return Some("shared with others")
            }
            "machine" | "host" if matches!(prev, Some("loaded" | "busy")) => {
                return Some("loaded machine")
            }
            _ => {}
        }
    }
    None
}

/// The runs of letters and digits in `lower`, each with the byte offset where it ends.
fn words(lower: &str) -> Vec<(&str, usize)> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in lower.char_indices() {
        match (c.is_alphanumeric(), start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                out.push((&lower[s..i], i));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        out.push((&lower[s..], lower.len()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(line: &str) -> Option<&'static str> {
        offence(line)
    }

    #[test]
    fn a_planted_session_number_is_found_with_its_place() {
        let text = "fn main() {}\n// Measured in session 3 on a quiet host.\n";
        let found = scan_text("src/lib.rs", text);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].line, 2);
        assert_eq!(found[0].rule, "session N");
        assert_eq!(
            found[0].to_string(),
            "src/lib.rs:2: // Measured in session 3 on a quiet host. [session N]"
        );
    }

    #[test]
    fn a_phrase_wrapped_over_two_lines_is_found_on_its_first() {
        let text = "/// builds the image the acceptance\n/// test boots, and tar\n";
        let found = scan_text("x.rs", text);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!((found[0].line, found[0].rule), (1, "the acceptance test"));
        let text = "// Measured in\n// session 3\n";
        let found = scan_text("x.rs", text);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].line, 2);
    }

    #[test]
    fn development_log_wording_is_found() {
        for line in [
            "Session 3 ran it",
            "the session-5 bench figures",
            "over sessions 1–3",
            "as this session showed",
            "over two sessions",
            "(issue 4, acceptance 1 and 3)",
            "see issue #6",
            "Acceptance: a job that runs git",
            "what the issue asks for",
            "the debootstrap image the acceptance test boots",
            "(issue 7, what to build 2)",
            "load average 6–9 on 2 cores",
            "shared with two other engineers' builds",
            "the machine was shared with other builds",
            "restores were seen up to 1.2 boots on a loaded host",
        ] {
            assert!(rule(line).is_some(), "not caught: {line:?}");
        }
    }

    #[test]
    fn product_wording_passes() {
        for line in [
            "Starts the process in a session (and process group) of its own",
            "an SSH session or a terminal session is fine",
            "`setsid sh -c 'sleep 4'`",
            "The device status state machine: feature acceptance, activation and reset.",
            "The machine's load moves boot times a lot",
            "run it on an otherwise idle machine",
            "file an issue on the tracker",
            "issue a shutdown request",
            "sessions: 0",
        ] {
            assert_eq!(rule(line), None, "false positive: {line:?}");
        }
    }

    /// The check over the whole checkout. It fails, listing every line, until no tracked
    /// file (CHANGELOG.md aside) tells the project's history.
    #[test]
    fn tracked_files_say_nothing_about_how_they_were_made() {
        let findings = scan_repo(&crate::repo_root()).unwrap();
        let list: Vec<String> = findings.iter().map(ToString::to_string).collect();
        assert!(
            findings.is_empty(),
            "{} line(s) describe how kiln was made rather than what it is; reword them \
             (history goes in git and CHANGELOG.md):\n{}",
            findings.len(),
            list.join("\n")
        );
    }
}
