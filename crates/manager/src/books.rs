//! What the loop knows of its wallets in memory: the wallets, the
//! aggregate watchlist of their scripts, and the map from each unspent coin
//! to the wallets that own it. Together they route a block's transactions
//! to the wallets they touch, one map lookup per output and per input.
//!
//! `Books` moves into each write transaction's closure and comes back with
//! its result; when a transaction fails, the books are loaded again from
//! the database (the in-memory mirror may be ahead of what was committed).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use bitcoin::hashes::Hash as _;
use bitcoin::{OutPoint, Script, ScriptBuf, Txid};
use lockstep_filter::{BasicFilter, Watchlist};
use lockstep_store::{ReadTx, WalletId, WriteTx};
use lockstep_wallet::{Keychain, NewScripts, Registry, Wallet};

use crate::ManagerError;

/// Who watches a script: a wallet, and the keychain and index it derives
/// the script at.
pub(crate) type Owner = (WalletId, Keychain, u32);

/// The aggregate watchlist.
///
/// Prefetch tasks match filters against an immutable snapshot (`base`,
/// shared through an `Arc`); scripts added later (a block moved a lookahead
/// window, a wallet joined) go to an append-only log, and a filter matched
/// against an older snapshot is checked again for exactly the scripts added
/// since (`unchecked_match`). The base is rebuilt when the tail grows large.
///
/// The re-check runs the same kernel as the match: the log past each of the
/// last few bases is also kept as a small watchlist (an epoch), so a filter
/// is re-checked 8 or 16 scripts at a time rather than hashing each script
/// alone (which cost 5% of the loop's time with 100 wallets).
#[derive(Debug)]
pub(crate) struct AggregateWatch {
    base: Arc<Watchlist<Owner>>,
    /// How many entries of `log` the base holds.
    base_len: usize,
    /// Every (script, owner) ever added, in order.
    log: Vec<(ScriptBuf, Owner)>,
    /// Owners of the scripts in `log[base_len..]`, for routing (with the
    /// base's hasher: see `lockstep_filter::Watchlist`'s index).
    tail: HashMap<ScriptBuf, Vec<Owner>, foldhash::fast::RandomState>,
    /// `(start, scripts)`: the scripts of `log[start..]` up to the next
    /// epoch's start, for the last [`EPOCHS`] bases; the last epoch starts
    /// at `base_len` and grows with the tail.
    epochs: VecDeque<(usize, Watchlist<()>)>,
}

/// How many bases back `unchecked_match` re-checks with the kernel. A
/// filter prefetched against an older base (rare: bases are rebuilt when
/// the tail reaches 1/64 of them) is re-checked one script at a time for
/// the part of the log before the oldest epoch.
const EPOCHS: usize = 4;

impl AggregateWatch {
    pub(crate) fn new() -> Self {
        AggregateWatch {
            base: Arc::new(Watchlist::new()),
            base_len: 0,
            log: Vec::new(),
            tail: HashMap::default(),
            epochs: VecDeque::from([(0, Watchlist::new())]),
        }
    }

    /// How many (script, owner) pairs are watched.
    pub(crate) fn len(&self) -> usize {
        self.log.len()
    }

    /// Whether `owner` already watches `script`.
    fn watches(&self, script: &[u8], owner: Owner) -> bool {
        if let Some(id) = self.base.id_of(script)
            && self.base.owners(id).any(|o| o == owner)
        {
            return true;
        }
        self.tail
            .get(Script::from_bytes(script))
            .is_some_and(|owners| owners.contains(&owner))
    }

    /// Watches `script` for `owner` from now on. Returns whether it is new.
    pub(crate) fn add(&mut self, script: &Script, owner: Owner) -> bool {
        if self.watches(script.as_bytes(), owner) {
            return false;
        }
        self.log.push((script.to_owned(), owner));
        self.tail.entry(script.to_owned()).or_default().push(owner);
        if let Some((_, epoch)) = self.epochs.back_mut() {
            epoch.insert(script.as_bytes(), ());
        }
        true
    }

    /// Folds the tail into a new base once it is large enough that
    /// re-checking it per filter costs more than rebuilding.
    pub(crate) fn compact(&mut self) {
        if self.wants_compaction() {
            self.compact_all();
        }
    }

    /// Whether the tail is large enough to fold into a new base.
    pub(crate) fn wants_compaction(&self) -> bool {
        let tail = self.log.len() - self.base_len;
        // Re-checking the tail runs the base's kernel on a small watchlist
        // (a fixed cost per filter, then ~3 ns per script, as the base);
        // rebuilding the base copies it. A tail of 1/64 of the base keeps
        // the re-check a small part of the match and rebuilds rare.
        tail >= 64.max(self.base_len / 64)
    }

    /// Folds the whole tail into a new base.
    pub(crate) fn compact_all(&mut self) {
        if self.log.len() == self.base_len {
            return;
        }
        let mut base = (*self.base).clone();
        for (script, owner) in &self.log[self.base_len..] {
            base.insert(script.as_bytes(), *owner);
        }
        self.base = Arc::new(base);
        self.base_len = self.log.len();
        self.tail.clear();
        self.epochs.push_back((self.base_len, Watchlist::new()));
        if self.epochs.len() > EPOCHS {
            self.epochs.pop_front();
        }
    }

    /// The snapshot prefetch tasks match against, and how much of the log
    /// it covers.
    pub(crate) fn snapshot(&self) -> (Arc<Watchlist<Owner>>, usize) {
        (Arc::clone(&self.base), self.base_len)
    }

    /// Whether `filter` matches any script added after the first `checked`
    /// log entries.
    pub(crate) fn unchecked_match(&self, filter: &BasicFilter, checked: usize) -> bool {
        let checked = checked.min(self.log.len());
        // `checked` is a former `base_len`, so normally an epoch's start;
        // the log before the first epoch at or after it is re-checked one
        // script at a time.
        let first = self
            .epochs
            .iter()
            .position(|(start, _)| *start >= checked)
            .unwrap_or(self.epochs.len());
        let alone_to = self
            .epochs
            .get(first)
            .map_or(self.log.len(), |(start, _)| *start);
        self.log[checked..alone_to]
            .iter()
            .any(|(script, _)| filter.contains(script.as_bytes()))
            || self
                .epochs
                .range(first..)
                .any(|(_, epoch)| !lockstep_filter::matches(filter, epoch).is_empty())
    }

    /// Appends the wallets watching `script` to `out`.
    pub(crate) fn wallets_of(&self, script: &Script, out: &mut Vec<WalletId>) {
        if let Some(id) = self.base.id_of(script.as_bytes()) {
            out.extend(self.base.owners(id).map(|o| o.0));
        }
        if !self.tail.is_empty()
            && let Some(owners) = self.tail.get(script)
        {
            out.extend(owners.iter().map(|o| o.0));
        }
    }

    /// Every watched (script, owner), in the order added.
    pub(crate) fn entries(&self) -> &[(ScriptBuf, Owner)] {
        &self.log
    }
}

/// How many scripts of each keychain (external, internal) of a wallet the
/// watchlist holds; `None` for a targeted import, which watches only the
/// scripts it was given (and those its blocks derive).
pub(crate) type Watched = Option<[u32; 2]>;

/// Outpoints and the wallets owning them. Every input of every routed
/// transaction is looked up here: with foldhash (as the watchlist's index)
/// rather than std's SipHash-1-3, which showed in the writer thread's
/// profile.
pub(crate) type OutpointOwners = HashMap<OutPoint, Vec<WalletId>, foldhash::fast::RandomState>;

/// The wallets one scan serves (the loop's active wallets, or an import's
/// one wallet), their watchlist and their unspent coins.
///
/// The wallets themselves are the registry's live instances, taken inside
/// each write transaction for the wallets a block touches: what an embedder
/// reveals or spends on a wallet is what the loop ingests into, and a
/// wallet the registry evicted is loaded again when a block touches it.
#[derive(Debug)]
pub(crate) struct Books {
    pub(crate) registry: Registry,
    pub(crate) wallets: BTreeMap<WalletId, Watched>,
    pub(crate) watch: AggregateWatch,
    /// Each unspent coin of a wallet here, and the wallets that own it
    /// (more than one only when wallets share a script).
    pub(crate) outpoints: OutpointOwners,
    /// Each wallet's count of addresses handed out, as last read, and the
    /// registry version it was read at: a count that moved means some
    /// process revealed addresses of the wallet.
    reveals: HashMap<WalletId, u64>,
    reveals_read_at: Option<u64>,
}

impl Books {
    pub(crate) fn empty(registry: &Registry) -> Books {
        Books {
            registry: registry.clone(),
            wallets: BTreeMap::new(),
            watch: AggregateWatch::new(),
            outpoints: OutpointOwners::default(),
            reveals: HashMap::new(),
            reveals_read_at: None,
        }
    }

    /// The wallets `t` touches, sorted, each once, into `touched`: those
    /// watching a script it pays, and those owning an outpoint it spends,
    /// among the wallets' coins and, if given, `also` (the outputs of
    /// their unconfirmed transactions). A block and the mempool route
    /// transactions alike.
    pub(crate) fn wallets_touched(
        &self,
        t: &bitcoin::Transaction,
        also: Option<&OutpointOwners>,
        touched: &mut Vec<WalletId>,
    ) {
        touched.clear();
        for out in &t.output {
            self.watch.wallets_of(&out.script_pubkey, touched);
        }
        if !t.is_coinbase() {
            for input in &t.input {
                let prev = &input.previous_output;
                for map in std::iter::once(&self.outpoints).chain(also) {
                    if let Some(owners) = map.get(prev) {
                        touched.extend_from_slice(owners);
                    }
                }
            }
        }
        touched.sort_unstable();
        touched.dedup();
    }

    /// Books of the active wallets (neither importing nor parked), read from the
    /// database: their stored scripts and coins (no wallet is loaded).
    pub(crate) fn load_active(tx: &ReadTx<'_>, registry: &Registry) -> Result<Books, ManagerError> {
        let mut books = Books::empty(registry);
        for row in tx.wallets()? {
            if row.is_active() {
                books.add_wallet(tx, row.wallet_id)?;
            }
        }
        books.watch.compact();
        Ok(books)
    }

    /// Books of one wallet (an import's).
    pub(crate) fn of_wallet(
        tx: &ReadTx<'_>,
        registry: &Registry,
        id: WalletId,
    ) -> Result<Books, ManagerError> {
        let mut books = Books::empty(registry);
        books.add_wallet(tx, id)?;
        Ok(books)
    }

    /// Adds a wallet: all its stored scripts and its unspent coins.
    pub(crate) fn add_wallet(&mut self, tx: &ReadTx<'_>, id: WalletId) -> Result<(), ManagerError> {
        let Some(row) = tx.wallet(id)? else {
            return Err(ManagerError::UnknownWallet(id));
        };
        self.reveals.insert(id, row.reveals);
        let mut counts = [0u32; 2];
        for keychain in Keychain::ALL {
            let scripts = tx.keychain_scripts(id, keychain.as_u8())?;
            counts[keychain.as_u8() as usize] = scripts.len() as u32;
            for (index, script) in scripts.into_iter().enumerate() {
                self.watch
                    .add(Script::from_bytes(&script), (id, keychain, index as u32));
            }
        }
        self.load_coins(tx, id)?;
        self.wallets.insert(id, Some(counts));
        Ok(())
    }

    /// Watches what wallet `id` derived since the watchlist last looked
    /// (an address or change revealed outside the loop, a window moved by
    /// a block): for a wallet watched whole, every script past what the
    /// watchlist holds; for a targeted import, `derived`. Appends the
    /// scripts newly watched to `added`.
    pub(crate) fn watch_derived(
        &mut self,
        id: WalletId,
        wallet: &Wallet,
        derived: &NewScripts,
        added: &mut Vec<ScriptBuf>,
    ) {
        match self.wallets.get_mut(&id) {
            Some(Some(counts)) => {
                for keychain in Keychain::ALL {
                    let scripts = wallet.scripts(keychain);
                    let count = &mut counts[keychain.as_u8() as usize];
                    for (index, script) in scripts.iter().enumerate().skip(*count as usize) {
                        if self.watch.add(script, (id, keychain, index as u32)) {
                            added.push(script.clone());
                        }
                    }
                    *count = (*count).max(scripts.len() as u32);
                }
            }
            Some(None) => {
                for (keychain, index, script) in &derived.0 {
                    if self.watch.add(script, (id, *keychain, *index)) {
                        added.push(script.clone());
                    }
                }
            }
            None => {}
        }
    }

    /// Watches what the wallets here derived outside the loop (addresses
    /// and change revealed) since the last call: inside a write
    /// transaction, which SQLite runs after the one that revealed them
    /// committed, so no block is committed unchecked against an address
    /// already handed out. With `all`, every wallet here is looked at (an
    /// import's one wallet), not only those the registry reports.
    /// `version` is the registry version if this transaction read it.
    ///
    /// Addresses another process revealed count in the database and bump
    /// the registry version: when it moved, the wallets whose count moved
    /// are read again (their live instances too, which are behind) and
    /// their new scripts watched.
    pub(crate) fn watch_revealed(
        &mut self,
        tx: &WriteTx<'_>,
        all: bool,
        version: Option<u64>,
    ) -> Result<(), ManagerError> {
        let mut ids: std::collections::BTreeSet<WalletId> = if all {
            self.wallets.keys().copied().collect()
        } else {
            self.registry.take_grown().into_iter().collect()
        };
        // The loop's transaction read it already (`follow_registry`).
        let version = match version {
            Some(version) => version,
            None => tx.registry_version()?,
        };
        if self.reveals_read_at != Some(version) {
            for row in tx.wallets()? {
                let id = row.wallet_id;
                if self.wallets.contains_key(&id)
                    && self.reveals.insert(id, row.reveals) != Some(row.reveals)
                {
                    ids.insert(id);
                }
            }
            self.reveals_read_at = Some(version);
        }
        let mut added = Vec::new();
        for id in ids {
            if !self.wallets.contains_key(&id) {
                continue;
            }
            let live = self
                .registry
                .get_in(tx, id)
                .map_err(|e| ManagerError::of_wallet(id, e))?;
            let mut wallet = live.wallet_in(tx);
            wallet
                .refresh_if_moved(tx)
                .map_err(|e| ManagerError::of_wallet(id, e))?;
            self.watch_derived(id, &wallet, &NewScripts::default(), &mut added);
        }
        Ok(())
    }

    /// Reads a wallet's unspent coins into the outpoint map.
    pub(crate) fn load_coins(&mut self, tx: &ReadTx<'_>, id: WalletId) -> Result<(), ManagerError> {
        for coin in tx.wallet_coins(id, true)? {
            let outpoint = OutPoint {
                txid: Txid::from_byte_array(coin.txid),
                vout: coin.vout,
            };
            let owners = self.outpoints.entry(outpoint).or_default();
            if !owners.contains(&id) {
                owners.push(id);
            }
        }
        Ok(())
    }

    /// Takes a wallet out (an import of it started elsewhere): its coins
    /// leave the outpoint map; its scripts stay watched (the log is
    /// append-only) but route to nobody until it joins again.
    pub(crate) fn remove_wallet(&mut self, id: WalletId) {
        self.wallets.remove(&id);
        self.outpoints.retain(|_, owners| {
            owners.retain(|o| *o != id);
            !owners.is_empty()
        });
    }

    /// Brings the books up to the database's wallet set if it changed
    /// since `seen` (the registry version last read): a wallet another
    /// process registered as active joins now, a wallet whose import
    /// started elsewhere leaves. Returns whether any wallet is waiting to
    /// be imported. Inside a write transaction, which SQLite serialises with
    /// every other writer, this means the loop never commits past a wallet
    /// it does not know.
    pub(crate) fn follow_registry(
        &mut self,
        tx: &ReadTx<'_>,
        seen: &mut Option<u64>,
    ) -> Result<bool, ManagerError> {
        let version = tx.registry_version()?;
        if *seen == Some(version) {
            return Ok(false);
        }
        let mut waiting = false;
        for row in tx.wallets()? {
            let id = row.wallet_id;
            let importing = row.importing_height.is_some();
            match (row.is_active(), self.wallets.contains_key(&id)) {
                (true, false) => {
                    tracing::info!(wallet = %id, name = %row.name, "a wallet registered elsewhere joins the loop");
                    self.add_wallet(tx, id)?;
                }
                (false, true) => {
                    if importing {
                        tracing::info!(wallet = %id, "an import of this wallet was started elsewhere");
                    } else {
                        tracing::info!(wallet = %id, "this wallet was parked elsewhere");
                    }
                    self.remove_wallet(id);
                    waiting |= importing;
                }
                (false, false) => waiting |= importing,
                (true, true) => {}
            }
        }
        *seen = Some(version);
        Ok(waiting)
    }

    /// Reads every wallet's unspent coins again (after a reorg undid some).
    pub(crate) fn reload_coins(&mut self, tx: &ReadTx<'_>) -> Result<(), ManagerError> {
        self.outpoints.clear();
        let ids: Vec<WalletId> = self.wallets.keys().copied().collect();
        for id in ids {
            self.load_coins(tx, id)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use bitcoin::hashes::Hash as _;

    use super::*;

    fn script(n: u32) -> ScriptBuf {
        let mut bytes = vec![0x00, 0x14];
        bytes.extend_from_slice(
            &bitcoin::hashes::hash160::Hash::hash(&n.to_le_bytes()).to_byte_array(),
        );
        ScriptBuf::from_bytes(bytes)
    }

    #[test]
    fn scripts_added_after_a_snapshot_are_matched_again() {
        let id = WalletId::from_i64(1);
        let mut watch = AggregateWatch::new();
        for n in 0..100 {
            assert!(watch.add(&script(n), (id, Keychain::External, n)));
        }
        assert!(
            !watch.add(&script(5), (id, Keychain::External, 5)),
            "the same owner twice"
        );
        watch.compact_all();
        let (base, checked) = watch.snapshot();
        assert_eq!((base.len(), checked), (100, 100));
        // A script added later is not in the snapshot, but the re-check
        // finds it, and only it.
        watch.add(&script(1_000), (id, Keychain::External, 1_000));
        let genesis = bitcoin::blockdata::constants::genesis_block(bitcoin::Network::Regtest);
        let hash = genesis.block_hash();
        let mut raw = Vec::new();
        {
            let mut writer = bitcoin::bip158::BlockFilterWriter::new(&mut raw, &genesis);
            writer.add_element(script(1_000).as_bytes());
            writer.finish().unwrap();
        }
        let filter = BasicFilter::decode(&hash, &raw).unwrap();
        assert!(lockstep_filter::matches(&filter, &base).is_empty());
        assert!(watch.unchecked_match(&filter, checked));
        assert!(!watch.unchecked_match(&filter, watch.len()));
        // Routing sees base and tail alike.
        let mut owners = Vec::new();
        watch.wallets_of(&script(1_000), &mut owners);
        watch.wallets_of(&script(7), &mut owners);
        assert_eq!(owners, vec![id, id]);
        // A second owner of the same script is routed too.
        let other = WalletId::from_i64(2);
        assert!(watch.add(&script(7), (other, Keychain::Internal, 0)));
        owners.clear();
        watch.wallets_of(&script(7), &mut owners);
        owners.sort();
        assert_eq!(owners, vec![id, other]);
    }

    /// A filter of the genesis block holding exactly `scripts`.
    fn filter_of(scripts: &[ScriptBuf]) -> BasicFilter {
        let genesis = bitcoin::blockdata::constants::genesis_block(bitcoin::Network::Regtest);
        let mut raw = Vec::new();
        {
            let mut writer = bitcoin::bip158::BlockFilterWriter::new(&mut raw, &genesis);
            for script in scripts {
                writer.add_element(script.as_bytes());
            }
            writer.finish().unwrap();
        }
        BasicFilter::decode(&genesis.block_hash(), &raw).unwrap()
    }

    #[test]
    fn filters_from_older_bases_are_matched_again_for_every_later_script() {
        let id = WalletId::from_i64(1);
        let owner = |n| (id, Keychain::External, n);
        let mut watch = AggregateWatch::new();
        for n in 0..50 {
            watch.add(&script(n), owner(n));
        }
        watch.compact_all();
        let mut snapshots = vec![watch.snapshot().1];
        // Seven bases later, each with its own tail: the oldest snapshots
        // are past the kernel's epochs and re-checked one script at a time.
        for round in 0..7u32 {
            for n in 0..20 {
                watch.add(&script(1_000 * (round + 1) + n), owner(n));
            }
            watch.compact_all();
            snapshots.push(watch.snapshot().1);
        }
        watch.add(&script(99_999), owner(0));
        for (at, checked) in snapshots.iter().enumerate() {
            // Every script added after the snapshot is found, whichever
            // epoch (or none) holds it; the ones before are not.
            for round in 0..7u32 {
                let later = round as usize >= at;
                let probe = filter_of(&[script(1_000 * (round + 1) + 19)]);
                assert_eq!(
                    watch.unchecked_match(&probe, *checked),
                    later,
                    "snapshot {at}, script of round {round}"
                );
            }
            assert!(watch.unchecked_match(&filter_of(&[script(99_999)]), *checked));
            assert!(!watch.unchecked_match(&filter_of(&[script(7)]), *checked));
            assert!(!watch.unchecked_match(&filter_of(&[script(123_456)]), *checked));
        }
        assert!(!watch.unchecked_match(&filter_of(&[script(99_999)]), watch.len()));
    }

    #[test]
    fn the_tail_is_folded_into_the_base_past_a_sixty_fourth() {
        let id = WalletId::from_i64(1);
        let mut watch = AggregateWatch::new();
        for n in 0..6_400 {
            watch.add(&script(n), (id, Keychain::External, n));
        }
        watch.compact_all();
        for n in 6_400..6_499 {
            watch.add(&script(n), (id, Keychain::External, n));
        }
        watch.compact();
        assert_eq!(watch.snapshot().1, 6_400, "99 < 100: still a tail");
        watch.add(&script(6_499), (id, Keychain::External, 6_499));
        watch.compact();
        assert_eq!(watch.snapshot().1, 6_500, "folded");
        let mut owners = Vec::new();
        watch.wallets_of(&script(6_499), &mut owners);
        assert_eq!(owners, vec![id]);
    }
}
