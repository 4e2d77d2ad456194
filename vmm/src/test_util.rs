//! What the library's unit tests share.

use std::path::PathBuf;

/// A fresh, empty directory `name` under this test process's own directory,
/// `$TMPDIR/kiln-unit-<pid>`. Each test uses names of its own.
pub(crate) fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir()
        .join(format!("kiln-unit-{}", std::process::id()))
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
