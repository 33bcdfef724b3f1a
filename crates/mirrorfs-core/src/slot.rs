//! One stream at a time, and a stale session displaced by its own site's new connection: the
//! decision, without locks, sockets or clocks.
//!
//! A mirror daemon streams from one primary at a time (two streams into one journal would
//! interleave two histories), and a writable site receives its one peer's stream once. A
//! primary whose session went stale (its process stopped, its connection half dead, or it gave
//! up waiting and connected again while the receiving side still thinks the old connection
//! alive) would otherwise be refused `BUSY` by its own old session until the receiver noticed
//! the silence.
//!
//! ```text
//!  new connection (numbered in the order they asked) ─▶ admission(holder, waiting, new):
//!     another key or volume, or either one unauthenticated
//!                                        → Busy (refused: the primary retries)
//!     an older connection of that primary
//!     while a newer one holds or waits   → Superseded (refused: it has been given up)
//!     free                               → Take
//!     same key and same volume           → Displace: the holder is told to end (once: `tell`),
//!                                           and the new connection takes the slot only once the
//!                                           holder released it (`release`: nothing of the old
//!                                           session runs any more)
//! ```
//!
//! [`Slot`] is the state this needs (who holds, who waits to take over, the connections'
//! numbers, whether the holder was told to end). The daemon's shell (`net::serve::slot`) keeps
//! it under a mutex and waits on a condition variable for the release, at most a bound; the
//! network simulation (`sim::net`) drives it for its mirror, where a displaced session ends at
//! once. Identities are opaque here (`K`: the shell's pinned-key fingerprint).

use crate::wire::VolumeId;

/// Who streams: the authenticated key (`None` if the connection had none, which never
/// displaces anything nor is displaced) and the volume its `Hello` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claimant<K> {
    pub key: Option<K>,
    pub volume: VolumeId,
}

impl<K: PartialEq> Claimant<K> {
    /// Both authenticated as one key, for one volume.
    pub fn same_as(&self, other: &Claimant<K>) -> bool {
        self.key.is_some() && self.key == other.key && self.volume == other.volume
    }
}

/// What a new connection gets, given who holds the slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Nobody streams: take the slot.
    Take,
    /// The holder is this primary's own earlier session: end it, wait for it to release the
    /// slot, then ask again.
    Displace,
    /// Another primary streams: refuse (`BUSY`).
    Busy,
    /// A newer connection of the same primary holds the slot or waits for it: give way.
    Superseded,
}

/// The rule. Connections are numbered in the order they asked (`conn`); `holder` is who holds
/// the slot and its number, `waiting` the number of the connection waiting to take over. A new
/// connection displaces the holder only if both are the same authenticated key for the same
/// volume, and only an older one: of several connections of one primary the newest wins (the
/// primary has given up on the others).
pub fn admission<K: PartialEq>(
    holder: Option<(&Claimant<K>, u64)>,
    waiting: Option<u64>,
    new: &Claimant<K>,
    conn: u64,
) -> Admission {
    match holder {
        Some((h, _)) if !h.same_as(new) => Admission::Busy,
        _ if waiting.is_some_and(|w| w > conn) => Admission::Superseded,
        None => Admission::Take,
        Some((_, held_by)) if held_by > conn => Admission::Superseded,
        Some(_) => Admission::Displace,
    }
}

/// The slot's holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder<K> {
    pub who: Claimant<K>,
    pub conn: u64,
    /// A newer connection of the same primary told it to end.
    pub told: bool,
}

/// Who holds the one stream, who waits to take over, and the connections' numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot<K> {
    holder: Option<Holder<K>>,
    /// The connection waiting to take over from a displaced holder (the newest one).
    waiting: Option<u64>,
    next_conn: u64,
}

impl<K> Default for Slot<K> {
    fn default() -> Self {
        Slot {
            holder: None,
            waiting: None,
            next_conn: 0,
        }
    }
}

impl<K: PartialEq + Clone> Slot<K> {
    /// A new connection's number (they are decided newest-wins by it).
    pub fn number(&mut self) -> u64 {
        let n = self.next_conn;
        self.next_conn += 1;
        n
    }

    /// Connection `conn` of `who` asks (again, after a wait) for the slot. `Take`: it holds the
    /// slot now. `Displace`: it is the one waiting to take over; the caller tells the holder to
    /// end if [`Slot::tell`] says so, waits for [`Slot::release`] and asks again. `Busy` and
    /// `Superseded`: refused (and no longer waiting).
    pub fn ask(&mut self, who: &Claimant<K>, conn: u64) -> Admission {
        let holder = self.holder.as_ref().map(|h| (&h.who, h.conn));
        let a = admission(holder, self.waiting, who, conn);
        match a {
            Admission::Take => {
                self.give_up(conn);
                self.holder = Some(Holder {
                    who: who.clone(),
                    conn,
                    told: false,
                });
            }
            Admission::Displace => self.waiting = Some(conn),
            Admission::Busy | Admission::Superseded => self.give_up(conn),
        }
        a
    }

    /// Whether the holder is to be told to end now: true once per holder, and only while a
    /// connection waits to displace it.
    pub fn tell(&mut self) -> bool {
        match (&mut self.holder, self.waiting) {
            (Some(h), Some(_)) if !h.told => {
                h.told = true;
                true
            }
            _ => false,
        }
    }

    /// Connection `conn` stops waiting (it gave up: its bound passed).
    pub fn give_up(&mut self, conn: u64) {
        if self.waiting == Some(conn) {
            self.waiting = None;
        }
    }

    /// Connection `conn`'s session ended (everything it ran has stopped): the slot is free if
    /// it held it. Returns whether it did.
    pub fn release(&mut self, conn: u64) -> bool {
        if self.holder.as_ref().is_some_and(|h| h.conn == conn) {
            self.holder = None;
            true
        } else {
            false
        }
    }

    pub fn holder(&self) -> Option<&Holder<K>> {
        self.holder.as_ref()
    }

    pub fn waiting(&self) -> Option<u64> {
        self.waiting
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(key: u8, volume: u8) -> Claimant<u8> {
        Claimant {
            key: Some(key),
            volume: [volume; 16],
        }
    }

    #[test]
    fn only_the_same_key_for_the_same_volume_displaces_and_the_newest_connection_wins() {
        let a = id(1, 1);
        assert_eq!(admission(None, None, &a, 0), Admission::Take);
        assert_eq!(admission(Some((&a, 0)), None, &a, 1), Admission::Displace);
        assert_eq!(
            admission(Some((&a, 0)), Some(1), &a, 1),
            Admission::Displace
        );
        assert_eq!(
            admission(Some((&a, 0)), None, &id(2, 1), 1),
            Admission::Busy
        );
        assert_eq!(
            admission(Some((&a, 0)), None, &id(1, 2), 1),
            Admission::Busy
        );
        let anon = Claimant::<u8> {
            key: None,
            volume: [1; 16],
        };
        assert_eq!(admission(Some((&anon, 0)), None, &anon, 1), Admission::Busy);
        assert_eq!(admission(Some((&a, 0)), None, &anon, 1), Admission::Busy);
        assert_eq!(admission(Some((&anon, 0)), None, &a, 1), Admission::Busy);
        assert_eq!(admission(None, None, &anon, 1), Admission::Take);
        // Of one primary's connections the newest wins: an older waiter gives way to a newer
        // one, and never displaces a newer holder.
        assert_eq!(
            admission(Some((&a, 0)), Some(2), &a, 1),
            Admission::Superseded
        );
        assert_eq!(admission(None, Some(2), &a, 1), Admission::Superseded);
        assert_eq!(admission(Some((&a, 3)), None, &a, 1), Admission::Superseded);
        // Another primary is refused while one waits to take over, and takes a free slot.
        assert_eq!(
            admission(Some((&a, 0)), Some(1), &id(2, 1), 2),
            Admission::Busy
        );
        assert_eq!(admission(None, Some(1), &id(2, 1), 2), Admission::Take);
    }

    #[test]
    fn a_displacing_connection_takes_the_slot_only_after_the_release_and_tells_once() {
        let mut s = Slot::default();
        let a = id(1, 1);
        let (c0, c1) = (s.number(), s.number());
        assert!(c1 > c0);
        assert_eq!(s.ask(&a, c0), Admission::Take);
        assert!(!s.tell(), "nobody waits: nothing to tell");
        assert_eq!(s.ask(&a, c1), Admission::Displace);
        assert_eq!(s.waiting(), Some(c1));
        assert!(s.tell());
        assert!(!s.tell(), "told twice");
        assert!(s.holder().is_some_and(|h| h.told && h.conn == c0));
        // Asking again before the release changes nothing.
        assert_eq!(s.ask(&a, c1), Admission::Displace);
        assert_eq!(s.holder().map(|h| h.conn), Some(c0));
        // Another primary meanwhile: refused, the waiter left alone.
        let c2 = s.number();
        assert_eq!(s.ask(&id(2, 1), c2), Admission::Busy);
        assert_eq!(s.waiting(), Some(c1));
        // A release by someone else does nothing; the holder's frees the slot.
        assert!(!s.release(c1));
        assert!(s.release(c0));
        assert_eq!(s.ask(&a, c1), Admission::Take);
        assert_eq!(s.waiting(), None);
        let h = s.holder().cloned();
        assert_eq!(
            h,
            Some(Holder {
                who: a,
                conn: c1,
                told: false
            })
        );
    }

    #[test]
    fn a_newer_connection_overtakes_an_older_waiter_and_a_waiter_may_give_up() {
        let mut s = Slot::default();
        let a = id(1, 1);
        let (c0, c1, c2) = (s.number(), s.number(), s.number());
        assert_eq!(s.ask(&a, c0), Admission::Take);
        assert_eq!(s.ask(&a, c1), Admission::Displace);
        assert!(s.tell());
        assert_eq!(s.ask(&a, c2), Admission::Displace);
        assert_eq!(s.waiting(), Some(c2));
        assert!(!s.tell(), "the holder was told already");
        assert_eq!(s.ask(&a, c1), Admission::Superseded);
        assert_eq!(s.waiting(), Some(c2));
        s.give_up(c1);
        assert_eq!(
            s.waiting(),
            Some(c2),
            "an older one's giving up frees nothing"
        );
        s.give_up(c2);
        assert_eq!(s.waiting(), None);
        // The told holder still holds until it releases; an old connection never takes over
        // from a newer holder.
        assert!(s.release(c0));
        assert_eq!(s.ask(&a, c2), Admission::Take);
        assert_eq!(s.ask(&a, c1), Admission::Superseded);
        assert_eq!(s.holder().map(|h| h.conn), Some(c2));
    }
}
