//! The simulator's spendable coins: an indexable set so that background
//! transactions can pick inputs at random in O(1) and reorgs can remove
//! coins by outpoint.

use std::collections::HashMap;

use bitcoin::{OutPoint, TxOut};
use rand::Rng;

use super::keys::KeySeed;

/// A coin the simulator can spend: where it is, what it holds and how its key
/// is derived.
#[derive(Debug, Clone)]
pub(crate) struct PoolCoin {
    pub(crate) outpoint: OutPoint,
    pub(crate) txout: TxOut,
    pub(crate) key: (KeySeed, u32),
}

#[derive(Debug, Default, Clone)]
pub(crate) struct Pool {
    items: Vec<PoolCoin>,
    index: HashMap<OutPoint, usize>,
}

impl Pool {
    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }

    pub(crate) fn insert(&mut self, coin: PoolCoin) {
        if self.index.contains_key(&coin.outpoint) {
            return;
        }
        self.index.insert(coin.outpoint, self.items.len());
        self.items.push(coin);
    }

    pub(crate) fn remove(&mut self, outpoint: &OutPoint) -> Option<PoolCoin> {
        let at = self.index.remove(outpoint)?;
        let coin = self.items.swap_remove(at);
        if let Some(moved) = self.items.get(at) {
            self.index.insert(moved.outpoint, at);
        }
        Some(coin)
    }

    /// Takes a coin at random.
    pub(crate) fn take_random(&mut self, rng: &mut impl Rng) -> Option<PoolCoin> {
        if self.items.is_empty() {
            return None;
        }
        let outpoint = self.items[rng.gen_range(0..self.items.len())].outpoint;
        self.remove(&outpoint)
    }

    /// The coins in pick order (saved with the chain so that a loaded chain
    /// goes on exactly as the original would).
    pub(crate) fn iter(&self) -> impl Iterator<Item = &PoolCoin> {
        self.items.iter()
    }
}
