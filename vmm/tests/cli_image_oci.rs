//! `kiln image pull` against a real registry on loopback: Debian's `docker-registry`
//! started by each test with its own storage (and htpasswd file where auth is under
//! test), the test images built and pushed here over HTTP — layers as tar streams, a
//! config, manifests and an index. The pulled ext4 images are read with debugfs.
//!
//! Needs root (a pull keeps the layers' owners) and the `docker-registry`,
//! `apache2-utils` and `e2fsprogs` packages (`cargo xtask setup` installs them).

mod util;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Output;

use base64::Engine;
use kiln_tests::registry::{
    sha256, Layer, Registry, DOCKER_GZIP, DOCKER_LIST, OCI_CONFIG, OCI_GZIP, OCI_MANIFEST, OCI_ZSTD,
};
use util::image::{debugfs, debugfs_cat, names_in, store_entries, STATIC_ELF};
use util::{failed_cleanly, root_scratch};

/// A scratch directory `name` with a registry serving from it, taking only `login` when
/// given one; `None` (and a note) unless root, which a pull needs.
fn registry(name: &str, login: Option<(&str, &str)>) -> Option<(PathBuf, Registry)> {
    let dir = root_scratch(name)?;
    let registry = Registry::start_with_login(&dir, login).expect("a registry on loopback");
    Some((dir, registry))
}

/// Pushes `layers` as `repo:tag`, an amd64 image with an OCI manifest and an empty config.
fn push(registry: &Registry, repo: &str, layers: &[Layer<'_>]) {
    let (repo, tag) = repo.split_once(':').unwrap();
    registry
        .image((repo, tag), false, "amd64", layers, serde_json::json!({}))
        .unwrap();
}

/// A gzip layer of `tar`.
fn gzipped(tar: Vec<u8>) -> Layer<'static> {
    Layer::new(OCI_GZIP, gzip(&tar), tar)
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
    let mut cmd = util::image::kiln_cmd(args);
    cmd.env_remove("DOCKER_AUTH_CONFIG")
        .env("DOCKER_CONFIG", docker_config);
    if let Some(json) = auth_env {
        cmd.env("DOCKER_AUTH_CONFIG", json);
    }
    cmd.output().expect("run kiln")
}

/// A config.json text (what `$DOCKER_AUTH_CONFIG` holds) with `user:password` for `host`.
fn auths(host: &str, user: &str, password: &str) -> String {
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!(r#"{{"auths": {{"{host}": {{"auth": "{auth}"}}}}}}"#)
}

/// A `$DOCKER_CONFIG` directory `dir/name` whose config.json is `json`.
fn docker_config(dir: &Path, name: &str, json: &str) -> PathBuf {
    let config = dir.join(name);
    std::fs::create_dir_all(&config).unwrap();
    std::fs::write(config.join("config.json"), json).unwrap();
    config
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
    let stderr = failed_cleanly("the pull", out);
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

/// Every path under `dir`, sorted (none if it does not exist).
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        paths.push(entry.path());
        if entry.file_type().unwrap().is_dir() {
            paths.extend(tree(&entry.path()));
        }
    }
    paths.sort();
    paths
}

/// A base layer (gzip) and an upper one (zstd) that deletes, hides and replaces.
fn two_layers() -> Vec<Layer<'static>> {
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
    vec![gzipped(base), Layer::new(OCI_ZSTD, zstd(&upper), upper)]
}

#[test]
fn image_pull_by_tag_and_by_digest_applies_layers_in_order() {
    let Some((dir, registry)) = registry("oci-pull", None) else {
        return;
    };
    let host = registry.host();
    let config = serde_json::json!({
        "Env": ["PATH=/usr/bin:/bin", "KILN_TEST=1"], "WorkingDir": "/work", "User": "1000",
    });
    let manifest = registry
        .image(("ci/tool", "v1"), false, "amd64", &two_layers(), config)
        .unwrap();
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
    assert_eq!(debugfs_cat(&image, "/etc/hostname"), b"upper\n");
    assert_eq!(
        debugfs_cat(&image, "/etc/hostname-link"),
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
        std::fs::remove_file(registry.blob_file(&sha256(&layer.blob))).unwrap();
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
    let Some((dir, registry)) = registry("oci-index", None) else {
        return;
    };
    let host = registry.host();
    let mut entries = Vec::new();
    for arch in ["arm64", "amd64"] {
        let layer = tar(|b| {
            add_dir(b, "etc");
            file(b, "etc/arch", arch.as_bytes());
        });
        let layers = [Layer::new(DOCKER_GZIP, gzip(&layer), layer)];
        let mut desc = registry
            .image(("multi", arch), true, arch, &layers, serde_json::json!({}))
            .unwrap();
        desc["platform"] = serde_json::json!({"os": "linux", "architecture": arch});
        entries.push(desc);
    }
    let index =
        serde_json::json!({"schemaVersion": 2, "mediaType": DOCKER_LIST, "manifests": entries});
    registry
        .manifest("multi", "latest", DOCKER_LIST, &index)
        .unwrap();
    let store = dir.join("store");
    let s = store.to_str().unwrap();
    let reference = format!("{host}/multi:latest");
    let json = pulled(&kiln(&pull_args(&host, s, &reference, "m"), &dir, None));
    assert_eq!(json["digest"], entries[1]["digest"], "{json}");
    assert_eq!(
        debugfs_cat(&store.join("m/rootfs.ext4"), "/etc/arch"),
        b"amd64"
    );
    let mut args = pull_args(&host, s, &reference, "m-arm");
    args.extend(["--platform", "linux/arm64"]);
    pulled(&kiln(&args, &dir, None));
    assert_eq!(
        debugfs_cat(&store.join("m-arm/rootfs.ext4"), "/etc/arch"),
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
    let Some((dir, registry)) = registry("oci-auth", Some(("ci", "s3cret"))) else {
        return;
    };
    let host = registry.host();
    let layer = tar(|b| file(b, "hello", b"hi\n"));
    push(&registry, "private/app:1", &[gzipped(layer)]);
    let store = dir.join("store");
    let s = store.to_str().unwrap();
    let reference = format!("{host}/private/app:1");
    let args = pull_args(&host, s, &reference, "app");
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();

    let line = refused(&kiln(&args, &empty, None));
    assert!(line.contains("no credentials for 127.0.0.1"), "{line}");
    store_is_empty(&store);

    let line = refused(&kiln(&args, &empty, Some(&auths(&host, "ci", "wrong"))));
    assert!(
        line.contains("refused the credentials") && line.contains("$DOCKER_AUTH_CONFIG"),
        "{line}"
    );
    store_is_empty(&store);

    let docker_config = docker_config(
        &dir,
        "docker",
        &format!(r#"{{"auths": {{"http://{host}": {{"username": "ci", "password": "s3cret"}}}}}}"#),
    );
    pulled(&kiln(&args, &docker_config, None));
    assert_eq!(
        debugfs_cat(&store.join("app/rootfs.ext4"), "/hello"),
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
    let Some((dir, registry)) = registry("oci-token", None) else {
        return;
    };
    let layer = tar(|b| file(b, "hello", b"token\n"));
    push(&registry, "app:1", &[gzipped(layer)]);
    let store = dir.join("store");
    let s = store.to_str().unwrap();

    let anonymous = format!("127.0.0.1:{}", token_front(registry.port(), None));
    let reference = format!("{anonymous}/app:1");
    pulled(&kiln(
        &pull_args(&anonymous, s, &reference, "anon"),
        &dir,
        None,
    ));
    assert_eq!(
        debugfs_cat(&store.join("anon/rootfs.ext4"), "/hello"),
        b"token\n"
    );

    let private = format!(
        "127.0.0.1:{}",
        token_front(registry.port(), Some(("ci", "t0ken")))
    );
    let reference = format!("{private}/app:1");
    let args = pull_args(&private, s, &reference, "private");
    let before = tree(&store);
    let line = refused(&kiln(&args, &dir, Some(&auths(&private, "ci", "wrong"))));
    assert!(
        line.contains("refused the credentials") && line.contains("$DOCKER_AUTH_CONFIG"),
        "{line}"
    );
    assert_eq!(tree(&store), before, "a refused pull leaves nothing");
    pulled(&kiln(&args, &dir, Some(&auths(&private, "ci", "t0ken"))));
    assert_eq!(
        debugfs_cat(&store.join("private/rootfs.ext4"), "/hello"),
        b"token\n"
    );

    // The same from a credentials file ($DOCKER_CONFIG/config.json), for an image whose
    // layer is not in the store yet.
    let layer = tar(|b| file(b, "hello", b"from file\n"));
    push(&registry, "app:2", &[gzipped(layer)]);
    let reference = format!("{private}/app:2");
    let from_file = pull_args(&private, s, &reference, "from-file");
    let wrong = docker_config(&dir, "wrong", &auths(&private, "ci", "wrong"));
    let before = tree(&store);
    let line = refused(&kiln(&from_file, &wrong, None));
    let file = wrong.join("config.json");
    assert!(
        line.contains("refused the credentials") && line.contains(file.to_str().unwrap()),
        "{line}"
    );
    assert_eq!(tree(&store), before, "a refused pull leaves nothing");
    let good = docker_config(&dir, "good", &auths(&private, "ci", "t0ken"));
    let json = pulled(&kiln(&from_file, &good, None));
    assert_eq!(json["fetched"], true, "{json}");
    assert_eq!(
        debugfs_cat(&store.join("from-file/rootfs.ext4"), "/hello"),
        b"from file\n"
    );
    drop(registry);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn image_pull_refuses_bad_input_and_leaves_nothing() {
    let Some((dir, registry)) = registry("oci-bad", None) else {
        return;
    };
    let host = registry.host();
    let store = dir.join("store");
    let s = store.to_str().unwrap();
    let pull = |reference: &str| {
        let reference = format!("{host}/{reference}");
        refused(&kiln(&pull_args(&host, s, &reference, "bad"), &dir, None))
    };

    let layer = tar(|b| file(b, "a", b"a"));
    push(&registry, "ok:1", &[gzipped(layer)]);
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
    push(&registry, "cut:1", &[Layer::new(OCI_GZIP, cut, layer)]);
    let line = pull("cut:1");
    assert!(line.contains("truncated or corrupt"), "{line}");
    store_is_empty(&store);

    // A blob changed in the registry's storage after the push.
    let layer = tar(|b| file(b, "x", b"original"));
    let blob = gzip(&layer);
    let digest = sha256(&blob);
    push(
        &registry,
        "changed:1",
        &[Layer::new(OCI_GZIP, blob.clone(), layer)],
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
        push(&registry, &format!("{repo}:1"), &[gzipped(layer)]);
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
    push(
        &registry,
        "escape-across:1",
        &[gzipped(lower), gzipped(upper)],
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
    let Some(dir) = root_scratch("oci-archive") else {
        return;
    };
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
        assert_eq!(debugfs_cat(&image, "/etc/hostname"), b"upper\n");
        assert_eq!(names_in(&image, "/opq"), ["new"], "the opaque directory");
        assert!(!names_in(&image, "/").contains(&"gone.txt".to_string()));
    };

    // What `docker save` writes: manifest.json naming the config and the layer files.
    let saved = dir.join("saved.tar");
    let archive = tar(|b| {
        file(b, "cfg.json", &config);
        add_dir(b, "l1");
        file(b, "l1/layer.tar", &layers[0].tar);
        add_dir(b, "l2");
        file(b, "l2/layer.tar", &layers[1].blob); // compressed layers are fine too
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
        "layers": [put(OCI_GZIP, &layers[0].blob), put(OCI_ZSTD, &layers[1].blob)],
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
    let layer = blobs.join(&sha256(&layers[1].blob)[7..]);
    let mut data = std::fs::read(&layer).unwrap();
    data[20] ^= 0xff;
    std::fs::write(&layer, data).unwrap();
    let line = refused(&import("corrupt", &layout));
    assert!(line.contains("corrupt"), "{line}");
    assert!(!store.join("corrupt").exists());
    std::fs::remove_dir_all(dir).unwrap();
}
