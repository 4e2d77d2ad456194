//! `kiln cp`: copy a file into or out of a running VM. The guest side is written
//! `vm:/path`.

use std::fs::File;
use std::process::ExitCode;

use anyhow::{bail, Context};

use super::exec::connect_agent;
use crate::cli::CpArgs;

const GUEST_PREFIX: &str = "vm:";

pub fn cp(args: &CpArgs) -> anyhow::Result<ExitCode> {
    let mut client = connect_agent(&args.vsock)?;
    match (
        args.src.strip_prefix(GUEST_PREFIX),
        args.dst.strip_prefix(GUEST_PREFIX),
    ) {
        (None, Some(guest)) => {
            let mut file =
                File::open(&args.src).with_context(|| format!("cannot read {}", args.src))?;
            let mode = match args.mode {
                Some(m) => m,
                None => {
                    use std::os::unix::fs::PermissionsExt;
                    file.metadata()?.permissions().mode() & 0o7777
                }
            };
            let sent = client
                .put_file(guest, mode, &mut file)
                .with_context(|| format!("cannot write {guest} in the guest"))?;
            tracing::debug!("copied {sent} bytes to {guest}");
        }
        (Some(guest), None) => {
            // Write next to the destination and rename, so a failed copy leaves no
            // half-written file under the destination's name.
            let tmp = format!("{}.kiln-cp-{}", args.dst, std::process::id());
            let result = File::create(&tmp)
                .with_context(|| format!("cannot create {tmp}"))
                .and_then(|mut f| {
                    client
                        .get_file(guest, &mut f)
                        .with_context(|| format!("cannot read {guest} from the guest"))
                });
            match result {
                Ok(info) => {
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(
                        &tmp,
                        std::fs::Permissions::from_mode(info.mode & 0o7777),
                    )?;
                    std::fs::rename(&tmp, &args.dst)
                        .with_context(|| format!("cannot move the copy to {}", args.dst))?;
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e);
                }
            }
        }
        _ => bail!("exactly one of SRC and DST must be a guest path, written {GUEST_PREFIX}/path"),
    }
    Ok(ExitCode::SUCCESS)
}
