//! Docs that cannot drift from the product: every link in README.md and docs/*.md
//! resolves (file and heading), and every `kiln`, `kiln-gitlab` and `cargo xtask` command
//! line in README.md's code blocks names subcommands and flags that exist, as their
//! `--help` shows them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::CommandFactory;

/// The Markdown files whose links are checked: README.md and docs/*.md.
pub fn markdown_files(root: &Path) -> Result<Vec<PathBuf>> {
    let mut files = vec![root.join("README.md")];
    let docs = root.join("docs");
    let entries =
        std::fs::read_dir(&docs).with_context(|| format!("cannot list {}", docs.display()))?;
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "md") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Links in `file` (relative to `root` in messages) that do not resolve: a missing file,
/// or a `#heading` that the target page does not have.
pub fn broken_links(root: &Path, file: &Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let shown = file
        .strip_prefix(root)
        .unwrap_or(file)
        .display()
        .to_string();
    let dir = file.parent().unwrap_or(root);
    let mut broken = Vec::new();
    for (line, target) in links(&text) {
        if target.contains("://") || target.starts_with("mailto:") {
            continue;
        }
        let (path, anchor) = match target.split_once('#') {
            Some((p, a)) => (p, Some(a)),
            None => (target.as_str(), None),
        };
        let resolved = if path.is_empty() {
            file.to_path_buf()
        } else {
            dir.join(path)
        };
        if !resolved.exists() {
            broken.push(format!("{shown}:{line}: {target}: no such file"));
            continue;
        }
        if let Some(anchor) = anchor {
            let page = std::fs::read_to_string(&resolved).unwrap_or_default();
            if !heading_slugs(&page).contains(anchor) {
                broken.push(format!(
                    "{shown}:{line}: {target}: no heading #{anchor} there"
                ));
            }
        }
    }
    Ok(broken)
}

/// `(line number, target)` of each inline link or image outside code.
fn links(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (i, line) in prose_lines(text) {
        let mut rest = line.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let Some(end) = after.find(')') else { break };
            let target = after[..end].trim();
            // `[text](target "title")`
            let target = target.split_whitespace().next().unwrap_or("");
            if !target.is_empty() {
                out.push((i, target.to_string()));
            }
            rest = &after[end..];
        }
    }
    out
}

/// The lines of `text` outside fenced code blocks, numbered from 1, with inline code spans
/// blanked out.
fn prose_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut fenced = false;
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced || line.starts_with("    ") {
            continue;
        }
        let mut prose = String::new();
        for (n, part) in line.split('`').enumerate() {
            if n % 2 == 0 {
                prose.push_str(part);
            }
        }
        out.push((i + 1, prose));
    }
    out
}

/// GitHub's anchors for the headings of a Markdown page: lower case, spaces to `-`, other
/// punctuation but `-` and `_` dropped.
fn heading_slugs(page: &str) -> BTreeSet<String> {
    prose_lines_raw(page)
        .filter_map(|line| {
            let title = line.strip_prefix('#')?.trim_start_matches('#').trim();
            Some(
                title
                    .to_lowercase()
                    .chars()
                    .filter_map(|c| match c {
                        ' ' => Some('-'),
                        c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                        _ => None,
                    })
                    .collect(),
            )
        })
        .collect()
}

/// The lines outside fenced code blocks, as written.
fn prose_lines_raw(text: &str) -> impl Iterator<Item = &str> {
    let mut fenced = false;
    text.lines().filter(move |line| {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            return false;
        }
        !fenced
    })
}

/// A command line shown in the README, split into words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shown {
    pub line: usize,
    pub words: Vec<String>,
}

/// The programs whose command lines are checked.
const PROGRAMS: &[&str] = &["kiln", "kiln-gitlab", "cargo"];

/// Every command line in `text`'s code (fenced blocks other than toml/yaml/json, and
/// indented blocks) that runs `kiln`, `kiln-gitlab` or `cargo xtask`, with `\` continuations
/// joined, a leading `sudo` and `$ ` prompt dropped, and the words after a shell operator
/// or comment left out.
pub fn shown_commands(text: &str) -> Vec<Shown> {
    let mut out = Vec::new();
    let mut fence: Option<String> = None;
    let mut pending: Option<(usize, String)> = None;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if let Some(info) = trimmed.strip_prefix("```") {
            fence = match fence {
                Some(_) => None,
                None => Some(info.trim().to_string()),
            };
            continue;
        }
        let code = match &fence {
            Some(info) if ["toml", "yaml", "yml", "json", "text"].contains(&info.as_str()) => None,
            Some(_) => Some(line),
            None => line.strip_prefix("    "),
        };
        let Some(code) = code else {
            pending = None;
            continue;
        };
        let (start, mut joined) = pending.take().unwrap_or((i + 1, String::new()));
        joined.push_str(code.trim());
        if let Some(head) = joined.strip_suffix('\\') {
            pending = Some((start, format!("{head} ")));
            continue;
        }
        if let Some(words) = command_words(&joined) {
            out.push(Shown { line: start, words });
        }
    }
    out
}

fn command_words(line: &str) -> Option<Vec<String>> {
    let line = line.trim().trim_start_matches("$ ");
    let mut words: Vec<String> = Vec::new();
    for word in line.split_whitespace() {
        if word.starts_with('#') || ["|", "||", "&&", ";", "&", ">", "2>", "<"].contains(&word) {
            break;
        }
        words.push(word.trim_matches(|c| c == '\'' || c == '"').to_string());
    }
    if words.first().is_some_and(|w| w == "sudo") {
        words.remove(0);
    }
    let program = words.first()?;
    if !PROGRAMS.contains(&program.as_str()) {
        return None;
    }
    if program == "cargo" {
        if words.get(1).map(String::as_str) != Some("xtask") {
            return None;
        }
        words.remove(0);
        words[0] = "cargo xtask".into();
    }
    Some(words)
}

/// How to get a program's help: `kiln` and `kiln-gitlab` are run (`… --help`); `cargo
/// xtask`'s is this binary's own command line.
pub trait HelpSource {
    /// The `--help` text of `program` with the subcommand path `path`.
    fn help(&self, program: &str, path: &[String]) -> Result<String>;
}

/// Runs the given `kiln` and `kiln-gitlab` binaries.
pub struct Binaries {
    pub kiln: PathBuf,
    pub kiln_gitlab: PathBuf,
}

impl HelpSource for Binaries {
    fn help(&self, program: &str, path: &[String]) -> Result<String> {
        if program == "cargo xtask" {
            let mut cmd = crate::Cli::command();
            for sub in path {
                cmd = cmd
                    .find_subcommand(sub)
                    .cloned()
                    .with_context(|| format!("cargo xtask has no subcommand {sub}"))?;
            }
            return Ok(cmd.render_long_help().to_string());
        }
        let bin = match program {
            "kiln" => &self.kiln,
            "kiln-gitlab" => &self.kiln_gitlab,
            other => bail!("no help source for {other}"),
        };
        let out = Command::new(bin)
            .args(path)
            .arg("--help")
            .output()
            .with_context(|| format!("running {}", bin.display()))?;
        if !out.status.success() {
            bail!(
                "`{program} {} --help` failed: {}",
                path.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// The subcommand names a clap help text lists under `Commands:`.
fn subcommands(help: &str) -> BTreeSet<String> {
    help.lines()
        .skip_while(|l| l.trim() != "Commands:")
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .map(|w| w.trim_end_matches(',').to_string())
        .collect()
}

/// Whether `help` shows option `flag` (`--name`), not only a longer one that starts so.
fn has_flag(help: &str, flag: &str) -> bool {
    help.match_indices(flag).any(|(at, _)| {
        let before = help[..at].chars().next_back();
        let after = help[at + flag.len()..].chars().next();
        !before.is_some_and(|c| c.is_alphanumeric() || c == '-')
            && !after.is_some_and(|c| c.is_alphanumeric() || c == '-' || c == '_')
    })
}

/// Whether `help` shows `flag` with a value (`--flag <VALUE>`).
fn takes_value(help: &str, flag: &str) -> bool {
    help.match_indices(flag).any(|(at, _)| {
        let after = &help[at + flag.len()..];
        after.starts_with(" <") || after.starts_with("=<") || after.starts_with(" [")
    })
}

/// What is wrong with one shown command line: a subcommand or flag its help does not
/// know. Words after `--` belong to another program (the guest's command) and are not
/// checked.
pub fn check_command(shown: &Shown, helps: &dyn HelpSource) -> Result<Vec<String>> {
    let program = &shown.words[0];
    let mut path: Vec<String> = Vec::new();
    let mut help = helps.help(program, &path)?;
    let mut problems = Vec::new();
    let mut words = shown.words[1..].iter();
    while let Some(word) = words.next() {
        if word == "--" {
            break;
        }
        if let Some(flag) = word.strip_prefix("--") {
            let (name, inline_value) = match flag.split_once('=') {
                Some((name, _)) => (name, true),
                None => (flag, false),
            };
            let flag = format!("--{name}");
            if has_flag(&help, &flag) {
                // `--config PATH`: PATH is the flag's, not a subcommand.
                if !inline_value && takes_value(&help, &flag) {
                    words.next();
                }
            } else {
                problems.push(format!(
                    "README.md:{}: `{}`: `{program} {}` has no {flag}",
                    shown.line,
                    shown.words.join(" "),
                    path.join(" ")
                ));
            }
            continue;
        }
        let subs = subcommands(&help);
        if subs.contains(word.as_str()) {
            path.push(word.clone());
            help = helps.help(program, &path)?;
        } else if !subs.is_empty() && (path.is_empty() || help.contains("<COMMAND>")) {
            // Where a subcommand is due (clap's usage says `<COMMAND>`), any other word
            // (flag values aside, skipped above) is a subcommand that does not exist.
            let at = format!("{program} {}", path.join(" "));
            problems.push(format!(
                "README.md:{}: `{}`: `{}` has no subcommand {word}",
                shown.line,
                shown.words.join(" "),
                at.trim_end()
            ));
            break;
        }
    }
    Ok(problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Help texts in clap's shape, for the parser's own tests.
    struct Fake;

    impl HelpSource for Fake {
        fn help(&self, program: &str, path: &[String]) -> Result<String> {
            Ok(match (program, path.join(" ").as_str()) {
                ("kiln", "") => "Usage: kiln <COMMAND>\n\nCommands:\n  run   Boot\n  exec  Run\n  help  Print\n\nOptions:\n      --config <PATH>\n  -h, --help\n".into(),
                ("kiln", "run") => "Usage: kiln run [OPTIONS]\n\nOptions:\n      --kernel <PATH>\n      --vsock <UDS>\n      --no-rng\n".into(),
                ("kiln", "exec") => "Usage: kiln exec --vsock <UDS> -- <CMD>...\n\nOptions:\n      --vsock <UDS>\n".into(),
                ("kiln", "ctl") => "Usage: kiln ctl --api <PATH> <COMMAND>\n\nCommands:\n  status  Ask\n\nOptions:\n      --api <PATH>\n".into(),
                ("kiln", "ctl status") => "Usage: kiln ctl status\n".into(),
                (p, s) => bail!("no help for {p} {s}"),
            })
        }
    }

    fn problems(text: &str) -> Vec<String> {
        shown_commands(text)
            .iter()
            .flat_map(|s| check_command(s, &Fake).unwrap())
            .collect()
    }

    #[test]
    fn shown_commands_are_found_in_code_only() {
        let text = "Run kiln run --nothing in prose.\n\n```sh\nkiln run --kernel vmlinux \\\n  --vsock v.sock   # a comment --nope\necho hi\n```\n\n```toml\nkiln = \"x\"\n```\n\n    cargo xtask demo    # boot\n";
        let shown = shown_commands(text);
        assert_eq!(shown.len(), 2, "{shown:?}");
        assert_eq!(shown[0].line, 4);
        assert_eq!(
            shown[0].words,
            ["kiln", "run", "--kernel", "vmlinux", "--vsock", "v.sock"]
        );
        assert_eq!(shown[1].words, ["cargo xtask", "demo"]);
    }

    #[test]
    fn known_flags_pass_and_the_guests_command_is_not_checked() {
        let text = "```sh\nkiln run --kernel k --vsock=v --no-rng\nkiln exec --vsock v -- ls --color\nkiln --config c.toml run --kernel k\n```\n";
        assert_eq!(problems(text), Vec::<String>::new());
    }

    #[test]
    fn a_planted_flag_or_subcommand_that_does_not_exist_fails() {
        let text =
            "```sh\nkiln run --kernel k --no-such-flag\nkiln run --vsoc v\nkiln fly --high\n```\n";
        let found = problems(text);
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(found[0].contains("has no --no-such-flag"), "{found:?}");
        assert!(found[1].contains("has no --vsoc"), "{found:?}");
        assert!(found[2].contains("has no subcommand fly"), "{found:?}");
    }

    #[test]
    fn a_planted_broken_link_or_anchor_fails() {
        let dir = std::env::temp_dir().join(format!("xtask-docs-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("docs")).unwrap();
        std::fs::write(dir.join("docs/a.md"), "# A page\n\n## Some heading\n").unwrap();
        let readme = dir.join("README.md");
        std::fs::write(
            &readme,
            "[ok](docs/a.md) [ok](docs/a.md#some-heading) [web](https://example.com)\n\
             `[code](docs/none.md)`\n[gone](docs/none.md) [bad](docs/a.md#no-heading)\n",
        )
        .unwrap();
        let broken = broken_links(&dir, &readme).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            broken,
            [
                "README.md:3: docs/none.md: no such file",
                "README.md:3: docs/a.md#no-heading: no heading #no-heading there"
            ]
        );
    }

    #[test]
    fn every_link_in_the_readme_and_docs_resolves() {
        let root = crate::repo_root();
        let mut broken = Vec::new();
        for file in markdown_files(&root).unwrap() {
            broken.extend(broken_links(&root, &file).unwrap());
        }
        assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
    }

    /// Runs `--help` of every subcommand the README's command lines use (kiln and
    /// kiln-gitlab as built for the test bed; cargo xtask's own command line).
    #[test]
    fn every_command_line_in_the_readme_exists() {
        let root = crate::repo_root();
        let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
        let shown = shown_commands(&readme);
        assert!(
            shown.iter().any(|s| s.words[0] == "kiln"),
            "no kiln command lines found in README.md: {shown:?}"
        );
        let bins = kiln_tests::artifacts::static_binaries().unwrap();
        let helps = Binaries {
            kiln: bins.kiln,
            kiln_gitlab: bins.kiln_gitlab,
        };
        let mut problems = Vec::new();
        for s in &shown {
            problems.extend(check_command(s, &helps).unwrap());
        }
        assert!(
            problems.is_empty(),
            "README.md shows commands that do not exist:\n{}",
            problems.join("\n")
        );
    }
}
