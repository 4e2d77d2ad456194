//! Taking a snapshot of the paused VM: the state of every part, and guest memory, full or
//! as a diff over the previous snapshot.
//!
//! A diff holds the pages written since the previous snapshot: those KVM's dirty log saw
//! the guest write, and those the VMM and its devices wrote (guest memory's dirty bitmap).
//! Both are read and cleared by every snapshot, full or diff, so the next diff starts from
//! the last snapshot. If a snapshot fails after that, the pages it took are lost to the
//! next diff; then the next snapshot must be full, and a diff is refused until it is.

use std::path::Path;

use super::Vmm;
use crate::memory::ram_ranges;
use crate::snapshot::memory::{take_bitmaps, write_memory};
use crate::snapshot::pages::PageSet;
use crate::snapshot::{self, DiffInfo, SnapshotError, SnapshotKind, SnapshotRef, SnapshotState};

impl Vmm {
    /// Writes a snapshot of the paused VM into `dir`. Returns the memory bytes written.
    pub(super) fn snapshot(
        &mut self,
        dir: &Path,
        kind: SnapshotKind,
    ) -> Result<u64, SnapshotError> {
        if dir.join(snapshot::STATE_FILE).exists() {
            return Err(SnapshotError::Exists(dir.to_owned()));
        }
        let diff_parent = match kind {
            SnapshotKind::Full => None,
            SnapshotKind::Diff => Some(self.diff_parent()?),
        };
        kiln_devices::private::ensure_dir(dir).map_err(|source| SnapshotError::Io {
            what: "create snapshot directory",
            path: dir.to_owned(),
            source,
        })?;
        let dir = std::path::absolute(dir).map_err(|source| SnapshotError::Io {
            what: "resolve",
            path: dir.to_owned(),
            source,
        })?;
        let Some(vcpus) = self.paused.take() else {
            return Err(SnapshotError::NotSnapshottable(
                "the vCPUs are not paused".into(),
            ));
        };
        let mut state = SnapshotState {
            machine: self.machine.clone(),
            vcpus,
            vm: None,
            devices: Default::default(),
            diff: None,
        };
        let result = self.fill_and_write(&dir, &mut state, diff_parent);
        // The vCPUs stay paused; keep their states for another snapshot or the resume.
        self.paused = Some(std::mem::take(&mut state.vcpus));
        result
    }

    /// The snapshot a diff would layer over, or why there can be no diff.
    fn diff_parent(&self) -> Result<SnapshotRef, SnapshotError> {
        if !self.dirty_log {
            return Err(SnapshotError::NotSnapshottable(
                "a diff snapshot needs dirty page tracking: start the VM with --track-dirty-pages"
                    .into(),
            ));
        }
        self.diff_base.clone().ok_or_else(|| {
            SnapshotError::NotSnapshottable(
                "a diff snapshot needs an earlier snapshot of this VM to layer over (and the \
                 last one must have succeeded): take a full snapshot first"
                    .into(),
            )
        })
    }

    fn fill_and_write(
        &mut self,
        dir: &Path,
        state: &mut SnapshotState,
        diff_parent: Option<SnapshotRef>,
    ) -> Result<u64, SnapshotError> {
        if self.machine.irqchip {
            state.vm = Some(self.vm.save_state().map_err(|e| {
                SnapshotError::NotSnapshottable(format!("cannot read irqchip/PIT/clock: {e}"))
            })?);
        }
        state.devices = self.devices.save(dir)?;

        // From here on the dirty pages are taken: a failure must not leave a diff base.
        let size = self.machine.memory_mib << 20;
        let dirty = self.take_dirty_pages(size);
        self.diff_base = None;
        let dirty = dirty?;
        let only = match diff_parent {
            Some(parent) => {
                let diff = state.diff.insert(DiffInfo {
                    parent: parent.dir,
                    parent_digest: parent.digest,
                    pages: dirty,
                });
                Some(&diff.pages)
            }
            None => None,
        };
        let written = write_memory(&self.memory, size, only, &dir.join(snapshot::MEMORY_FILE))?;
        let digest = snapshot::write_state(dir, state)?;
        self.diff_base = Some(SnapshotRef {
            dir: dir.to_owned(),
            digest,
        });
        Ok(written)
    }

    /// The pages written since the last call (empty without a dirty log), clearing both
    /// KVM's log and the VMM's bitmaps.
    fn take_dirty_pages(&self, size: u64) -> Result<PageSet, SnapshotError> {
        let mut pages = PageSet::new(size);
        take_bitmaps(&self.memory, size, &mut pages);
        if self.dirty_log {
            for (slot, (_, len, offset)) in ram_ranges(size).into_iter().enumerate() {
                let slot = u32::try_from(slot).unwrap_or(u32::MAX);
                let bitmap = self.vm.take_dirty_log(slot, len).map_err(|e| {
                    SnapshotError::NotSnapshottable(format!(
                        "cannot read KVM's dirty log of memory slot {slot}: {e}"
                    ))
                })?;
                pages.add_bitmap(offset / crate::snapshot::pages::PAGE, &bitmap);
            }
        }
        Ok(pages)
    }
}
