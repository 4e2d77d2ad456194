//! Container registries for the tests that pull images, which the test bed cannot reach on
//! the network: Debian's `docker-registry` is started here on loopback, the test's images
//! pushed to it over plain HTTP (blobs, configs, manifests), then stopped; its storage
//! directory and the registry program itself go into the test bed as files, where the
//! test's script serves the same storage again on the test bed's own loopback.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use sha2::{Digest, Sha256};

/// An uncompressed OCI layer.
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Where Debian installs the registry.
pub const PROGRAM: &str = "/usr/bin/docker-registry";

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

/// A `docker-registry` on a loopback port of this machine, stopped when dropped.
pub struct Registry {
    child: Child,
    storage: PathBuf,
    port: u16,
}

impl Registry {
    /// Starts one that keeps its storage in `dir/storage`.
    pub fn start(dir: &Path) -> Result<Registry> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let storage = dir.join("storage");
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    \
                 rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                storage.display()
            ),
        )?;
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

    /// Uploads a blob; its descriptor.
    fn blob(&self, repo: &str, media_type: &str, data: &[u8]) -> Result<serde_json::Value> {
        let digest = sha256(data);
        let (code, head, _) = self.http("POST", &format!("/v2/{repo}/blobs/uploads/"), &[], b"")?;
        ensure!(code == 202, "blob upload refused: {head}");
        let location = head
            .lines()
            .find_map(|l| l.strip_prefix("Location: "))
            .context("no Location")?
            .trim();
        let path = location
            .strip_prefix(&format!("http://127.0.0.1:{}", self.port))
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

    /// Pushes an image of uncompressed tar `layers` whose config holds `config` (the
    /// `config` object of an image config: Env, WorkingDir, User…) as `repo:tag`; returns
    /// the manifest's digest.
    pub fn push(
        &self,
        repo: &str,
        tag: &str,
        layers: &[Vec<u8>],
        config: serde_json::Value,
    ) -> Result<String> {
        let diff_ids: Vec<String> = layers.iter().map(|l| sha256(l)).collect();
        let config = serde_json::json!({
            "architecture": "amd64", "os": "linux", "config": config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        let config = self.blob(repo, OCI_CONFIG, &serde_json::to_vec(&config)?)?;
        let layers = layers
            .iter()
            .map(|l| self.blob(repo, OCI_LAYER, l))
            .collect::<Result<Vec<_>>>()?;
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": layers,
        }))?;
        let (code, head, _) = self.http(
            "PUT",
            &format!("/v2/{repo}/manifests/{tag}"),
            &[("Content-Type", OCI_MANIFEST)],
            &manifest,
        )?;
        ensure!(code == 201, "manifest refused: {head}");
        Ok(sha256(&manifest))
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
