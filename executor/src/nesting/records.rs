//! The server's VMs on disk: one `<id>.json` per VM in `<state_dir>/vms/`, written before
//! Create answers and removed once Delete has destroyed the VM. A restarted server reads
//! them back, so the runner's List still finds (and Deletes) what runs.

use std::path::{Path, PathBuf};

use super::backend::VmRecord;

#[derive(Debug, Clone)]
pub struct Records {
    dir: PathBuf,
}

impl Records {
    pub fn open(state_dir: &Path) -> std::io::Result<Records> {
        let dir = state_dir.join("vms");
        std::fs::create_dir_all(&dir)?;
        Ok(Records { dir })
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Writes the record (to a temporary file renamed into place: never half a record).
    pub fn save(&self, vm: &VmRecord) -> std::io::Result<()> {
        let tmp = self.dir.join(format!(".{}.tmp", vm.id));
        let json = serde_json::to_vec(vm).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, json)?;
        std::fs::rename(&tmp, self.path(&vm.id))
    }

    pub fn remove(&self, id: &str) -> std::io::Result<()> {
        match std::fs::remove_file(self.path(id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every readable record; unreadable ones are reported and skipped.
    pub fn load(&self) -> std::io::Result<Vec<VmRecord>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<VmRecord>(&b).map_err(|e| e.to_string()))
            {
                Ok(vm) => out.push(vm),
                Err(e) => eprintln!("nesting: skipping the VM record {}: {e}", path.display()),
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }
}
