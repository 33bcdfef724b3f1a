//! Keeps a FUSE worker thread on the CPU of the thread it is serving.
//!
//! A FUSE request answered by a thread on another, idle CPU costs a cross-CPU wake-up each way
//! (measured here: ~190 µs per 4 KiB write, against ~55 µs on the caller's CPU). The caller's
//! thread id is in every request, so the CPU it last ran on (`/proc/TID/stat`, field 39) is
//! looked up and the worker pinned there. The lookup is asked for once per caller change or every
//! few milliseconds per worker, so it costs nothing per request.
//!
//! The lookup never runs on the worker itself: reading another task's `/proc/TID/stat` blocks
//! while that task is in execve, and a task in execve may itself be waiting for this file system
//! (the close-on-exec of a file of the mount is a FUSE flush; a vfork child shares its parent's
//! memory). A worker only hands `(worker, caller)` to the `affinity` thread, without waiting;
//! that thread looks the CPU up and pins the worker (`sched_setaffinity` on the worker's tid).

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const RECHECK: Duration = Duration::from_millis(20);

thread_local! {
    static STATE: Cell<Option<(u32, Instant)>> = const { Cell::new(None) };
}

/// Asks for the calling worker thread to be moved to the CPU `tid` last ran on. Never blocks.
pub fn follow(tid: u32) {
    if tid == 0 {
        return;
    }
    STATE.with(|s| {
        let now = Instant::now();
        if let Some((last, at)) = s.get() {
            if last == tid && now.duration_since(at) < RECHECK {
                return;
            }
        }
        s.set(Some((tid, now)));
        if let Some(tx) = helper() {
            // SAFETY: gettid has no preconditions.
            let me = unsafe { libc::gettid() };
            // A full queue means the helper is busy (or blocked on a task in execve): skip.
            let _ = tx.try_send((me, tid));
        }
    });
}

/// The `affinity` thread: looks callers' CPUs up and pins workers there.
fn helper() -> Option<&'static SyncSender<(libc::pid_t, u32)>> {
    static HELPER: OnceLock<Option<SyncSender<(libc::pid_t, u32)>>> = OnceLock::new();
    HELPER
        .get_or_init(|| {
            let (tx, rx) = sync_channel::<(libc::pid_t, u32)>(64);
            std::thread::Builder::new()
                .name("affinity".into())
                .spawn(move || {
                    let mut pinned: HashMap<libc::pid_t, i32> = HashMap::new();
                    for (worker, caller) in rx {
                        let Some(cpu) = cpu_of(caller) else { continue };
                        if pinned.get(&worker) == Some(&cpu) {
                            continue;
                        }
                        // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes within it;
                        // sched_setaffinity on a thread id has no other preconditions (it fails
                        // harmlessly if the worker is gone).
                        unsafe {
                            let mut set: libc::cpu_set_t = std::mem::zeroed();
                            libc::CPU_SET(cpu as usize, &mut set);
                            libc::sched_setaffinity(
                                worker,
                                std::mem::size_of::<libc::cpu_set_t>(),
                                &set,
                            );
                        }
                        pinned.insert(worker, cpu);
                    }
                })
                .ok()
                .map(|_| tx)
        })
        .as_ref()
}

fn cpu_of(tid: u32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{tid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields are counted after its ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(36)?.parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_own_cpu() {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() } as u32;
        let cpu = super::cpu_of(tid).expect("own /proc stat");
        assert!(cpu >= 0 && (cpu as usize) < 1024);
    }
}
