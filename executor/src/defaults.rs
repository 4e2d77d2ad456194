//! What a pulled image's config asks of the processes it runs (`Env`, `WorkingDir`,
//! `User`), made the defaults of every stage of a job in it, as GitLab's Docker executor
//! does: the image's variables under the job's own (the stage script exports those after),
//! its working directory as the stage's start, its user (resolved in the image's own
//! `/etc/passwd` when kiln made the image) as the stage's uid and gid, with that user's
//! home as `HOME`.
//!
//! `prepare` reads them from the store image's `image.json` and keeps them in the job's
//! state directory; `run` applies them to each stage.

use std::path::Path;

use anyhow::{bail, Context, Result};
use kiln_agent::protocol::ExecRequest;
use serde::{Deserialize, Serialize};

/// The file in the job's state directory.
pub const FILE: &str = "image-defaults.json";

/// `source.defaults` of a kiln store image's `image.json` (kiln's `JobDefaults`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageDefaults {
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub working_dir: String,
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub gid: Option<u32>,
    #[serde(default)]
    pub home: Option<String>,
    #[serde(default)]
    pub user_error: Option<String>,
}

/// The defaults of store image `name` in `store`: `None` for an image that has none (one
/// built from Debian packages or a tarball).
pub fn of_store_image(store: &Path, name: &str) -> Result<Option<ImageDefaults>> {
    #[derive(Deserialize)]
    struct Meta {
        source: SourceDefaults,
    }
    #[derive(Deserialize)]
    struct SourceDefaults {
        #[serde(default)]
        defaults: Option<ImageDefaults>,
    }
    let path = store.join(name).join("image.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let meta: Meta = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a kiln image.json", path.display()))?;
    let defaults = meta.source.defaults;
    if let Some(d) = &defaults {
        if let Some(why) = &d.user_error {
            bail!(
                "image {name:?} asks to run as User {:?}, but {why}: jobs do not run as root \
                 in its place; fix the image's USER",
                d.user
            );
        }
    }
    Ok(defaults)
}

/// Defaults kept in a file by [`write`]; `None` if there is none.
pub fn of_file(path: &Path) -> Result<Option<ImageDefaults>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .with_context(|| format!("{} is not the driver's image defaults", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Keeps `defaults` in `path` (the job's state, a snapshot's directory).
pub fn write(path: &Path, defaults: &ImageDefaults) -> Result<()> {
    let text = serde_json::to_string(defaults)?;
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

impl ImageDefaults {
    /// Sets `req`'s environment, working directory and ids from the image.
    pub fn apply(&self, req: &mut ExecRequest) {
        for line in &self.env {
            if let Some((k, v)) = line.split_once('=') {
                req.env.push((k.to_string(), v.to_string()));
            }
        }
        if let Some(home) = &self.home {
            req.env.retain(|(k, _)| k != "HOME");
            req.env.push(("HOME".to_string(), home.clone()));
        }
        if !self.working_dir.is_empty() {
            req.cwd = Some(self.working_dir.clone());
        }
        if let Some(uid) = self.uid.filter(|&u| u != 0) {
            req.uid = Some(uid);
            req.gid = self.gid;
        }
    }

    /// Whether stages run as another user than root, who then needs the builds and cache
    /// directories made for it.
    pub fn non_root(&self) -> Option<(u32, u32)> {
        let uid = self.uid.filter(|&u| u != 0)?;
        Some((uid, self.gid.unwrap_or(uid)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_images_give_their_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, json: &str| {
            std::fs::create_dir_all(dir.path().join(name)).unwrap();
            std::fs::write(dir.path().join(name).join("image.json"), json).unwrap();
        };
        write(
            "oci",
            r#"{"name":"oci","source":{"kind":"oci","reference":"r","digest":"d","platform":"linux/amd64",
                "defaults":{"env":["PATH=/usr/bin:/bin","GREETING=a=b"],"working_dir":"/src","user":"builder",
                "uid":1000,"gid":1001,"home":"/home/builder"}}}"#,
        );
        write(
            "deb",
            r#"{"name":"deb","source":{"kind":"debootstrap","suite":"bookworm"}}"#,
        );
        write(
            "nouser",
            r#"{"name":"nouser","source":{"kind":"oci","defaults":{"user":"ghost",
                "user_error":"user \"ghost\" is not in the image's /etc/passwd"}}}"#,
        );
        assert_eq!(of_store_image(dir.path(), "deb").unwrap(), None);
        assert_eq!(of_store_image(dir.path(), "absent").unwrap(), None);
        let e = of_store_image(dir.path(), "nouser").unwrap_err();
        assert!(format!("{e:#}").contains("\"ghost\""), "{e:#}");
        let d = of_store_image(dir.path(), "oci").unwrap().unwrap();
        let mut req = ExecRequest::new(["bash"]);
        d.apply(&mut req);
        assert_eq!(
            req.env,
            [
                ("PATH".to_string(), "/usr/bin:/bin".to_string()),
                ("GREETING".to_string(), "a=b".to_string()),
                ("HOME".to_string(), "/home/builder".to_string())
            ]
        );
        assert_eq!(
            (req.cwd.as_deref(), req.uid, req.gid),
            (Some("/src"), Some(1000), Some(1001))
        );
        assert_eq!(d.non_root(), Some((1000, 1001)));
        let root = ImageDefaults {
            uid: Some(0),
            gid: Some(0),
            ..ImageDefaults::default()
        };
        let mut req = ExecRequest::new(["bash"]);
        root.apply(&mut req);
        assert_eq!((req.uid, req.cwd, req.env.len()), (None, None, 0));
        assert_eq!(root.non_root(), None);
        let kept = dir.path().join("kept.json");
        assert_eq!(of_file(&kept).unwrap(), None);
        super::write(&kept, &d).unwrap();
        assert_eq!(of_file(&kept).unwrap(), Some(d));
    }
}
