//! The one place in the process that waits for children.
//!
//! PID 1 must reap every process that ends under it, orphans included, but an exec must
//! still learn its own process's status. So a single thread calls `waitpid(-1)` for the
//! whole process and hands each status to whoever registered that pid; statuses nobody
//! registered (orphans re-parented to init) are dropped.
//!
//! The race between a child ending and its pid being registered is closed by the lock:
//! [`Reaper::spawn`] holds it from before the fork until the pid is registered, and the
//! reaper thread takes it before looking a pid up, so it can reap a fresh child early but
//! cannot dispatch its status before the registration is in place.
//!
//! Nothing else in a process that uses the reaper may wait for children (that includes
//! `std::process::Command`'s `wait`/`output`/`status`): the reaper would take their status.

use std::collections::HashMap;
use std::io;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Condvar, Mutex, MutexGuard, Once, OnceLock, PoisonError};
use std::thread;

use crate::protocol::ExitStatus;

/// The process-wide reaper.
pub struct Reaper {
    state: Mutex<State>,
    /// Signalled when a child is spawned, for a reaper thread that found no children.
    spawned: Condvar,
}

struct State {
    waiting: HashMap<libc::pid_t, Sender<libc::c_int>>,
    /// Counts spawns, so that the reaper thread can tell whether one happened since it
    /// last found no children.
    generation: u64,
}

/// A registered child: its pid and, once it ends, its status.
#[derive(Debug)]
pub struct Child {
    pid: libc::pid_t,
    status: Receiver<libc::c_int>,
}

impl Child {
    /// The child's pid.
    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// Waits until the child ends and returns how it ended.
    pub fn wait(self) -> io::Result<ExitStatus> {
        self.status
            .recv()
            .map(ExitStatus::from_wait_status)
            .map_err(|_| io::Error::other("the reaper thread is not running"))
    }
}

impl Reaper {
    /// The process's reaper; the first call starts its thread.
    pub fn global() -> &'static Reaper {
        static REAPER: OnceLock<Reaper> = OnceLock::new();
        static STARTED: Once = Once::new();
        let reaper = REAPER.get_or_init(|| Reaper {
            state: Mutex::new(State {
                waiting: HashMap::new(),
                generation: 0,
            }),
            spawned: Condvar::new(),
        });
        STARTED.call_once(|| {
            let started = thread::Builder::new()
                .name("reaper".into())
                .spawn(move || reaper.run());
            if let Err(e) = started {
                crate::say!(
                    "starting the reaper thread: {e}; ended processes will not be collected"
                );
            }
        });
        reaper
    }

    /// Runs `fork` (which starts a child and returns its pid and anything else) with the
    /// registry locked, and registers the pid before any status can be dispatched for it.
    pub fn spawn<T>(
        &self,
        fork: impl FnOnce() -> io::Result<(libc::pid_t, T)>,
    ) -> io::Result<(Child, T)> {
        let mut state = self.lock();
        let (pid, extra) = fork()?;
        let (tx, rx) = mpsc::channel();
        state.waiting.insert(pid, tx);
        state.generation = state.generation.wrapping_add(1);
        drop(state);
        self.spawned.notify_all();
        Ok((Child { pid, status: rx }, extra))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn run(&self) {
        loop {
            let generation = self.lock().generation;
            let mut status: libc::c_int = 0;
            // SAFETY: waitpid writes only to `status`, which lives across the call.
            let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
            if pid > 0 {
                self.dispatch(pid, status);
                continue;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::ECHILD) => {}
                _ => crate::say!("waiting for children: {e}"),
            }
            // No children (or a failure that retrying at once would repeat): sleep until
            // the next spawn. Orphans cannot appear meanwhile: every process in the guest
            // descends from a child of this one.
            let mut state = self.lock();
            while state.generation == generation {
                state = self
                    .spawned
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        }
    }

    fn dispatch(&self, pid: libc::pid_t, status: libc::c_int) {
        let waiter = self.lock().waiting.remove(&pid);
        if let Some(tx) = waiter {
            // The receiver is gone if the spawner gave up on the child (its exec failed);
            // the status is then simply dropped.
            let _ = tx.send(status);
        }
    }
}
