//! `kiln image pull` against a real registry on loopback: Debian's `docker-registry`
//! started by each test with its own storage (and htpasswd file where auth is under
//! test), the test images built and pushed here over HTTP — layers as tar streams, a
//! config, manifests and an index. The pulled ext4 images are read with debugfs.
//!
//! Needs root (a pull keeps the layers' owners) and the `docker-registry`,
//! `apache2-utils` and `e2fsprogs` packages (`cargo xtask setup` installs them).

mod cli_image_util;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use cli_image_util::{is_root, scratch, store_entries, STATIC_ELF};
use sha2::{Digest, Sha256};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const OCI_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const DOCKER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

fn sha256(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

/// A `docker-registry` serving on a loopback port, stopped and removed when dropped.
struct Registry {
    child: Child,
    dir: PathBuf,
    port: u16,
    /// `Authorization` header value for pushes, when the registry wants one.
    auth: Option<String>,
}

impl Registry {
    /// Starts one; with `user`, it takes only that user (password `password`).
    fn start(dir: &Path, user: Option<(&str, &str)>) -> Registry {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: 127.0.0.1:{port}\n",
            dir.join("storage").display()
        );
        let mut auth = None;
        if let Some((user, password)) = user {
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, password])
                .output()
                .expect("htpasswd (apache2-utils)");
            assert!(out.status.success(), "htpasswd failed");
            std::fs::write(dir.join("htpasswd"), out.stdout).unwrap();
            config += &format!(
                "auth:\n  htpasswd:\n    realm: kiln-test\n    path: {}\n",
                dir.join("htpasswd").display()
            );
            let basic =
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            auth = Some(format!("Basic {basic}"));
        }
        std::fs::write(dir.join("config.yml"), config).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.join("config.yml"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("registry.log")).unwrap())
            .spawn()
            .expect("start docker-registry (apt-get install docker-registry)");
        let mut registry = Registry {
            child,
            dir: dir.to_owned(),
            port,
            auth,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = registry.child.try_wait().unwrap() {
                let log = std::fs::read_to_string(dir.join("registry.log")).unwrap_or_default();
                panic!("docker-registry exited ({status}): {log}");
            }
            if let Ok(s) = TcpStream::connect(("127.0.0.1", port)) {
                drop(s);
                let (code, _, _) = registry.http("GET", "/v2/", &[], b"");
                if code == 200 || code == 401 {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "docker-registry did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        registry
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// One HTTP/1.1 request; returns status, headers and body.
    fn http(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> (u16, String, Vec<u8>) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
            self.host(),
            body.len()
        );
        if let Some(auth) = &self.auth {
            req += &format!("Authorization: {auth}\r\n");
        }
        for (k, v) in headers {
            req += &format!("{k}: {v}\r\n");
        }
        req += "\r\n";
        s.write_all(req.as_bytes()).unwrap();
        s.write_all(body).unwrap();
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).unwrap();
        let split = resp
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("an HTTP response");
        let head = String::from_utf8_lossy(&resp[..split]).into_owned();
        let code = head.split(' ').nth(1).unwrap().parse().unwrap();
        (code, head, resp[split + 4..].to_vec())
    }

    /// Uploads a blob (monolithically); returns its descriptor.
    fn blob(&self, repo: &str, media_type: &str, data: &[u8]) -> serde_json::Value {
        let digest = sha256(data);
        let (code, head, body) = self.http("POST", &format!("/v2/{repo}/blobs/uploads/"), &[], b"");
        assert_eq!(code, 202, "{head} {}", String::from_utf8_lossy(&body));
        let location = head
            .lines()
            .find_map(|l| l.strip_prefix("Location: "))
            .expect("Location")
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
        );
        assert_eq!(code, 201, "{head}");
        serde_json::json!({"mediaType": media_type, "digest": digest, "size": data.len()})
    }

    /// Puts a manifest (or index) under `tag`; returns its descriptor.
    fn manifest(
        &self,
        repo: &str,
        tag: &str,
        media_type: &str,
        manifest: &serde_json::Value,
    ) -> serde_json::Value {
        let data = serde_json::to_vec(manifest).unwrap();
        let (code, head, body) = self.http(
            "PUT",
            &format!("/v2/{repo}/manifests/{tag}"),
            &[("Content-Type", media_type)],
            &data,
        );
        assert_eq!(code, 201, "{head} {}", String::from_utf8_lossy(&body));
        serde_json::json!({"mediaType": media_type, "digest": sha256(&data), "size": data.len()})
    }

    /// Pushes an image of `layers` (each `(media type, blob, uncompressed tar)`) with a
    /// config carrying `config`; returns the manifest's descriptor.
    fn image(
        &self,
        repo: &str,
        tag: &str,
        docker: bool,
        arch: &str,
        layers: &[(&str, Vec<u8>, Vec<u8>)],
        config: serde_json::Value,
    ) -> serde_json::Value {
        let diff_ids: Vec<String> = layers.iter().map(|l| sha256(&l.2)).collect();
        let config = serde_json::json!({
            "architecture": arch, "os": "linux", "config": config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        let (manifest_type, config_type) = if docker {
            (DOCKER_MANIFEST, DOCKER_CONFIG)
        } else {
            (OCI_MANIFEST, OCI_CONFIG)
        };
        let config = self.blob(repo, config_type, &serde_json::to_vec(&config).unwrap());
        let layers: Vec<_> = layers
            .iter()
            .map(|(t, blob, _)| self.blob(repo, t, blob))
            .collect();
        let manifest = serde_json::json!({
            "schemaVersion": 2, "mediaType": manifest_type, "config": config, "layers": layers,
        });
        self.manifest(repo, tag, manifest_type, &manifest)
    }

    /// The file the registry keeps blob `digest` in.
    fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.dir
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tar stream of `entries`, each built by the closure on a builder.
fn tar(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    build(&mut b);
    b.into_inner().unwrap()
}

fn header(kind: tar::EntryType, mode: u32, size: usize) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size as u64);
    h.set_mtime(1_700_000_000);
    h.set_uid(0);
    h.set_gid(0);
    h
}

fn add_dir(b: &mut tar::Builder<Vec<u8>>, path: &str) {
    let mut h = header(tar::EntryType::Directory, 0o755, 0);
    b.append_data(&mut h, path, &[][..]).unwrap();
}

fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
    let mut h = header(tar::EntryType::Regular, 0o644, data.len());
    b.append_data(&mut h, path, data).unwrap();
}

/// An entry whose name is written as is (the builder refuses `..` and absolute paths).
fn raw_file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
    let mut h = header(tar::EntryType::Regular, 0o644, data.len());
    h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
    h.set_cksum();
    b.append(&h, data).unwrap();
}

/// A hard link whose target is written as is (the builder refuses `..` and absolute ones).
fn raw_link(b: &mut tar::Builder<Vec<u8>>, path: &str, target: &str) {
    let mut h = header(tar::EntryType::Link, 0o644, 0);
    h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
    h.as_old_mut().linkname[..target.len()].copy_from_slice(target.as_bytes());
    h.set_cksum();
    b.append(&h, &[][..]).unwrap();
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn zstd(data: &[u8]) -> Vec<u8> {
    ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest)
}

/// Runs kiln with a credentials environment of the test's own (never the machine's).
fn kiln(args: &[&str], docker_config: &Path, auth_env: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.args(args)
        .env_remove("KILN_IMAGE_STORE")
        .env_remove("KILN_AGENT")
        .env_remove("DOCKER_AUTH_CONFIG")
        .env("DOCKER_CONFIG", docker_config);
    if let Some(json) = auth_env {
        cmd.env("DOCKER_AUTH_CONFIG", json);
    }
    cmd.output().expect("run kiln")
}

/// `kiln image pull` args for `reference` into `store`, named `name`.
fn pull_args<'a>(
    registry: &'a str,
    store: &'a str,
    reference: &'a str,
    name: &'a str,
) -> Vec<&'a str> {
    vec![
        "image",
        "pull",
        reference,
        "--name",
        name,
        "--store",
        store,
        "--agent",
        STATIC_ELF,
        "--insecure-registry",
        registry,
        "--json",
    ]
}

fn pulled(out: &Output) -> serde_json::Value {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "pull failed: {stderr}");
    serde_json::from_slice(&out.stdout).expect("one JSON line")
}

/// Asserts one error line, no panic, and returns the line.
fn refused(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "the pull succeeded: {stderr}");
    assert_ne!(out.status.code(), Some(101), "kiln panicked: {stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("kiln: error"))
        .collect();
    assert_eq!(errors.len(), 1, "expected one error line, got: {stderr}");
    assert_eq!(
        stderr.lines().count(),
        1,
        "more than the error line: {stderr}"
    );
    eprintln!("refused as expected: {}", errors[0]);
    errors[0].to_string()
}

/// Asserts that the store holds nothing (it may not exist).
fn store_is_empty(store: &Path) {
    let entries = store_entries(store).unwrap_or_default();
    assert!(entries.is_empty(), "left in the store: {entries:?}");
}

/// What debugfs says (stdout and stderr) about `cmd` in `image`.
fn debugfs(image: &Path, cmd: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(cmd)
        .arg(image)
        .output()
        .expect("debugfs (e2fsprogs)");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn names_in(image: &Path, dir: &str) -> Vec<String> {
    let mut names: Vec<String> = debugfs(image, &format!("ls -p {dir}"))
        .lines()
        .filter_map(|l| l.split('/').nth(5).map(str::to_string))
        .filter(|n| !n.is_empty() && n != "." && n != "..")
        .collect();
    names.sort();
    names
}

/// A base layer (gzip) and an upper one (zstd) that deletes, hides and replaces.
fn two_layers() -> Vec<(&'static str, Vec<u8>, Vec<u8>)> {
    let base = tar(|b| {
        add_dir(b, "etc");
        file(b, "etc/hostname", b"base\n");
        let mut h = header(tar::EntryType::Link, 0o644, 0);
        b.append_link(&mut h, "etc/hostname-link", "etc/hostname")
            .unwrap();
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        b.append_link(&mut h, "etc/alias", "hostname").unwrap();
        file(b, "gone.txt", b"deleted above\n");
        add_dir(b, "opq");
        file(b, "opq/old", b"hidden above\n");
        add_dir(b, "opq/sub");
        file(b, "opq/sub/old2", b"hidden above\n");
        add_dir(b, "srv");
        b.append_pax_extensions([("SCHILY.xattr.user.kiln", &b"kept"[..])])
            .unwrap();
        let mut h = header(tar::EntryType::Regular, 0o4750, 3);
        h.set_uid(1000);
        h.set_gid(1001);
        b.append_data(&mut h, "srv/owned", &b"own"[..]).unwrap();
        add_dir(b, "dev");
        let mut h = header(tar::EntryType::Char, 0o666, 0);
        h.set_device_major(1).unwrap();
        h.set_device_minor(3).unwrap();
        b.append_data(&mut h, "dev/null", &[][..]).unwrap();
        let mut h = header(tar::EntryType::Fifo, 0o600, 0);
        b.append_data(&mut h, "srv/fifo", &[][..]).unwrap();
    });
    let upper = tar(|b| {
        file(b, ".wh.gone.txt", b"");
        add_dir(b, "opq");
        file(b, "opq/.wh..wh..opq", b"");
        file(b, "opq/new", b"new\n");
        file(b, "etc/hostname", b"upper\n");
    });
    vec![
        (OCI_GZIP, gzip(&base), base),
        (OCI_ZSTD, zstd(&upper), upper),
    ]
}

#[test]
fn image_pull_by_tag_and_by_digest_applies_layers_in_order() {
    if !is_root() {
        eprintln!("skipped: kiln image pull needs root");
        return;
    }
    let dir = scratch("oci-pull");
    let registry = Registry::start(&dir, None);
    let host = registry.host();
    let config = serde_json::json!({
        "Env": ["PATH=/usr/bin:/bin", "KILN_TEST=1"], "WorkingDir": "/work", "User": "1000",
    });
    let manifest = registry.image("ci/tool", "v1", false, "amd64", &two_layers(), config);
    let digest = manifest["digest"].as_str().unwrap().to_string();
    let store = dir.join("store");
    let s = store.to_str().unwrap();
    let creds = dir.join("no-creds");
    std::fs::create_dir_all(&creds).unwrap();

    let reference = format!("{host}/ci/tool:v1");
    let json = pulled(&kiln(
        &pull_args(&host, s, &reference, "tool"),
        &creds,
        None,
    ));
    assert_eq!(json["digest"], digest.as_str(), "{json}");
    assert_eq!(json["fetched"], true, "{json}");
    assert_eq!(json["source"]["kind"], "oci", "{json}");
    assert_eq!(json["source"]["defaults"]["working_dir"], "/work", "{json}");
    assert_eq!(json["source"]["defaults"]["user"], "1000", "{json}");
    assert_eq!(
        json["source"]["defaults"]["env"][1], "KILN_TEST=1",
        "{json}"
    );

    let image = store.join("tool/rootfs.ext4");
    assert_eq!(
        cli_image_util::debugfs_cat(&image, "/etc/hostname"),
        b"upper\n"
    );
    assert_eq!(
        cli_image_util::debugfs_cat(&image, "/etc/hostname-link"),
        b"base\n",
        "the hard link to the lower file keeps the lower content"
    );
    assert_eq!(names_in(&image, "/opq"), ["new"], "the opaque directory");
    let root = names_in(&image, "/");
    assert!(
        !root.contains(&"gone.txt".to_string()),
        "whiteout ignored: {root:?}"
    );
    assert!(root.contains(&"srv".to_string()), "{root:?}");
    let owned = debugfs(&image, "stat /srv/owned");
    assert!(
        owned.contains("User:  1000") && owned.contains("Group:  1001"),
        "{owned}"
    );
    assert!(owned.contains("Mode:  04750"), "{owned}");
    let xattrs = debugfs(&image, "ea_list /srv/owned");
    assert!(
        xattrs.contains("user.kiln") && xattrs.contains("kept"),
        "{xattrs}"
    );
    let null = debugfs(&image, "stat /dev/null");
    assert!(
        null.contains("Type: character special") && null.contains("Mode:  0666"),
        "{null}"
    );
    assert!(null.contains("major/minor number: 01:03"), "{null}");
    assert!(debugfs(&image, "stat /srv/fifo").contains("Type: FIFO"));
    let alias = debugfs(&image, "stat /etc/alias");
    assert!(
        alias.contains("Type: symlink") && alias.contains("\"hostname\""),
        "{alias}"
    );
    assert!(debugfs(&image, "stat /sbin/kiln-agent").contains("Type: regular"));

    // The layers are gone from the registry: what follows can only come from the store.
    for layer in two_layers() {
        std::fs::remove_file(registry.blob_file(&sha256(&layer.1))).unwrap();
    }
    let by_digest = format!("{host}/ci/tool@{digest}");
    let json = pulled(&kiln(
        &pull_args(&host, s, &by_digest, "tool-pinned"),
        &creds,
        None,
    ));
    assert_eq!(json["fetched"], false, "{json}");
    assert_eq!(json["name"], "tool-pinned", "{json}");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(&image).unwrap().ino(),
        std::fs::metadata(store.join("tool-pinned/rootfs.ext4"))
            .unwrap()
            .ino(),
        "the same digest is one ext4 file"
    );
    let json = pulled(&kiln(
        &pull_args(&host, s, &reference, "tool"),
        &creds,
        None,
    ));
    assert_eq!(json["fetched"], false, "{json}");
    let out = kiln(&["image", "verify", "--store", s], &creds, None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(registry);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn image_pull_takes_the_platform_asked_for_from_an_index() {
    if !is_root() {
        eprintln!("skipped: kiln image pull needs root");
        return;
    }
    let dir = scratch("oci-index");
    let registry = Registry::start(&dir, None);
    let host = registry.host();
    let mut entries = Vec::new();
    for arch in ["arm64", "amd64"] {
        let layer = tar(|b| {
            add_dir(b, "etc");
            file(b, "etc/arch", arch.as_bytes());
        });
        let layers = [(DOCKER_GZIP, gzip(&layer), layer)];
        let mut desc = registry.image("multi", arch, true, arch, &layers, serde_json::json!({}));
        desc["platform"] = serde_json::json!({"os": "linux", "architecture": arch});
        entries.push(desc);
    }
    let index =
        serde_json::json!({"schemaVersion": 2, "mediaType": DOCKER_LIST, "manifests": entries});
    registry.manifest("multi", "latest", DOCKER_LIST, &index);
    let store = dir.join("store");
    let s = store.to_str().unwrap();
    let reference = format!("{host}/multi:latest");
    let json = pulled(&kiln(&pull_args(&host, s, &reference, "m"), &dir, None));
    assert_eq!(json["digest"], entries[1]["digest"], "{json}");
    assert_eq!(
        cli_image_util::debugfs_cat(&store.join("m/rootfs.ext4"), "/etc/arch"),
        b"amd64"
    );
    let mut args = pull_args(&host, s, &reference, "m-arm");
    args.extend(["--platform", "linux/arm64"]);
    pulled(&kiln(&args, &dir, None));
    assert_eq!(
        cli_image_util::debugfs_cat(&store.join("m-arm/rootfs.ext4"), "/etc/arch"),
        b"arm64"
    );
    let mut args = pull_args(&host, s, &reference, "m-s390");
    args.extend(["--platform", "linux/s390x"]);
    let line = refused(&kiln(&args, &dir, None));
    assert!(line.contains("multi:latest"), "{line}");
    drop(registry);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn image_pull_uses_credentials_and_says_when_they_are_wrong() {
    if !is_root() {
        eprintln!("skipped: kiln image pull needs root");
        return;
    }
    let dir = scratch("oci-auth");
    let registry = Registry::start(&dir, Some(("ci", "s3cret")));
    let host = registry.host();
    let layer = tar(|b| file(b, "hello", b"hi\n"));
    registry.image(
        "private/app",
        "1",
        false,
        "amd64",
        &[(OCI_GZIP, gzip(&layer), layer)],
        serde_json::json!({}),
    );
    let store = dir.join("store");
    let s = store.to_str().unwrap();
    let reference = format!("{host}/private/app:1");
    let args = pull_args(&host, s, &reference, "app");
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();

    let line = refused(&kiln(&args, &empty, None));
    assert!(line.contains("no credentials for 127.0.0.1"), "{line}");
    store_is_empty(&store);

    let wrong = format!(
        r#"{{"auths": {{"{host}": {{"auth": "{}"}}}}}}"#,
        base64::engine::general_purpose::STANDARD.encode("ci:wrong")
    );
    let line = refused(&kiln(&args, &empty, Some(&wrong)));
    assert!(
        line.contains("refused the credentials") && line.contains("$DOCKER_AUTH_CONFIG"),
        "{line}"
    );
    store_is_empty(&store);

    let docker_config = dir.join("docker");
    std::fs::create_dir_all(&docker_config).unwrap();
    std::fs::write(
        docker_config.join("config.json"),
        format!(r#"{{"auths": {{"http://{host}": {{"username": "ci", "password": "s3cret"}}}}}}"#),
    )
    .unwrap();
    pulled(&kiln(&args, &docker_config, None));
    assert_eq!(
        cli_image_util::debugfs_cat(&store.join("app/rootfs.ext4"), "/hello"),
        b"hi\n"
    );
    drop(registry);
    std::fs::remove_dir_all(dir).unwrap();
}

/// A bearer-token front for `registry`, as Docker Hub and most registries work: every
/// request without the token gets `401` with a `WWW-Authenticate: Bearer` challenge that
/// names the token endpoint (`/token` here); the token endpoint hands out the token to
/// anyone (`user` None: an anonymous pull) or to that user's basic credentials alone.
/// Requests with the token are passed on to the registry. Returns the front's port.
fn token_front(upstream: u16, user: Option<(&'static str, &'static str)>) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            let text = String::from_utf8_lossy(&head).into_owned();
            let header = |name: &str| {
                text.lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(": ")?;
                        k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
                    })
                    .unwrap_or_default()
            };
            let target = text.split(' ').nth(1).unwrap_or("/").to_string();
            let reply = |conn: &mut TcpStream, status: &str, extra: &str, body: &str| {
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status}\r\nConnection: close\r\nContent-Type: application/json\r\n\
                     Content-Length: {}\r\n{extra}\r\n{body}",
                    body.len()
                );
            };
            if target.starts_with("/token") {
                let wanted = user.map(|(u, p)| {
                    let b = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
                    format!("Basic {b}")
                });
                if wanted.is_none_or(|w| header("Authorization") == w) {
                    reply(&mut conn, "200 OK", "", r#"{"token": "kiln-test-token"}"#);
                } else {
                    reply(
                        &mut conn,
                        "401 Unauthorized",
                        "",
                        r#"{"details": "bad credentials"}"#,
                    );
                }
                continue;
            }
            if header("Authorization") != "Bearer kiln-test-token" {
                let challenge = format!(
                    "WWW-Authenticate: Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"kiln-test\"\r\n"
                );
                reply(&mut conn, "401 Unauthorized", &challenge, "{}");
                continue;
            }
            // GETs and HEADs only (a pull): no body to pass on.
            let Ok(mut up) = TcpStream::connect(("127.0.0.1", upstream)) else {
                continue;
            };
            let request = text.replacen("\r\n", "\r\nConnection: close\r\n", 1);
            let _ = up.write_all(request.as_bytes());
            let _ = std::io::copy(&mut up, &mut conn);
        }
    });
    port
}

#[test]
fn image_pull_takes_a_bearer_token_anonymously_or_for_credentials() {
    if !is_root() {
        eprintln!("skipped: kiln image pull needs root");
        return;
    }
    let dir = scratch("oci-token");
    let registry = Registry::start(&dir, None);
    let layer = tar(|b| file(b, "hello", b"token\n"));
    registry.image(
        "app",
        "1",
        false,
        "amd64",
        &[(OCI_GZIP, gzip(&layer), layer)],
        serde_json::json!({}),
    );
    let store = dir.join("store");
    let s = store.to_str().unwrap();

    let anonymous = format!("127.0.0.1:{}", token_front(registry.port, None));
    let reference = format!("{anonymous}/app:1");
    pulled(&kiln(
        &pull_args(&anonymous, s, &reference, "anon"),
        &dir,
        None,
    ));
    assert_eq!(
        cli_image_util::debugfs_cat(&store.join("anon/rootfs.ext4"), "/hello"),
        b"token\n"
    );

    let private = format!(
        "127.0.0.1:{}",
        token_front(registry.port, Some(("ci", "t0ken")))
    );
    let reference = format!("{private}/app:1");
    let args = pull_args(&private, s, &reference, "private");
    let creds = |password: &str| {
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("ci:{password}"));
        format!(r#"{{"auths": {{"{private}": {{"auth": "{auth}"}}}}}}"#)
    };
    let line = refused(&kiln(&args, &dir, Some(&creds("wrong"))));
    assert!(
        line.contains("refused the credentials") && line.contains("$DOCKER_AUTH_CONFIG"),
        "{line}"
    );
    assert!(!store.join("private").exists());
    pulled(&kiln(&args, &dir, Some(&creds("t0ken"))));
    assert_eq!(
        cli_image_util::debugfs_cat(&store.join("private/rootfs.ext4"), "/hello"),
        b"token\n"
    );
    drop(registry);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn image_pull_refuses_bad_input_and_leaves_nothing() {
    if !is_root() {
        eprintln!("skipped: kiln image pull needs root");
        return;
    }
    let dir = scratch("oci-bad");
    let registry = Registry::start(&dir, None);
    let host = registry.host();
    let store = dir.join("store");
    let s = store.to_str().unwrap();
    let pull = |reference: &str| {
        let reference = format!("{host}/{reference}");
        refused(&kiln(&pull_args(&host, s, &reference, "bad"), &dir, None))
    };

    let layer = tar(|b| file(b, "a", b"a"));
    registry.image(
        "ok",
        "1",
        false,
        "amd64",
        &[(OCI_GZIP, gzip(&layer), layer)],
        serde_json::json!({}),
    );
    let line = pull("ok:nope");
    assert!(
        line.contains("ok:nope") && line.to_lowercase().contains("unknown"),
        "{line}"
    );
    store_is_empty(&store);

    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let reference = format!("127.0.0.1:{closed}/ok:1");
    let args = pull_args("127.0.0.1", s, &reference, "bad");
    let mut args: Vec<String> = args.into_iter().map(String::from).collect();
    let at = args.iter().position(|a| a == "127.0.0.1").unwrap();
    args[at] = format!("127.0.0.1:{closed}");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let line = refused(&kiln(&args, &dir, None));
    assert!(line.contains("onnect"), "{line}");
    store_is_empty(&store);

    // A gzip stream cut in half (the registry stores it under its own digest).
    let big: Vec<u8> = (0..200_000u32).map(|i| (i * 7919 % 251) as u8).collect();
    let layer = tar(|b| file(b, "big", &big));
    let cut = gzip(&layer);
    let cut = cut[..cut.len() / 2].to_vec();
    registry.image(
        "cut",
        "1",
        false,
        "amd64",
        &[(OCI_GZIP, cut, layer)],
        serde_json::json!({}),
    );
    let line = pull("cut:1");
    assert!(line.contains("truncated or corrupt"), "{line}");
    store_is_empty(&store);

    // A blob changed in the registry's storage after the push.
    let layer = tar(|b| file(b, "x", b"original"));
    let blob = gzip(&layer);
    let digest = sha256(&blob);
    registry.image(
        "changed",
        "1",
        false,
        "amd64",
        &[(OCI_GZIP, blob.clone(), layer)],
        serde_json::json!({}),
    );
    let mut altered = blob;
    let last = altered.len() - 9;
    altered[last] ^= 0xff;
    std::fs::write(registry.blob_file(&digest), altered).unwrap();
    let line = pull("changed:1");
    assert!(line.to_lowercase().contains("digest"), "{line}");
    store_is_empty(&store);

    // Layers that would write outside the root.
    let passwd = std::fs::read("/etc/passwd").unwrap();
    let escapes = [
        tar(|b| {
            let mut h = header(tar::EntryType::Symlink, 0o777, 0);
            b.append_link(&mut h, "a", "/etc").unwrap();
            file(b, "a/passwd", b"escaped\n");
        }),
        tar(|b| raw_file(b, "../escaped", b"escaped\n")),
        tar(|b| raw_file(b, "/etc/passwd", b"escaped\n")),
        // A relative symlink that climbs out, then a write through it.
        tar(|b| {
            let mut h = header(tar::EntryType::Symlink, 0o777, 0);
            b.append_link(&mut h, "up", "../../../../../../..").unwrap();
            file(b, "up/escaped", b"escaped\n");
        }),
        // Hard links to a file outside: by `..`, by an absolute path, through a symlink.
        tar(|b| raw_link(b, "pw", "../../../../../../../etc/passwd")),
        tar(|b| raw_link(b, "pw", "/etc/passwd")),
        tar(|b| {
            let mut h = header(tar::EntryType::Symlink, 0o777, 0);
            b.append_link(&mut h, "e", "/etc").unwrap();
            raw_link(b, "pw", "e/passwd");
        }),
    ];
    for (i, layer) in escapes.into_iter().enumerate() {
        let repo = format!("escape{i}");
        registry.image(
            &repo,
            "1",
            false,
            "amd64",
            &[(OCI_GZIP, gzip(&layer), layer)],
            serde_json::json!({}),
        );
        let line = pull(&format!("{repo}:1"));
        assert!(line.contains("must not write outside"), "{line}");
        store_is_empty(&store);
    }
    // A symlink out of the root in one layer, a write through it in the next.
    let lower = tar(|b| {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        b.append_link(&mut h, "etc", "/etc").unwrap();
    });
    let upper = tar(|b| file(b, "etc/passwd", b"escaped\n"));
    registry.image(
        "escape-across",
        "1",
        false,
        "amd64",
        &[
            (OCI_GZIP, gzip(&lower), lower),
            (OCI_GZIP, gzip(&upper), upper),
        ],
        serde_json::json!({}),
    );
    let line = pull("escape-across:1");
    assert!(line.contains("must not write outside"), "{line}");
    store_is_empty(&store);
    assert_eq!(std::fs::read("/etc/passwd").unwrap(), passwd);
    assert!(!dir.join("escaped").exists() && !store.join("../escaped").exists());

    let line = refused(&kiln(
        &pull_args(&host, s, "Not A Reference", "bad"),
        &dir,
        None,
    ));
    assert!(line.contains("not an image reference"), "{line}");
    drop(registry);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn image_import_takes_docker_save_archives_and_oci_layouts() {
    if !is_root() {
        eprintln!("skipped: kiln image import needs root");
        return;
    }
    let dir = scratch("oci-archive");
    let store = dir.join("store");
    let s = store.to_str().unwrap();
    let layers = two_layers();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {"WorkingDir": "/w"},
    }))
    .unwrap();
    let import = |name: &str, path: &Path| {
        let args = [
            "image",
            "import",
            "--name",
            name,
            "--store",
            s,
            "--agent",
            STATIC_ELF,
            "--json",
            path.to_str().unwrap(),
        ];
        kiln(&args, &dir, None)
    };
    let check = |name: &str| {
        let image = store.join(name).join("rootfs.ext4");
        assert_eq!(
            cli_image_util::debugfs_cat(&image, "/etc/hostname"),
            b"upper\n"
        );
        assert_eq!(names_in(&image, "/opq"), ["new"], "the opaque directory");
        assert!(!names_in(&image, "/").contains(&"gone.txt".to_string()));
    };

    // What `docker save` writes: manifest.json naming the config and the layer files.
    let saved = dir.join("saved.tar");
    let archive = tar(|b| {
        file(b, "cfg.json", &config);
        add_dir(b, "l1");
        file(b, "l1/layer.tar", &layers[0].2);
        add_dir(b, "l2");
        file(b, "l2/layer.tar", &layers[1].1); // compressed layers are fine too
        let manifest = serde_json::json!([{
            "Config": "cfg.json", "RepoTags": ["t:1"], "Layers": ["l1/layer.tar", "l2/layer.tar"],
        }]);
        file(b, "manifest.json", &serde_json::to_vec(&manifest).unwrap());
    });
    std::fs::write(&saved, archive).unwrap();
    let json = pulled(&import("saved", &saved));
    assert_eq!(json["source"]["defaults"]["working_dir"], "/w", "{json}");
    check("saved");

    // An OCI image layout directory.
    let layout = dir.join("layout");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |media_type: &str, data: &[u8]| {
        let digest = sha256(data);
        std::fs::write(blobs.join(&digest[7..]), data).unwrap();
        serde_json::json!({"mediaType": media_type, "digest": digest, "size": data.len()})
    };
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": put(OCI_CONFIG, &config),
        "layers": [put(OCI_GZIP, &layers[0].1), put(OCI_ZSTD, &layers[1].1)],
    });
    let mut desc = put(OCI_MANIFEST, &serde_json::to_vec(&manifest).unwrap());
    desc["platform"] = serde_json::json!({"os": "linux", "architecture": "amd64"});
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [desc]});
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion": "1.0.0"}"#,
    )
    .unwrap();
    pulled(&import("layout", &layout));
    check("layout");

    // A layout blob that does not match its digest is refused, and nothing is kept.
    let layer = blobs.join(&sha256(&layers[1].1)[7..]);
    let mut data = std::fs::read(&layer).unwrap();
    data[20] ^= 0xff;
    std::fs::write(&layer, data).unwrap();
    let line = refused(&import("corrupt", &layout));
    assert!(line.contains("corrupt"), "{line}");
    assert!(!store.join("corrupt").exists());
    std::fs::remove_dir_all(dir).unwrap();
}
