//! `kiln jail`: run a kiln command confined (see `kiln::jail`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use crate::cli::JailArgs;
use crate::jail::{host_paths, Jail, JailSpec, DEFAULT_BASE, DEFAULT_ID, DEFAULT_UID_RANGE};

pub fn jail(args: &JailArgs) -> anyhow::Result<ExitCode> {
    let base = args
        .base
        .clone()
        .or_else(|| std::env::var_os("KILN_JAIL_BASE").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_BASE));
    // Without --uid, the jail takes a uid of its own from the range (Jail::start), and
    // the gid of the same number unless --gid names one.
    let uid_range = match args.uid {
        Some(_) => None,
        None => Some(args.uid_range.unwrap_or(DEFAULT_UID_RANGE)),
    };
    let spec = JailSpec {
        id: args.id.clone(),
        uid: args.uid.unwrap_or(0),
        gid: args.gid.unwrap_or(DEFAULT_ID),
        uid_range,
        gid_from_uid: args.uid.is_none() && args.gid.is_none(),
        base,
        files: args.file.clone(),
        images: store_images(args)?,
        taps: args.tap.clone(),
        kiln: std::env::current_exe().context("cannot find the kiln executable")?,
        args: args.command.clone(),
        keep: args.keep,
        max_fds: args.max_fds,
        max_file_bytes: args.max_file_gib.saturating_mul(1 << 30),
    };
    let mut jail = Jail::start(&spec)?;
    eprintln!(
        "kiln jail: {} runs as pid {} (uid {}, gid {}) with the root {}",
        spec.id,
        jail.pid,
        jail.uid,
        jail.gid,
        jail.dir.root.display()
    );
    for (flag, value, host) in host_paths(&spec.args, &jail.dir.root) {
        eprintln!(
            "kiln jail: {flag} {value} is {} on the host",
            host.display()
        );
    }
    let code = jail.wait()?;
    drop(jail);
    Ok(ExitCode::from(code))
}

/// The store directory of each `--image`, checked to hold an ext4 root disk: a missing
/// image is refused here, naming the images the store has, before any jail is made.
fn store_images(args: &JailArgs) -> anyhow::Result<Vec<PathBuf>> {
    let store = crate::image::Store::locate(args.store.as_deref());
    args.image
        .iter()
        .map(|name| {
            let rootfs = store.rootfs(name)?;
            Ok(rootfs
                .parent()
                .expect("a store image's root disk is in its directory")
                .to_owned())
        })
        .collect()
}
