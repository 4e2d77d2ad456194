//! `kiln image build|import|pull|ls|rm|verify`.

use std::process::ExitCode;
use std::time::Instant;

use crate::cli::{ImageArgs, ImageCommand, LsArgs, MakeArgs, PullArgs, VerifyArgs};
use crate::image::build::{build, BuildSpec};
use crate::image::import::{import, ImportSpec};
use crate::image::rootfs::locate_agent;
use crate::image::{ImageMeta, Store};

const MIB: f64 = (1u64 << 20) as f64;

pub fn image(args: &ImageArgs) -> anyhow::Result<ExitCode> {
    match &args.command {
        ImageCommand::Build(b) => {
            let spec = BuildSpec {
                name: b.make.name.clone(),
                suite: b.debian.clone(),
                mirror: b.mirror.clone(),
                packages: b.packages.clone(),
                size_mib: b.make.rootfs.size,
                agent: locate_agent(b.make.rootfs.agent.as_deref())?,
                force: b.make.force,
            };
            made(&b.make, |store| build(store, &spec))
        }
        ImageCommand::Import(i) => {
            let spec = ImportSpec {
                name: i.make.name.clone(),
                tarball: i.tarball.clone(),
                size_mib: i.make.rootfs.size,
                agent: locate_agent(i.make.rootfs.agent.as_deref())?,
                force: i.make.force,
            };
            // A `docker save` archive or an OCI layout has layers to apply, not a tree.
            match crate::image::oci::archive::detect(&i.tarball) {
                Some(kind) => made(&i.make, |store| {
                    crate::image::oci::archive::import(store, &spec, kind, &i.tarball)
                }),
                None => made(&i.make, |store| import(store, &spec)),
            }
        }
        ImageCommand::Pull(p) => pull(p),
        ImageCommand::Ls(ls) => list(ls),
        ImageCommand::Rm(rm) => {
            Store::locate(rm.store.store.as_deref()).remove(&rm.name)?;
            eprintln!("kiln: removed image {}", rm.name);
            Ok(ExitCode::SUCCESS)
        }
        ImageCommand::Verify(v) => verify(v),
    }
}

/// Checks each image named (default: all) and says on stdout which hold; the ones that do
/// not, and why, go to stderr. Exit 1 if any failed, or if there was nothing to check.
fn verify(args: &VerifyArgs) -> anyhow::Result<ExitCode> {
    let store = Store::locate(args.store.store.as_deref());
    let names: Vec<String> = if args.names.is_empty() {
        store.list().into_iter().map(|l| l.name).collect()
    } else {
        args.names.clone()
    };
    if names.is_empty() {
        anyhow::bail!("no images in {} to verify", store.dir().display());
    }
    let mut failed = 0;
    for name in &names {
        match store.verify(name) {
            Ok(meta) => println!("{name}: ok (sha256 {})", meta.sha256),
            Err(e) => {
                eprintln!("kiln: error: {e}");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        eprintln!(
            "kiln: {failed} of {} image(s) failed verification",
            names.len()
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// `kiln image pull` in a kiln built without the `registry` feature.
#[cfg(not(feature = "registry"))]
fn pull(_args: &PullArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("this kiln was built without registry support (cargo feature `registry`)")
}

/// `kiln image pull`: one line on stderr when done, the metadata on stdout with --json.
#[cfg(feature = "registry")]
fn pull(args: &PullArgs) -> anyhow::Result<ExitCode> {
    use crate::image::oci::{pull, PullSpec};
    let start = Instant::now();
    let spec = PullSpec {
        reference: args.reference.clone(),
        name: args.name.clone(),
        platform: args.platform.parse()?,
        insecure: args.insecure_registry.clone(),
        size_mib: args.rootfs.size,
        agent: locate_agent(args.rootfs.agent.as_deref())?,
        force: args.force,
    };
    crate::image::interrupt::install()?;
    let store = Store::locate(args.store.store.as_deref());
    let pulled = pull(&store, &spec)?;
    let secs = start.elapsed().as_secs_f64();
    let what = if pulled.fetched {
        "pulled"
    } else {
        "already in the store"
    };
    eprintln!(
        "kiln: image {} ({}) {what}: {} in {secs:.1} s",
        pulled.meta.name,
        pulled.digest,
        pulled.dir.display(),
    );
    if args.json {
        let mut value = image_json(Some(&pulled.meta), &pulled.meta.name, &pulled.dir);
        value["digest"] = pulled.digest.into();
        value["fetched"] = pulled.fetched.into();
        value["pull_secs"] = secs.into();
        println!("{value}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs a builder and reports the new image: one line on stderr, and its metadata on
/// stdout with --json.
fn made<E: std::error::Error + Send + Sync + 'static>(
    make: &MakeArgs,
    builder: impl FnOnce(&Store) -> Result<(std::path::PathBuf, ImageMeta), E>,
) -> anyhow::Result<ExitCode> {
    let start = Instant::now();
    crate::image::interrupt::install()?;
    let store = Store::locate(make.store.store.as_deref());
    let (dir, meta) = builder(&store)?;
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "kiln: image {} in {} ({:.0} MiB filesystem, {:.0} MiB of files) in {secs:.1} s",
        meta.name,
        dir.display(),
        meta.size_bytes as f64 / MIB,
        meta.content_bytes as f64 / MIB,
    );
    if make.json {
        let mut value = image_json(Some(&meta), &meta.name, &dir);
        value["build_secs"] = secs.into();
        println!("{value}");
    }
    Ok(ExitCode::SUCCESS)
}

/// An image's metadata as JSON with the path of its ext4 file (what a VM boots) added.
fn image_json(meta: Option<&ImageMeta>, name: &str, dir: &std::path::Path) -> serde_json::Value {
    let mut value = match meta {
        Some(meta) => serde_json::to_value(meta).unwrap_or_default(),
        None => serde_json::json!({"name": name, "error": "unreadable image.json"}),
    };
    value["path"] = dir
        .join(crate::image::ROOTFS_FILE)
        .display()
        .to_string()
        .into();
    value
}

fn list(args: &LsArgs) -> anyhow::Result<ExitCode> {
    let store = Store::locate(args.store.store.as_deref());
    let images = store.list();
    if args.json {
        let rows: Vec<serde_json::Value> = images
            .iter()
            .map(|l| image_json(l.meta.as_ref(), &l.name, &store.dir().join(&l.name)))
            .collect();
        println!("{}", serde_json::Value::Array(rows));
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = vec![[
        "NAME".to_string(),
        "SIZE".into(),
        "FILES".into(),
        "CREATED (UTC)".into(),
        "SOURCE".into(),
    ]];
    for l in &images {
        table.push(match &l.meta {
            Some(m) => [
                l.name.clone(),
                format!("{:.0} MiB", m.size_bytes as f64 / MIB),
                format!("{:.0} MiB", m.content_bytes as f64 / MIB),
                utc(m.created_unix),
                m.source.summary(),
            ],
            None => [
                l.name.clone(),
                "?".into(),
                "?".into(),
                "?".into(),
                "(unreadable image.json)".into(),
            ],
        });
    }
    let widths: Vec<usize> = (0..4)
        .map(|c| table.iter().map(|row| row[c].len()).max().unwrap_or(0))
        .collect();
    for row in &table {
        let mut line = String::new();
        for (c, w) in widths.iter().enumerate() {
            line += &format!("{:<w$}  ", row[c]);
        }
        println!("{line}{}", row[4]);
    }
    if images.is_empty() {
        eprintln!("kiln: no images in {}", store.dir().display());
    }
    Ok(ExitCode::SUCCESS)
}

/// `YYYY-MM-DD HH:MM` for seconds since the epoch (UTC).
fn utc(secs: u64) -> String {
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let (hh, mm) = (secs % 86_400 / 3600, secs % 3600 / 60);
    let (y, m, d) = crate::civil::from_days(days);
    format!("{y:04}-{m:02}-{d:02} {hh:02}:{mm:02}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_dates() {
        assert_eq!(super::utc(0), "1970-01-01 00:00");
        assert_eq!(super::utc(951_782_400 + 3_660), "2000-02-29 01:01");
        assert_eq!(super::utc(1_798_675_200), "2026-12-31 00:00");
    }
}
