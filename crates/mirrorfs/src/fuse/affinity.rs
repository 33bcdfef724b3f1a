//! Keeps a FUSE worker thread on the CPU of the thread it is serving.
//!
//! A FUSE request answered by a thread on another, idle CPU costs a cross-CPU wake-up each way
//! (measured here: ~190 µs per 4 KiB write, against ~55 µs on the caller's CPU). The caller's
//! thread id is in every request, so the CPU it last ran on (`/proc/TID/stat`, field 39) is
//! looked up and the worker pinned there. The lookup is asked for once per caller change or every
//! few milliseconds per worker, so it costs nothing per request.
//!
//! Only while one caller keeps the worker: when the callers of a worker take turns (several
//! threads writing one file take turns on its inode lock in the kernel, one request each), the
//! CPU the last one ran on says nothing about the next, and a worker pinned there waits for that
//! CPU while the other is free; with 16 writer threads on 2 CPUs that made the row 2× slower
//! (`docs/benchmarks.md`, issue 9, branch killpriv). So a worker whose caller changed within
//! [`RECHECK`] of the previous one is given back every CPU and left to the scheduler, until one
//! caller keeps it for [`RECHECK`] again.
//!
//! The lookup never runs on the worker itself: reading another task's `/proc/TID/stat` blocks
//! while that task is in execve, and a task in execve may itself be waiting for this file system
//! (the close-on-exec of a file of the mount is a FUSE flush; a vfork child shares its parent's
//! memory). A worker only hands `(worker, what)` to the `affinity` thread, without waiting;
//! that thread looks the CPU up and pins (or unpins) the worker (`sched_setaffinity` on the
//! worker's tid).

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const RECHECK: Duration = Duration::from_millis(20);

/// What a worker asks of the `affinity` thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ask {
    /// Pin me to the CPU this caller last ran on.
    Follow(u32),
    /// Callers take turns: give me every CPU of the process back.
    Release,
}

/// One worker's following (sans-IO): the caller of each request and the time in, what to ask
/// of the `affinity` thread out.
#[derive(Clone, Copy, Debug, Default)]
struct Follower {
    /// The last caller and when it was seen first (or last checked).
    last: Option<(u32, Instant)>,
    /// Whether the last thing asked was a pin (so a release is needed when callers mix).
    pinned: bool,
}

impl Follower {
    fn next(&mut self, tid: u32, now: Instant) -> Option<Ask> {
        match self.last {
            Some((last, at)) if now.duration_since(at) < RECHECK => {
                if last == tid {
                    return None;
                }
                // Another caller within RECHECK of the last: callers take turns.
                self.last = Some((tid, now));
                if self.pinned {
                    self.pinned = false;
                    return Some(Ask::Release);
                }
                None
            }
            _ => {
                self.last = Some((tid, now));
                self.pinned = true;
                Some(Ask::Follow(tid))
            }
        }
    }
}

thread_local! {
    static STATE: Cell<Follower> = const { Cell::new(Follower { last: None, pinned: false }) };
}

/// Asks for the calling worker thread to be moved to the CPU `tid` last ran on (or, while its
/// callers take turns, to be left to the scheduler). Never blocks.
pub fn follow(tid: u32) {
    if tid == 0 {
        return;
    }
    STATE.with(|s| {
        let mut f = s.get();
        let ask = f.next(tid, Instant::now());
        s.set(f);
        if let (Some(ask), Some(tx)) = (ask, helper()) {
            // SAFETY: gettid has no preconditions.
            let me = unsafe { libc::gettid() };
            // A full queue means the helper is busy (or blocked on a task in execve): skip.
            // A skipped release leaves the worker pinned until its next one (a caller change
            // more than RECHECK after a pin): harmless, as before.
            if tx.try_send((me, ask)).is_err() && ask == Ask::Release {
                s.set(Follower { pinned: true, ..f });
            }
        }
    });
}

/// The `affinity` thread: looks callers' CPUs up and pins workers there.
fn helper() -> Option<&'static SyncSender<(libc::pid_t, Ask)>> {
    static HELPER: OnceLock<Option<SyncSender<(libc::pid_t, Ask)>>> = OnceLock::new();
    HELPER
        .get_or_init(|| {
            let (tx, rx) = sync_channel::<(libc::pid_t, Ask)>(64);
            std::thread::Builder::new()
                .name("affinity".into())
                .spawn(move || {
                    // The CPUs the process may use (this thread is never pinned): a released
                    // worker gets them back.
                    // SAFETY: a zeroed cpu_set_t is valid; sched_getaffinity writes within it.
                    let all = unsafe {
                        let mut set: libc::cpu_set_t = std::mem::zeroed();
                        let r = libc::sched_getaffinity(
                            0,
                            std::mem::size_of::<libc::cpu_set_t>(),
                            &mut set,
                        );
                        (r == 0).then_some(set)
                    };
                    // The CPU each worker is pinned to (None: released).
                    let mut pinned: HashMap<libc::pid_t, Option<i32>> = HashMap::new();
                    for (worker, ask) in rx {
                        let (want, set) = match ask {
                            Ask::Follow(caller) => {
                                let Some(cpu) = cpu_of(caller) else { continue };
                                // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes within it.
                                let set = unsafe {
                                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                                    libc::CPU_SET(cpu as usize, &mut set);
                                    set
                                };
                                (Some(cpu), set)
                            }
                            Ask::Release => {
                                let Some(all) = all else { continue };
                                (None, all)
                            }
                        };
                        if pinned.get(&worker) == Some(&want) {
                            continue;
                        }
                        // SAFETY: sched_setaffinity on a thread id has no other preconditions
                        // (it fails harmlessly if the worker is gone).
                        unsafe {
                            libc::sched_setaffinity(
                                worker,
                                std::mem::size_of::<libc::cpu_set_t>(),
                                &set,
                            );
                        }
                        pinned.insert(worker, want);
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
    use super::{Ask, Follower, RECHECK};
    use std::time::{Duration, Instant};

    #[test]
    fn reads_own_cpu() {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() } as u32;
        let cpu = super::cpu_of(tid).expect("own /proc stat");
        assert!(cpu >= 0 && (cpu as usize) < 1024);
    }

    #[test]
    fn one_caller_is_followed_and_checked_again_after_recheck() {
        let t0 = Instant::now();
        let mut f = Follower::default();
        assert_eq!(f.next(7, t0), Some(Ask::Follow(7)));
        assert_eq!(f.next(7, t0 + Duration::from_millis(1)), None);
        assert_eq!(f.next(7, t0 + RECHECK), Some(Ask::Follow(7)));
    }

    #[test]
    fn callers_taking_turns_release_the_worker_until_one_keeps_it() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut f = Follower::default();
        assert_eq!(f.next(1, t0), Some(Ask::Follow(1)));
        // Two writers of one file, one request each in turn: released once, then left alone.
        assert_eq!(f.next(2, t0 + ms(1)), Some(Ask::Release));
        for k in 2..50u32 {
            assert_eq!(f.next(1 + k % 2, t0 + ms(k as u64)), None);
        }
        // One caller alone again for RECHECK: followed again.
        let last = t0 + ms(49);
        assert_eq!(f.next(2, last + ms(1)), None);
        assert_eq!(f.next(2, last + RECHECK), Some(Ask::Follow(2)));
        // A caller change long after the pin is a new caller, followed (not a release).
        assert_eq!(f.next(3, last + RECHECK * 3), Some(Ask::Follow(3)));
    }
}
