//! How a new pair of writable sites starts (issue 7): the decision one site's receiver takes
//! when the other site's stream connects, from what each side says of its tree. Pure; the shell
//! is `net::peer` (the receiver) and `net::remote` (which announces the sender's tree in its
//! `Hello` name, ` pair=WORD`, see [`TreeNote::word`]).
//!
//! | this site (receiver)             | the peer (sender) says | decision                          |
//! |----------------------------------|------------------------|-----------------------------------|
//! | receiving the peer's copy        | anything               | go on with the copy (`Syncing`)   |
//! | has history with the peer        | anything               | resume (`Consistent`, as before)  |
//! | no history                       | nothing (older peer)   | as before: its journal from 1     |
//! | no history, any tree             | `empty` or `copying`   | pair from the peer's journal end  |
//! | no history, `empty` or `journal` | `journal`              | its journal from record 1         |
//! | no history, `empty`              | `data`                 | receive its initial copy (`Empty`)|
//! | no history, `data`               | `journal` or `data`    | refuse, both sides say what to do |
//! | no history, `journal`            | `data`                 | refuse, both sides say what to do |
//!
//! What a site says of its tree: `empty` (nothing but the state directory); `copying` (it
//! receives the peer's initial copy: its tree is part of the peer's); `journal` (its tree holds
//! only what its journal made: the volume's journal was empty on an empty tree when it first
//! ran with `--peer`, `STATE/pair-born-empty`, and it still holds record 1 — so the peer that
//! applies it from record 1 ends with the same tree, which is how two sites started empty at
//! once, both writing before they first connect, come together); `data` (anything else).
//!
//! "History" is this site's record of the peer's stream (`STATE/peer-applied`). "Pair from the
//! peer's journal end": the peer's tree is empty (or is becoming a copy of ours), so nothing of
//! its journal before now is ours to apply (its records there could remove our files). Two trees
//! that hold data not in a journal are refused even when they are equal (an rsync copy): nothing
//! here proves them equal, and a merge by name would be silent; empty one of them and let the
//! copy run.

/// What a site says of its own tree relative to the peer, in its `Hello`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TreeNote {
    /// Nothing in the tree but the state directory.
    Empty,
    /// The tree holds only what the journal, still held from record 1, made (see the module).
    Journal,
    /// It is receiving the peer's initial copy (its tree is part of the peer's).
    Copying,
    /// Anything else: its tree holds data (with or without history with the peer).
    Data,
}

impl TreeNote {
    /// The word in the `Hello` name (` pair=WORD`).
    pub fn word(self) -> &'static str {
        match self {
            TreeNote::Empty => "empty",
            TreeNote::Journal => "journal",
            TreeNote::Copying => "copying",
            TreeNote::Data => "data",
        }
    }

    /// The note a `Hello` name carries, if any (a peer of an older version says nothing).
    pub fn from_hello_name(name: &str) -> Option<TreeNote> {
        name.split(' ')
            .find_map(|w| w.strip_prefix("pair="))
            .and_then(|w| match w {
                "empty" => Some(TreeNote::Empty),
                "journal" => Some(TreeNote::Journal),
                "copying" => Some(TreeNote::Copying),
                "data" => Some(TreeNote::Data),
                _ => None,
            })
    }

    /// `name` with ` pair=WORD` put before a ` tokens=` suffix (which must stay last), or at
    /// the end.
    pub fn add_to_name(self, name: &str) -> String {
        match name.rsplit_once(" tokens=") {
            Some((base, ids)) => format!("{base} pair={} tokens={ids}", self.word()),
            None => format!("{name} pair={}", self.word()),
        }
    }
}

/// What this site knows of itself when the peer connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Local {
    /// It has applied (some of) the peer's stream before: `STATE/peer-applied` names its volume.
    pub history: bool,
    /// An initial copy from the peer is under way here (its id).
    pub copying: Option<u32>,
    /// What it would say of its tree (`Empty`, `Journal` or `Data`).
    pub tree: TreeNote,
}

/// How the peer's stream starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PairStart {
    /// As before: consistent through the position applied here.
    Resume,
    /// Go on with the copy `sync_id` (resumed if the peer still runs it, else a new one).
    /// (`Resume` without history: the peer's journal from record 1.)
    GoOnCopying { sync_id: u32 },
    /// Say `Empty`: the peer copies its tree here through its journal.
    ReceiveCopy,
    /// Consistent through the peer's journal end now (its `Hello`'s `next_seq - 1`).
    FromPeerEnd,
    /// Refuse with this message (shown on both sides).
    Refuse(String),
}

/// The decision table of the module docs. `me`/`peer`: the site ids (or names) for the message.
pub fn decide(local: Local, peer: Option<TreeNote>, me: &str, them: &str) -> PairStart {
    if let Some(sync_id) = local.copying {
        return PairStart::GoOnCopying { sync_id };
    }
    if local.history {
        return PairStart::Resume;
    }
    use TreeNote as T;
    match (local.tree, peer) {
        (_, None) => PairStart::Resume,
        (_, Some(T::Empty | T::Copying)) => PairStart::FromPeerEnd,
        (T::Empty | T::Journal | T::Copying, Some(T::Journal)) => PairStart::Resume,
        (T::Empty, Some(T::Data)) => PairStart::ReceiveCopy,
        (T::Data, Some(T::Journal | T::Data)) | (T::Journal | T::Copying, Some(T::Data)) => {
            PairStart::Refuse(refusal(me, them))
        }
    }
}

/// The refusal of two trees that both hold data and share no history.
pub fn refusal(me: &str, them: &str) -> String {
    format!(
        "{me}'s tree is not empty and shares no history with {them}, whose tree is not empty either: a new pair copies one site's tree to the other, it never merges two; empty one of them (its data then comes from the other), or mount it as a mirror of the other first"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(history: bool, copying: Option<u32>, tree_empty: bool) -> Local {
        with_tree(
            history,
            copying,
            if tree_empty {
                TreeNote::Empty
            } else {
                TreeNote::Data
            },
        )
    }

    fn with_tree(history: bool, copying: Option<u32>, tree: TreeNote) -> Local {
        Local {
            history,
            copying,
            tree,
        }
    }

    #[test]
    fn the_decision_table() {
        use PairStart as P;
        use TreeNote as T;
        let d = |l, p| decide(l, p, "site 2", "site 1");
        for p in [
            None,
            Some(T::Empty),
            Some(T::Journal),
            Some(T::Copying),
            Some(T::Data),
        ] {
            // A copy under way goes on, whatever the peer says.
            assert_eq!(
                d(local(true, Some(7), false), p),
                P::GoOnCopying { sync_id: 7 }
            );
            // History: as before.
            assert_eq!(d(local(true, None, false), p), P::Resume);
            assert_eq!(d(local(true, None, true), p), P::Resume);
        }
        assert_eq!(d(local(false, None, true), Some(T::Data)), P::ReceiveCopy);
        assert_eq!(d(local(false, None, true), Some(T::Empty)), P::FromPeerEnd);
        assert_eq!(d(local(false, None, false), Some(T::Empty)), P::FromPeerEnd);
        assert_eq!(
            d(local(false, None, false), Some(T::Copying)),
            P::FromPeerEnd
        );
        assert_eq!(d(local(false, None, true), None), P::Resume);
        // Two sites born empty that wrote before they first met: each journal from record 1.
        let journal = with_tree(false, None, T::Journal);
        assert_eq!(d(journal, Some(T::Journal)), P::Resume);
        assert_eq!(d(local(false, None, true), Some(T::Journal)), P::Resume);
        assert_eq!(d(journal, Some(T::Empty)), P::FromPeerEnd);
        assert!(matches!(d(journal, Some(T::Data)), P::Refuse(_)));
        assert!(matches!(
            d(local(false, None, false), Some(T::Journal)),
            P::Refuse(_)
        ));
        let P::Refuse(m) = d(local(false, None, false), Some(T::Data)) else {
            panic!("two trees with data must be refused");
        };
        assert!(m.contains("site 2's tree is not empty"), "{m}");
        assert!(m.contains("empty one of them"), "{m}");
    }

    #[test]
    fn the_note_travels_in_the_hello_name_before_the_token_ids() {
        let n = TreeNote::Copying.add_to_name("host:/srv/a tokens=2:1 quorum");
        assert_eq!(n, "host:/srv/a pair=copying tokens=2:1 quorum");
        assert_eq!(TreeNote::from_hello_name(&n), Some(TreeNote::Copying));
        let n = TreeNote::Data.add_to_name("host:/srv/a");
        assert_eq!(TreeNote::from_hello_name(&n), Some(TreeNote::Data));
        assert_eq!(TreeNote::from_hello_name("host:/srv/a tokens=2:1"), None);
        assert_eq!(TreeNote::from_hello_name("h pair=whatever"), None);
    }
}
