//! `PutFile` and `GetFile`: files streamed in chunks, never held whole in memory.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{ConnectionError, Sender};
use crate::protocol::{read_frame, FileInfo, Frame, GetFile, Kind, PutFile, CHUNK_LEN};

/// Receives the `Data` frames of a `PutFile` into a temporary file next to the target and
/// renames it into place at `DataEnd`; answers `Ok` or `Error`. A local failure is reported
/// after the client has sent all its data, so the stream stays in step.
pub(super) fn put(
    req: &PutFile,
    reader: &mut dyn Read,
    out: &Sender,
) -> Result<(), ConnectionError> {
    let mut upload = Upload::start(req);
    loop {
        match read_frame(reader)? {
            Some(Frame::Data(bytes)) => upload.write(&bytes),
            Some(Frame::DataEnd) => break,
            Some(other) => {
                return Err(ConnectionError::Unexpected(format!(
                    "{} frame in the middle of a PutFile; expected Data or DataEnd",
                    other.kind()
                )));
            }
            None => {
                return Err(ConnectionError::Unexpected(
                    "the client closed the connection in the middle of a PutFile".into(),
                ));
            }
        }
    }
    match upload.finish() {
        Ok(()) => out.frame(&Frame::Ok)?,
        Err(message) => out.error(&message)?,
    }
    Ok(())
}

/// A file being received, or the first error that stopped it. Dropping it unfinished
/// removes the temporary file.
struct Upload {
    path: PathBuf,
    mode: u32,
    state: Result<(PathBuf, File), String>,
}

impl Upload {
    fn start(req: &PutFile) -> Upload {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = PathBuf::from(&req.path);
        let mode = req.mode & 0o7777;
        let state = if !path.is_absolute() {
            Err(format!("PutFile path {:?} must be absolute", req.path))
        } else if let Some(name) = path.file_name() {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let mut tmp_name = name.to_owned();
            tmp_name.push(format!(".kiln-part-{}-{n}", std::process::id()));
            let tmp = path.with_file_name(tmp_name);
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&tmp)
                .map(|f| (tmp, f))
                .map_err(|e| format!("creating {}: {e}", path.display()))
        } else {
            Err(format!("PutFile path {:?} names no file", req.path))
        };
        Upload { path, mode, state }
    }

    fn write(&mut self, bytes: &[u8]) {
        if let Ok((_, file)) = &mut self.state {
            if let Err(e) = file.write_all(bytes) {
                let message = format!("writing {}: {e}", self.path.display());
                self.fail(message);
            }
        }
    }

    fn fail(&mut self, message: String) {
        self.abandon();
        self.state = Err(message);
    }

    /// Removes the temporary file, if any.
    fn abandon(&mut self) {
        if let Ok((tmp, _)) = &self.state {
            let _ = fs::remove_file(tmp);
        }
    }

    fn finish(mut self) -> Result<(), String> {
        let (tmp, file) = std::mem::replace(&mut self.state, Err(String::new()))?;
        let done = file
            // The umask may have cut bits from the mode given at creation.
            .set_permissions(fs::Permissions::from_mode(self.mode))
            .and_then(|()| fs::rename(&tmp, &self.path));
        done.map_err(|e| {
            let _ = fs::remove_file(&tmp);
            format!("writing {}: {e}", self.path.display())
        })
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        self.abandon();
    }
}

/// Sends `FileInfo`, the file in `Data` chunks and `DataEnd`; or `Error` if it cannot be
/// read (in place of `DataEnd` if reading fails midway).
pub(super) fn get(req: &GetFile, out: &Sender) -> Result<(), ConnectionError> {
    let path = Path::new(&req.path);
    let opened = if path.is_absolute() {
        open_regular(path).map_err(|e| format!("opening {}: {e}", path.display()))
    } else {
        Err(format!("GetFile path {:?} must be absolute", req.path))
    };
    let (mut file, info) = match opened {
        Ok(x) => x,
        Err(message) => {
            out.error(&message)?;
            return Ok(());
        }
    };
    out.frame(&Frame::FileInfo(info))?;
    let mut buf = vec![0u8; CHUNK_LEN];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.raw(Kind::Data, &buf[..n])?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                out.error(&format!("reading {}: {e}", path.display()))?;
                return Ok(());
            }
        }
    }
    out.frame(&Frame::DataEnd)?;
    Ok(())
}

fn open_regular(path: &Path) -> io::Result<(File, FileInfo)> {
    let file = File::open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    let info = FileInfo {
        size: meta.len(),
        mode: meta.permissions().mode() & 0o7777,
    };
    Ok((file, info))
}
