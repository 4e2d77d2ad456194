//! An image config's `User` (`user[:group]`, each a name or a number) turned into the ids
//! and home directory a job runs with, from the image's own `/etc/passwd` and
//! `/etc/group`. Done when the image is made, while its tree is at hand: the guest has the
//! same files, and a job then needs no lookup (and no `getent`) in it.
//!
//! The tree comes from untrusted layers: only regular files at those paths are read, never
//! what a symlink there points at (it may point at the host's own files).

use std::path::Path;

/// What `User` resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ids {
    pub uid: u32,
    pub gid: u32,
    /// The user's home from `/etc/passwd`, when the user is listed there.
    pub home: Option<String>,
}

/// A `User` name the image does not list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserError {
    #[error("user {0:?} is not in the image's /etc/passwd")]
    NoUser(String),
    #[error("group {0:?} is not in the image's /etc/group")]
    NoGroup(String),
}

/// `user` (`""` is root) resolved in `tree`; `Err` says which name is missing.
pub fn resolve(tree: &Path, user: &str) -> Result<Ids, UserError> {
    let passwd = read_db(tree, "etc/passwd");
    let group = read_db(tree, "etc/group");
    resolve_in(&passwd, &group, user)
}

fn read_db(tree: &Path, rel: &str) -> String {
    let path = tree.join(rel);
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.is_file() => std::fs::read_to_string(&path).unwrap_or_default(),
        _ => String::new(),
    }
}

/// The entry of `/etc/passwd` or `/etc/group` text whose name (or, for a number, whose id)
/// is `key`: its fields.
fn entry<'a>(db: &'a str, key: &str) -> Option<Vec<&'a str>> {
    let by_id = key.parse::<u32>().is_ok();
    db.lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 3)
        .find(|f| if by_id { f[2] == key } else { f[0] == key })
}

fn resolve_in(passwd: &str, group: &str, user: &str) -> Result<Ids, UserError> {
    let (user, group_part) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let user = if user.is_empty() { "0" } else { user };
    let found = entry(passwd, user);
    let uid = match user.parse::<u32>() {
        Ok(n) => n,
        Err(_) => found
            .as_ref()
            .and_then(|f| f[2].parse().ok())
            .ok_or_else(|| UserError::NoUser(user.into()))?,
    };
    // Without a group, the user's primary group; a number not in passwd: the same number.
    let primary = found
        .as_ref()
        .and_then(|f| f.get(3))
        .and_then(|g| g.parse().ok());
    let gid = match group_part {
        None | Some("") => primary.unwrap_or(uid),
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => entry(group, g)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| UserError::NoGroup(g.into()))?,
        },
    };
    let home = found
        .as_ref()
        .and_then(|f| f.get(5))
        .filter(|h| !h.is_empty())
        .map(|h| h.to_string());
    Ok(Ids { uid, gid, home })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str =
        "root:x:0:0:root:/root:/bin/sh\nbuilder:x:1000:1001::/home/builder:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nbuilders:x:1001:\nstaff:x:50:\n";

    #[test]
    fn names_and_numbers_resolve() {
        let r = |u: &str| resolve_in(PASSWD, GROUP, u);
        let root = r("").unwrap();
        assert_eq!(
            (root.uid, root.gid, root.home.as_deref()),
            (0, 0, Some("/root"))
        );
        let b = r("builder").unwrap();
        assert_eq!(
            (b.uid, b.gid, b.home.as_deref()),
            (1000, 1001, Some("/home/builder"))
        );
        let b = r("1000:staff").unwrap();
        assert_eq!(
            (b.uid, b.gid, b.home.as_deref()),
            (1000, 50, Some("/home/builder"))
        );
        let n = r("4242").unwrap();
        assert_eq!((n.uid, n.gid, n.home), (4242, 4242, None));
        assert_eq!(r("4242:7").unwrap().gid, 7);
        assert!(r("nobody").unwrap_err().to_string().contains("\"nobody\""));
        assert!(r("builder:wheel")
            .unwrap_err()
            .to_string()
            .contains("/etc/group"));
    }

    #[test]
    fn a_symlinked_passwd_is_not_followed() {
        let dir = crate::test_util::scratch("oci-user");
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        let outside = dir.join("outside");
        std::fs::write(&outside, "root:x:0:0::/r:/bin/sh\nspy:x:7:7::/s:/bin/sh\n").unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("etc/passwd")).unwrap();
        assert!(resolve(&dir, "spy").is_err());
        std::fs::remove_file(dir.join("etc/passwd")).unwrap();
        std::fs::copy(&outside, dir.join("etc/passwd")).unwrap();
        assert_eq!(resolve(&dir, "spy").unwrap().uid, 7);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
