//! The aggregate watchlist: every registered wallet's scripts, each mapped
//! to the owners (wallet, keychain, index) that watch it.
//!
//! Scripts are stored in one arena per script length, back to back and
//! again pre-cut into SipHash words in the transposed layout the hashing
//! kernel loads a vector at a time, so that matching streams through
//! memory; a hash map from script to id serves routing and the full-block
//! matcher.

use std::collections::HashMap;

/// The script index's hasher. Every output of every fetched block is
/// looked up in it, so std's SipHash-1-3 was 6% of a 100-wallet sync.
/// foldhash is seeded at random per map; the keys inserted are scripts the
/// wallets derived, not ones an attacker chooses, and lookups alone cannot
/// build collision chains.
type ScriptHasher = foldhash::fast::RandomState;

/// A script's index in its [`Watchlist`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ScriptId(pub u32);

/// Scripts of one length, back to back, and as SipHash words.
#[derive(Debug, Clone)]
pub(crate) struct Group {
    pub(crate) len: usize,
    pub(crate) bytes: Vec<u8>,
    /// The scripts in [`crate::siphash::push_message`]'s layout.
    pub(crate) words: Vec<u64>,
    pub(crate) ids: Vec<ScriptId>,
}

impl Group {
    /// SipHash words per script.
    pub(crate) fn per_message(&self) -> usize {
        crate::siphash::words_per_message(self.len)
    }

    /// Blocks of [`crate::siphash::LANES`] scripts (the last maybe partial).
    pub(crate) fn blocks(&self) -> usize {
        self.ids.len().div_ceil(crate::siphash::LANES)
    }
}

/// Every watched script and who watches it. `O` is the owner: the manager
/// uses (wallet id, keychain, derivation index).
#[derive(Debug, Clone)]
pub struct Watchlist<O> {
    index: HashMap<Box<[u8]>, ScriptId, ScriptHasher>,
    /// Per script: its group and position in it.
    place: Vec<(u32, u32)>,
    /// Per script: its first owner; more owners (rare: two wallets sharing
    /// a script) live in `more_owners`.
    owner: Vec<O>,
    more_owners: HashMap<ScriptId, Vec<O>>,
    pub(crate) groups: Vec<Group>,
}

impl<O> Default for Watchlist<O> {
    fn default() -> Self {
        Watchlist {
            index: HashMap::default(),
            place: Vec::new(),
            owner: Vec::new(),
            more_owners: HashMap::new(),
            groups: Vec::new(),
        }
    }
}

impl<O: Copy + Eq> Watchlist<O> {
    /// An empty watchlist.
    pub fn new() -> Self {
        Self::default()
    }

    /// A watchlist of `scripts`, each watched by its paired owner.
    pub fn from_scripts<'a>(scripts: impl IntoIterator<Item = (&'a [u8], O)>) -> Self {
        let mut list = Watchlist::new();
        for (script, owner) in scripts {
            list.insert(script, owner);
        }
        list
    }

    /// Watches `script` for `owner`. Returns its id and whether the script
    /// is new to the watchlist (a new script must be matched against
    /// filters already checked without it).
    pub fn insert(&mut self, script: &[u8], owner: O) -> (ScriptId, bool) {
        if let Some(&id) = self.index.get(script) {
            if self.owner[id.0 as usize] != owner {
                let more = self.more_owners.entry(id).or_default();
                if !more.contains(&owner) {
                    more.push(owner);
                }
            }
            return (id, false);
        }
        let id = ScriptId(self.place.len() as u32);
        let group = match self.groups.iter().position(|g| g.len == script.len()) {
            Some(g) => g,
            None => {
                self.groups.push(Group {
                    len: script.len(),
                    bytes: Vec::new(),
                    words: Vec::new(),
                    ids: Vec::new(),
                });
                self.groups.len() - 1
            }
        };
        let g = &mut self.groups[group];
        self.place.push((group as u32, g.ids.len() as u32));
        g.bytes.extend_from_slice(script);
        crate::siphash::push_message(&mut g.words, g.len, g.ids.len(), script);
        g.ids.push(id);
        self.owner.push(owner);
        self.index.insert(script.into(), id);
        (id, true)
    }

    /// How many distinct scripts are watched.
    pub fn len(&self) -> usize {
        self.place.len()
    }

    /// Whether nothing is watched.
    pub fn is_empty(&self) -> bool {
        self.place.is_empty()
    }

    /// The id of a watched script.
    pub fn id_of(&self, script: &[u8]) -> Option<ScriptId> {
        self.index.get(script).copied()
    }

    /// The script of an id.
    ///
    /// # Panics
    /// If the id is not from this watchlist.
    pub fn script(&self, id: ScriptId) -> &[u8] {
        let (group, at) = self.place[id.0 as usize];
        let g = &self.groups[group as usize];
        &g.bytes[at as usize * g.len..(at as usize + 1) * g.len]
    }

    /// Who watches a script.
    ///
    /// # Panics
    /// If the id is not from this watchlist.
    pub fn owners(&self, id: ScriptId) -> impl Iterator<Item = O> + '_ {
        std::iter::once(self.owner[id.0 as usize])
            .chain(self.more_owners.get(&id).into_iter().flatten().copied())
    }

    /// Every script with its id.
    pub fn iter(&self) -> impl Iterator<Item = (ScriptId, &[u8])> + '_ {
        (0..self.len() as u32).map(|i| (ScriptId(i), self.script(ScriptId(i))))
    }

    /// The scripts that some owner accepted by `keep` watches, with those
    /// owners only: one wallet's scripts for a stop-the-world import scan,
    /// or a handful of new scripts for a targeted import. Ids differ from
    /// this watchlist's; map back through the scripts.
    pub fn subset(&self, mut keep: impl FnMut(&O) -> bool) -> Watchlist<O> {
        let mut out = Watchlist::new();
        for (id, script) in self.iter() {
            for owner in self.owners(id) {
                if keep(&owner) {
                    out.insert(script, owner);
                }
            }
        }
        out
    }
}
