//! Container registries for the tests that pull images: Debian's `docker-registry` is
//! started here on loopback (optionally taking one user's login), and the test's images are
//! pushed to it over plain HTTP (blobs, configs, manifests and indexes, OCI or Docker). The
//! direct tests pull from it where it runs; for the test bed, which cannot reach the
//! network, it is then stopped and its storage directory and the registry program itself
//! go into the test bed as files, where the test's script serves the same storage again on
//! the test bed's own loopback.

use std::borrow::Cow;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use base64::Engine;
use sha2::{Digest, Sha256};

/// Media types: an uncompressed OCI layer, and the others the tests push.
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// Where Debian installs the registry.
pub const PROGRAM: &str = "/usr/bin/docker-registry";

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

/// A layer to push: its media type, its blob as the registry stores it (compressed or
/// not), and the tar stream the blob holds (whose digest is the layer's diff ID).
pub struct Layer<'a> {
    pub media_type: &'static str,
    pub blob: Cow<'a, [u8]>,
    pub tar: Cow<'a, [u8]>,
}

impl<'a> Layer<'a> {
    /// A layer of `media_type` whose blob `blob` holds the tar stream `tar`.
    pub fn new(media_type: &'static str, blob: Vec<u8>, tar: Vec<u8>) -> Layer<'a> {
        Layer {
            media_type,
            blob: Cow::Owned(blob),
            tar: Cow::Owned(tar),
        }
    }

    /// The uncompressed layer `tar`.
    pub fn plain(tar: &'a [u8]) -> Layer<'a> {
        Layer {
            media_type: OCI_LAYER,
            blob: Cow::Borrowed(tar),
            tar: Cow::Borrowed(tar),
        }
    }
}

/// A `docker-registry` on a loopback port of this machine, stopped when dropped.
pub struct Registry {
    child: Child,
    storage: PathBuf,
    port: u16,
    /// The `Authorization` header value for requests, when the registry wants a login.
    auth: Option<String>,
}

impl Registry {
    /// Starts one that keeps its storage in `dir/storage`.
    pub fn start(dir: &Path) -> Result<Registry> {
        Self::start_with_login(dir, None)
    }

    /// [`Registry::start`]; with `login` (user, password), it serves only that user
    /// (htpasswd, from Debian's apache2-utils), and this fixture pushes as that user.
    pub fn start_with_login(dir: &Path, login: Option<(&str, &str)>) -> Result<Registry> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let storage = dir.join("storage");
        let config = dir.join("config.yml");
        let mut yaml = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    \
             rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            storage.display()
        );
        let mut auth = None;
        if let Some((user, password)) = login {
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, password])
                .output()
                .context("running htpasswd (Debian's apache2-utils)")?;
            ensure!(out.status.success(), "htpasswd failed");
            let htpasswd = dir.join("htpasswd");
            std::fs::write(&htpasswd, out.stdout)?;
            yaml += &format!(
                "auth:\n  htpasswd:\n    realm: kiln-test\n    path: {}\n",
                htpasswd.display()
            );
            let basic =
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            auth = Some(format!("Basic {basic}"));
        }
        std::fs::write(&config, yaml)?;
        let log = dir.join("registry.log");
        let child = Command::new(PROGRAM)
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting docker-registry (Debian's docker-registry; cargo xtask setup)")?;
        let mut registry = Registry {
            child,
            storage,
            port,
            auth,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = registry.child.try_wait()? {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                bail!("docker-registry exited ({status}): {log}");
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok()
                && registry
                    .http("GET", "/v2/", &[], b"")
                    .is_ok_and(|r| r.0 == 200)
            {
                return Ok(registry);
            }
            ensure!(Instant::now() < deadline, "docker-registry did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `127.0.0.1:PORT`, as references name it.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The loopback port it serves on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// One HTTP/1.1 request; status, head and body.
    fn http(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<(u16, String, Vec<u8>)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\
             Content-Length: {}\r\n",
            self.port,
            body.len()
        );
        if let Some(auth) = &self.auth {
            req += &format!("Authorization: {auth}\r\n");
        }
        for (k, v) in headers {
            req += &format!("{k}: {v}\r\n");
        }
        req += "\r\n";
        s.write_all(req.as_bytes())?;
        s.write_all(body)?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp)?;
        let split = resp
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .context("no HTTP response")?;
        let head = String::from_utf8_lossy(&resp[..split]).into_owned();
        let code = head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .context("no HTTP status")?;
        Ok((code, head, resp[split + 4..].to_vec()))
    }

    /// Uploads a blob (monolithically); its descriptor.
    pub fn blob(&self, repo: &str, media_type: &str, data: &[u8]) -> Result<serde_json::Value> {
        let digest = sha256(data);
        let (code, head, _) = self.http("POST", &format!("/v2/{repo}/blobs/uploads/"), &[], b"")?;
        ensure!(code == 202, "blob upload refused: {head}");
        let location = head
            .lines()
            .find_map(|l| l.strip_prefix("Location: "))
            .context("no Location")?
            .trim();
        let path = location
            .strip_prefix(&format!("http://{}", self.host()))
            .unwrap_or(location);
        let sep = if path.contains('?') { '&' } else { '?' };
        let (code, head, _) = self.http(
            "PUT",
            &format!("{path}{sep}digest={digest}"),
            &[("Content-Type", "application/octet-stream")],
            data,
        )?;
        ensure!(code == 201, "blob upload failed: {head}");
        Ok(serde_json::json!({"mediaType": media_type, "digest": digest, "size": data.len()}))
    }

    /// Puts a manifest (or an index) of type `media_type` under `tag`; its descriptor.
    pub fn manifest(
        &self,
        repo: &str,
        tag: &str,
        media_type: &str,
        manifest: &serde_json::Value,
    ) -> Result<serde_json::Value> {
        let data = serde_json::to_vec(manifest)?;
        let (code, head, _) = self.http(
            "PUT",
            &format!("/v2/{repo}/manifests/{tag}"),
            &[("Content-Type", media_type)],
            &data,
        )?;
        ensure!(code == 201, "manifest refused: {head}");
        Ok(
            serde_json::json!({"mediaType": media_type, "digest": sha256(&data), "size": data.len()}),
        )
    }

    /// Pushes an image of `layers` for `arch` whose config holds `config` (the `config`
    /// object of an image config: Env, WorkingDir, User…) as `repo:tag`, with an OCI
    /// manifest or (`docker`) a Docker one; returns the manifest's descriptor.
    pub fn image(
        &self,
        (repo, tag): (&str, &str),
        docker: bool,
        arch: &str,
        layers: &[Layer<'_>],
        config: serde_json::Value,
    ) -> Result<serde_json::Value> {
        let diff_ids: Vec<String> = layers.iter().map(|l| sha256(&l.tar)).collect();
        let config = serde_json::json!({
            "architecture": arch, "os": "linux", "config": config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        let (manifest_type, config_type) = if docker {
            (DOCKER_MANIFEST, DOCKER_CONFIG)
        } else {
            (OCI_MANIFEST, OCI_CONFIG)
        };
        let config = self.blob(repo, config_type, &serde_json::to_vec(&config)?)?;
        let layers = layers
            .iter()
            .map(|l| self.blob(repo, l.media_type, &l.blob))
            .collect::<Result<Vec<_>>>()?;
        let manifest = serde_json::json!({
            "schemaVersion": 2, "mediaType": manifest_type, "config": config, "layers": layers,
        });
        self.manifest(repo, tag, manifest_type, &manifest)
    }

    /// Pushes an amd64 image of uncompressed tar `layers` with an OCI manifest (see
    /// [`Registry::image`]); returns the manifest's digest.
    pub fn push(
        &self,
        repo: &str,
        tag: &str,
        layers: &[Vec<u8>],
        config: serde_json::Value,
    ) -> Result<String> {
        let layers: Vec<Layer<'_>> = layers.iter().map(|l| Layer::plain(l)).collect();
        let manifest = self.image((repo, tag), false, "amd64", &layers, config)?;
        manifest["digest"]
            .as_str()
            .map(str::to_owned)
            .context("a manifest descriptor without a digest")
    }

    /// The file the registry keeps blob `digest` in.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(hex.get(..2).unwrap_or_default())
            .join(hex)
            .join("data")
    }

    /// Stops the registry; every file of its storage as `files` entries under `prefix`,
    /// for a registry in the test bed to serve.
    pub fn into_files(mut self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut files = Vec::new();
        walk(&self.storage, &self.storage, prefix, &mut files)?;
        Ok(files)
    }
}

fn walk(root: &Path, dir: &Path, prefix: &str, out: &mut Vec<(String, Vec<u8>)>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            walk(root, &path, prefix, out)?;
        } else {
            let rel = path.strip_prefix(root)?.to_string_lossy().into_owned();
            out.push((format!("{prefix}/{rel}"), std::fs::read(&path)?));
        }
    }
    Ok(())
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tar stream of the tree `dir`, every entry owned by `uid:gid` (GNU tar).
pub fn layer(dir: &Path, uid: u32, gid: u32) -> Result<Vec<u8>> {
    let out = Command::new("tar")
        .arg("--numeric-owner")
        .arg(format!("--owner={uid}"))
        .arg(format!("--group={gid}"))
        .arg("-cf")
        .arg("-")
        .arg("-C")
        .arg(dir)
        .arg(".")
        .output()
        .context("running tar")?;
    ensure!(
        out.status.success(),
        "tar failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}
