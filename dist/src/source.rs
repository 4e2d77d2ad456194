//! What a build records about where it came from: the commit and its time (the changelog's
//! date, the archive's time stamps), the maintainer, and the Debian source packages whose
//! code the package carries.

use std::process::Command;

use anyhow::{bail, Context, Result};

/// The Debian packages whose contents go into the package: the static C library (in the
/// binaries), busybox (in the initramfs), the kernel source (the guest kernel).
const BUILT_FROM: &[&str] = &["libc6-dev", "busybox-static", "linux-source-6.12"];

#[derive(Debug, Clone)]
pub struct Source {
    /// The checkout's commit, abbreviated.
    pub commit: String,
    /// `$SOURCE_DATE_EPOCH`, else the commit's time: seconds since the epoch.
    pub epoch: i64,
    /// That time as RFC 5322 says (`Mon, 07 Dec 2026 19:29:32 +0000`).
    pub date: String,
    /// That day, `YYYY-MM-DD`.
    pub day: String,
    /// The years from the first commit's to that time's: `2026`, `2025-2026`.
    pub years: String,
    /// `$DEBFULLNAME <$DEBEMAIL>` if `$DEBEMAIL` is set, else the commit's author.
    pub maintainer: String,
    /// `source (= version)` of each of [`BUILT_FROM`].
    pub built_using: Vec<String>,
}

impl Source {
    pub fn describe() -> Result<Self> {
        let commit = git(&["rev-parse", "--short=12", "HEAD"])?;
        let epoch = match std::env::var("SOURCE_DATE_EPOCH") {
            Ok(s) => s
                .trim()
                .parse()
                .with_context(|| format!("SOURCE_DATE_EPOCH={s:?} is not a number"))?,
            Err(_) => git(&["log", "-1", "--format=%ct", "HEAD"])?
                .parse()
                .context("git log printed no commit time")?,
        };
        let maintainer = match std::env::var("DEBEMAIL").ok().filter(|e| !e.is_empty()) {
            Some(email) => match std::env::var("DEBFULLNAME").ok().filter(|n| !n.is_empty()) {
                Some(name) => format!("{name} <{email}>"),
                None => bail!("DEBEMAIL is set but DEBFULLNAME is not: set both, or neither"),
            },
            None => git(&["log", "-1", "--format=%an <%ae>", "HEAD"])?,
        };
        let first = git(&["log", "--max-parents=0", "--format=%ct", "HEAD"])?
            .lines()
            .filter_map(|l| l.trim().parse::<i64>().ok())
            .min()
            .unwrap_or(epoch);
        Ok(Source {
            years: years(first, epoch),
            commit,
            epoch,
            date: rfc5322(epoch),
            day: rfc5322_day(epoch),
            maintainer,
            built_using: built_using()?,
        })
    }
}

fn git(args: &[&str]) -> Result<String> {
    let out = crate::stdout_of(
        Command::new("git")
            .current_dir(kiln_tests::kernels::repo_root())
            .args(args),
        &format!(
            "git {} (the package is built from a git checkout of kiln)",
            args.join(" ")
        ),
    )?;
    Ok(out.trim().to_string())
}

fn built_using() -> Result<Vec<String>> {
    let out = Command::new("dpkg-query")
        .arg("-W")
        .arg("-f=${Package} ${source:Package} (= ${source:Version})\n")
        .args(BUILT_FROM)
        .output()
        .context("running dpkg-query: the package is built on Debian")?;
    let listed = String::from_utf8_lossy(&out.stdout);
    BUILT_FROM
        .iter()
        .map(|package| {
            listed
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{package} ")))
                .map(str::to_string)
                .with_context(|| {
                    format!("the Debian package {package} is not installed (cargo xtask setup installs it)")
                })
        })
        .collect()
}

fn rfc5322(epoch: i64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = epoch.div_euclid(86_400);
    let secs = epoch.rem_euclid(86_400);
    let (y, m, d) = kiln::civil::from_days(days);
    format!(
        "{}, {d:02} {} {y} {:02}:{:02}:{:02} +0000",
        // rem_euclid(7) is within 0..7, and a month within 1..=12.
        DAYS[usize::try_from(days.rem_euclid(7)).unwrap_or(0)],
        MONTHS[usize::try_from(m - 1).unwrap_or(0)],
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

fn rfc5322_day(epoch: i64) -> String {
    let (y, m, d) = kiln::civil::from_days(epoch.div_euclid(86_400));
    format!("{y}-{m:02}-{d:02}")
}

/// `2026`, or `2025-2026` when the two times fall in different years.
fn years(first: i64, last: i64) -> String {
    let year = |t: i64| kiln::civil::from_days(t.div_euclid(86_400)).0;
    match (year(first), year(last)) {
        (a, b) if a >= b => b.to_string(),
        (a, b) => format!("{a}-{b}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_formatted_as_date_r_does() {
        assert_eq!(rfc5322(0), "Thu, 01 Jan 1970 00:00:00 +0000");
        // 2026-12-07 19:29:32 UTC, a Monday.
        assert_eq!(rfc5322(1_796_671_772), "Mon, 07 Dec 2026 19:29:32 +0000");
        assert_eq!(rfc5322_day(1_796_671_772), "2026-12-07");
        // 2024-02-29, a leap day (Thursday).
        assert_eq!(rfc5322(1_709_164_800), "Thu, 29 Feb 2024 00:00:00 +0000");
        assert_eq!(years(1_709_164_800, 1_796_671_772), "2024-2026");
        assert_eq!(years(1_796_671_772, 1_796_671_772), "2026");
    }
}
