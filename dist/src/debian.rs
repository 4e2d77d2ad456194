//! The Debian metadata: `DEBIAN/control`, `changelog.Debian` and the machine-readable
//! `copyright` file.

use std::fmt::Write;

/// The package's name.
pub const PACKAGE: &str = "kiln";
/// The Debian revision of every build of one kiln version.
pub const REVISION: &str = "1";

/// What `DEBIAN/control` says beyond the fixed fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Control {
    /// `UPSTREAM-REVISION`.
    pub version: String,
    /// `Name <address>`.
    pub maintainer: String,
    pub installed_size_kib: u64,
    /// Source packages whose code the package carries, `name (= version)` each: the C
    /// library linked into the static binaries, busybox in the initramfs, the kernel.
    pub built_using: Vec<String>,
}

/// The extended description, one paragraph per entry.
const DESCRIPTION: &[&str] = &[
    "kiln boots a purpose-built Linux guest kernel under KVM for each CI job and runs \
     the job through an agent inside the guest over virtio-vsock. It can snapshot a VM \
     so that later jobs start from that point, or fork it many times with copy-on-write \
     memory.",
    "This package holds the static kiln, kiln-agent and kiln-gitlab binaries (a GitLab \
     Runner custom executor and VM-isolation provider), the guest kernel and the default \
     agent initramfs that `kiln job` boots when no flag names them, and systemd units \
     for the nesting server and for host TAP networks.",
];

impl Control {
    pub fn render(&self) -> String {
        let mut s = String::new();
        let mut field = |name: &str, value: &str| {
            let _ = writeln!(s, "{name}: {value}");
        };
        field("Package", PACKAGE);
        field("Version", &self.version);
        field("Architecture", "amd64");
        field("Maintainer", &self.maintainer);
        field("Installed-Size", &self.installed_size_kib.to_string());
        // `kiln net setup --nat` installs its rules with nft, else iptables.
        field("Recommends", "nftables | iptables");
        // `kiln image build` runs debootstrap.
        field("Suggests", "debootstrap");
        if !self.built_using.is_empty() {
            field("Built-Using", &self.built_using.join(", "));
        }
        field("Section", "admin");
        field("Priority", "optional");
        field("Description", "microVM monitor for CI jobs");
        let paragraphs: Vec<String> = DESCRIPTION.iter().map(|p| wrap(p, 79)).collect();
        s.push_str(&paragraphs.join(" .\n"));
        s
    }
}

/// `text` as a control file's continuation lines: each starts with a space and is at most
/// `width` characters long.
fn wrap(text: &str, width: usize) -> String {
    let mut out = String::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.len() + 1 + word.len() > width - 1 {
            out.push(' ');
            out.push_str(&line);
            out.push('\n');
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        out.push(' ');
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// `changelog.Debian`: one entry for this build. `date` is in RFC 5322 form (`date -R`).
pub fn changelog(version: &str, commit: &str, maintainer: &str, date: &str) -> String {
    format!(
        "{PACKAGE} ({version}) unstable; urgency=medium\n\
         \n  * Built by `cargo xtask dist` from the kiln sources at commit {commit}.\n\
         \x20   kiln's own changes are listed in changelog.gz.\n\
         \n -- {maintainer}  {date}\n"
    )
}

/// The machine-readable `copyright` file (copyright-format 1.0); `years` are kiln's
/// (`2025-2026`).
pub fn copyright(years: &str) -> String {
    let home = kiln::defaults::SYSTEM_HOME.trim_start_matches('/');
    format!(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
         Upstream-Name: kiln\n\
         \n\
         Files: *\n\
         Copyright: {years} The kiln authors\n\
         License: Apache-2.0\n\
         \n\
         Files: usr/bin/*\n\
         Copyright: {years} The kiln authors\n\
         \x20The authors of the Rust crates and of the GNU C Library linked in\n\
         License: Apache-2.0 and LGPL-2.1+\n\
         Comment: The binaries are linked statically: they hold the GNU C Library\n\
         \x20(LGPL-2.1+, source package named in Built-Using) and the Rust crates listed\n\
         \x20in the kiln sources' Cargo.lock, each under its own license (mostly MIT or\n\
         \x20Apache-2.0).\n\
         \n\
         Files: {home}/vmlinux\n\
         Copyright: Linus Torvalds and the Linux kernel authors\n\
         License: GPL-2.0-only\n\
         Comment: Linux built from Debian's linux-source package (named in Built-Using)\n\
         \x20with the configuration in the kiln sources' kernel-config/.\n\
         \n\
         Files: {home}/initramfs.cpio\n\
         Copyright: {years} The kiln authors\n\
         \x20Erik Andersen, Rob Landley, Denys Vlasenko and the BusyBox authors\n\
         License: Apache-2.0 and GPL-2.0-only\n\
         Comment: kiln-agent as /init, with Debian's static BusyBox (source package\n\
         \x20named in Built-Using).\n\
         \n\
         License: Apache-2.0\n\
         \x20On Debian systems, the full text of the Apache License, Version 2.0, is in\n\
         \x20/usr/share/common-licenses/Apache-2.0.\n\
         \n\
         License: GPL-2.0-only\n\
         \x20On Debian systems, the full text of the GNU General Public License,\n\
         \x20version 2, is in /usr/share/common-licenses/GPL-2.\n\
         \n\
         License: LGPL-2.1+\n\
         \x20On Debian systems, the full text of the GNU Lesser General Public License,\n\
         \x20version 2.1, is in /usr/share/common-licenses/LGPL-2.1.\n"
    )
}

/// `/usr/share/lintian/overrides/kiln`: the findings that are kiln's design, each with why.
pub fn lintian_overrides() -> String {
    let home = kiln::defaults::SYSTEM_HOME.trim_start_matches('/');
    let mut s = String::from(
        "# kiln's binaries are static-pie executables (ELF type DYN, no interpreter, no\n\
         # needed library), which lintian takes for shared libraries. They are static on\n\
         # purpose: kiln-agent is the init of guest images of any distribution (`kiln image\n\
         # build|import|pull` copy it into them, the default initramfs holds it), and kiln\n\
         # and kiln-gitlab need no library of the host.\n",
    );
    for bin in ["kiln", "kiln-agent", "kiln-gitlab"] {
        let _ = writeln!(
            s,
            "{PACKAGE}: shared-library-lacks-prerequisites [usr/bin/{bin}]"
        );
    }
    let _ = write!(
        s,
        "# The guest kernel: kiln boots it in a VM; it is no program of this host.\n\
         {PACKAGE}: statically-linked-binary [{home}/vmlinux]\n"
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_fields_and_a_wrapped_description() {
        let control = Control {
            version: "0.1.0-1".into(),
            maintainer: "A B <a@example.org>".into(),
            installed_size_kib: 1234,
            built_using: vec!["glibc (= 2.36-9)".into(), "busybox (= 1:1.35.0-4)".into()],
        }
        .render();
        assert!(
            control.starts_with("Package: kiln\nVersion: 0.1.0-1\n"),
            "{control}"
        );
        assert!(control.contains("\nInstalled-Size: 1234\n"), "{control}");
        assert!(control.contains("\nBuilt-Using: glibc (= 2.36-9), busybox (= 1:1.35.0-4)\n"));
        assert!(
            !control.contains("Depends:"),
            "static binaries need nothing"
        );
        let description = control.split("Description: ").nth(1).unwrap();
        let lines: Vec<&str> = description.lines().skip(1).collect();
        assert!(lines.len() > 4, "{description}");
        for line in &lines {
            assert!(line.starts_with(' ') && line.len() <= 80, "{line:?}");
        }
        assert_eq!(lines.iter().filter(|l| **l == " .").count(), 1);
        assert!(control.ends_with('\n'));
    }

    #[test]
    fn wrap_keeps_words_whole() {
        assert_eq!(wrap("aa bb cc", 7), " aa bb\n cc\n");
        assert_eq!(wrap("", 10), "");
    }

    #[test]
    fn the_changelog_entry_is_in_debian_form() {
        let entry = changelog(
            "0.1.0-1",
            "abc1234",
            "A B <a@example.org>",
            "Mon, 07 Dec 2026 19:29:32 +0000",
        );
        let lines: Vec<&str> = entry.lines().collect();
        assert_eq!(lines[0], "kiln (0.1.0-1) unstable; urgency=medium");
        assert_eq!(lines[1], "");
        assert!(lines[2].starts_with("  * "));
        assert_eq!(
            lines.last().unwrap(),
            &" -- A B <a@example.org>  Mon, 07 Dec 2026 19:29:32 +0000"
        );
    }
}
