//! Proof of work, as Bitcoin Core checks it: each header's hash meets the
//! target its `bits` encode, and those `bits` are what the network's
//! difficulty rules require at its height (Core's `GetNextWorkRequired`):
//! a retarget every 2,016 blocks from the time the period took (clamped to
//! a factor of 4), testnet's minimum-difficulty exception, testnet4's
//! BIP94 base, regtest's fixed limit.
//!
//! Without this a source could hand the loop a block nobody mined: a
//! transaction paying a wallet from an input that exists nowhere would be
//! connected. With it, faking a block costs the work of a real one (on
//! regtest that is nothing: see the trust model in docs/architecture.md).

use std::collections::VecDeque;

use bitcoin::block::Header;
use bitcoin::params::Params;
use bitcoin::pow::{CompactTarget, Target, Work};
use bitcoin::{BlockHash, Network};

/// Why a header is refused.
pub(crate) type PowFault = &'static str;

/// One header as far as the difficulty rules go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Link {
    pub(crate) height: u32,
    pub(crate) bits: CompactTarget,
    pub(crate) time: u32,
}

impl Link {
    pub(crate) fn of(height: u32, header: &Header) -> Link {
        Link {
            height,
            bits: header.bits,
            time: header.time,
        }
    }
}

/// The headers the next header's difficulty depends on, and the checks.
#[derive(Debug, Clone)]
pub(crate) struct HeaderChain {
    params: Params,
    /// The last headers, lowest first, consecutive: the current retarget
    /// period (up to 2,016) where the rules look back that far; none on a
    /// network whose every block is at its limit (regtest).
    window: VecDeque<Link>,
}

impl HeaderChain {
    /// The rules of `network`, with no header known yet.
    pub(crate) fn new(network: Network) -> HeaderChain {
        HeaderChain {
            params: Params::new(network),
            window: VecDeque::new(),
        }
    }

    /// How many headers below a height its rules read: the interval (the
    /// period's first block for a retarget, or the walk back to the last
    /// block without the minimum-difficulty exception), or none.
    pub(crate) fn history(&self) -> u32 {
        if self.fixed_limit() {
            0
        } else {
            self.interval()
        }
    }

    /// Regtest: retargeting off and minimum difficulty allowed. In Core
    /// every block then needs exactly the limit: a non-retarget height
    /// gets the limit or the bits of the last block of its period not at
    /// the limit (there is none: genesis is at the limit), and a retarget
    /// height keeps the previous block's bits.
    fn fixed_limit(&self) -> bool {
        self.params.no_pow_retargeting && self.params.allow_min_difficulty_blocks
    }

    fn interval(&self) -> u32 {
        u32::try_from(self.params.difficulty_adjustment_interval()).unwrap_or(u32::MAX)
    }

    fn limit(&self) -> CompactTarget {
        self.params.max_attainable_target.to_compact_lossy()
    }

    /// Starts from known headers (consecutive, lowest first, ending at the
    /// scan's starting point), which the caller has checked chain to it.
    pub(crate) fn seed(&mut self, links: impl IntoIterator<Item = Link>) {
        self.window.clear();
        for link in links {
            self.push(link);
        }
    }

    fn push(&mut self, link: Link) {
        if self
            .window
            .back()
            .is_some_and(|l| l.height + 1 != link.height)
        {
            self.window.clear();
        }
        self.window.push_back(link);
        while self.window.len() > self.history() as usize {
            self.window.pop_front();
        }
    }

    /// Checks the header at `height` (whose hash is `hash`), which the
    /// caller has checked extends the last one, and takes it in.
    pub(crate) fn connect(
        &mut self,
        height: u32,
        header: &Header,
        hash: BlockHash,
    ) -> Result<(), PowFault> {
        if !header.target().is_met_by(hash) {
            return Err("its hash does not meet its own target: it has no proof of work");
        }
        if header.bits != self.required_bits(height, header.time)? {
            return Err("its difficulty target is not what the network's rules require");
        }
        self.push(Link::of(height, header));
        Ok(())
    }

    /// The `bits` a header at `height` with timestamp `time` must carry
    /// (Core's `GetNextWorkRequired` and `CalculateNextWorkRequired`).
    pub(crate) fn required_bits(&self, height: u32, time: u32) -> Result<CompactTarget, PowFault> {
        const UNKNOWN: PowFault = "the headers its difficulty depends on are not known";
        let limit = self.limit();
        if self.fixed_limit() {
            return Ok(limit);
        }
        let params = &self.params;
        let prev = *self
            .window
            .back()
            .filter(|l| l.height + 1 == height)
            .ok_or(UNKNOWN)?;
        let interval = self.interval();
        if !height.is_multiple_of(interval) {
            if params.allow_min_difficulty_blocks {
                // A block more than twice the spacing after its parent may
                // use the minimum difficulty; otherwise the difficulty is
                // that of the last block of the period that did not.
                let spacing = u32::try_from(params.pow_target_spacing).unwrap_or(u32::MAX);
                if time > prev.time.saturating_add(spacing.saturating_mul(2)) {
                    return Ok(limit);
                }
                return self
                    .window
                    .iter()
                    .rev()
                    .find(|l| l.height.is_multiple_of(interval) || l.bits != limit)
                    .map(|l| l.bits)
                    .ok_or(UNKNOWN);
            }
            return Ok(prev.bits);
        }
        if params.no_pow_retargeting {
            return Ok(prev.bits);
        }
        // The period's first block: `interval - 1` below the last one
        // (Core's off-by-one, kept by consensus).
        let first = self
            .window
            .iter()
            .find(|l| l.height + interval == height)
            .ok_or(UNKNOWN)?;
        let timespan = u64::from(prev.time.saturating_sub(first.time));
        // BIP94 (testnet4): the period's first block carries the real
        // difficulty, which the minimum-difficulty exception cannot lower.
        let base = if params.network == Network::Testnet4 {
            first.bits
        } else {
            prev.bits
        };
        Ok(CompactTarget::from_next_work_required(
            base, timespan, params,
        ))
    }
}

/// The expected work of a block with these `bits` (what "most work"
/// adds up); the least possible work when they are not known.
pub(crate) fn work_of(bits: Option<CompactTarget>) -> Work {
    bits.map_or(Target::MAX_ATTAINABLE_REGTEST, Target::from_compact)
        .to_work()
}

/// No work at all: the start of a sum.
pub(crate) fn no_work() -> Work {
    Work::from_be_bytes([0; 32])
}

#[cfg(test)]
mod tests {
    use bitcoin::hashes::Hash as _;

    use super::*;

    fn bits(n: u32) -> CompactTarget {
        CompactTarget::from_consensus(n)
    }

    /// A mainnet window for the period `last - 2015 ..= last`, with the
    /// first and last blocks' times and the period's bits.
    fn mainnet_period(last: u32, first_time: u32, last_time: u32, period_bits: u32) -> HeaderChain {
        let mut chain = HeaderChain::new(Network::Bitcoin);
        chain.seed((last - 2015..=last).map(|height| Link {
            height,
            bits: bits(period_bits),
            time: if height == last {
                last_time
            } else {
                first_time + (height - (last - 2015))
            },
        }));
        chain
    }

    /// Bitcoin Core's `pow_tests.cpp` vectors: real mainnet retargets.
    #[test]
    fn mainnet_retargets_match_bitcoin_core() {
        // get_next_work: block 32256.
        let chain = mainnet_period(32255, 1_261_130_161, 1_262_152_739, 0x1d00ffff);
        assert_eq!(chain.required_bits(32256, 0), Ok(bits(0x1d00d86a)));
        // get_next_work_pow_limit: never easier than the limit (block 2016).
        let chain = mainnet_period(2015, 1_231_006_505, 1_233_061_996, 0x1d00ffff);
        assert_eq!(chain.required_bits(2016, 0), Ok(bits(0x1d00ffff)));
        // get_next_work_lower_limit_actual: at most 4x harder.
        let chain = mainnet_period(68543, 1_279_008_237, 1_279_297_671, 0x1c05a3f4);
        assert_eq!(chain.required_bits(68544, 0), Ok(bits(0x1c0168fd)));
        // get_next_work_upper_limit_actual: at most 4x easier.
        let chain = mainnet_period(46367, 1_263_163_443, 1_269_211_443, 0x1c387f6f);
        assert_eq!(chain.required_bits(46368, 0), Ok(bits(0x1d00e1fd)));
        // Between retargets: the previous block's bits, whatever the time.
        let chain = mainnet_period(32255, 1_261_130_161, 1_262_152_739, 0x1d00ffff);
        let mut next = chain.clone();
        next.push(Link {
            height: 32256,
            bits: bits(0x1d00d86a),
            time: 1_262_153_464,
        });
        assert_eq!(next.required_bits(32257, 0), Ok(bits(0x1d00d86a)));
        // Without the period's first block the rule cannot be applied.
        let mut short = HeaderChain::new(Network::Bitcoin);
        short.seed([Link {
            height: 32255,
            bits: bits(0x1d00ffff),
            time: 1,
        }]);
        assert!(short.required_bits(32256, 0).is_err());
        assert!(short.required_bits(32257, 0).is_err(), "not consecutive");
    }

    #[test]
    fn testnet_minimum_difficulty_exception() {
        let limit = bits(0x1d00ffff);
        let real = bits(0x1c0fffff);
        let mut chain = HeaderChain::new(Network::Testnet);
        // A period starting at 4032 at real difficulty, then two blocks
        // that used the exception.
        chain.seed([
            Link {
                height: 4032,
                bits: real,
                time: 1_000,
            },
            Link {
                height: 4033,
                bits: real,
                time: 1_600,
            },
            Link {
                height: 4034,
                bits: limit,
                time: 4_000,
            },
            Link {
                height: 4035,
                bits: limit,
                time: 6_000,
            },
        ]);
        // More than 20 minutes after its parent: the limit.
        assert_eq!(chain.required_bits(4036, 6_000 + 1_201), Ok(limit));
        // Within 20 minutes: the last real difficulty, skipping the
        // exception blocks.
        assert_eq!(chain.required_bits(4036, 6_000 + 1_200), Ok(real));
    }

    #[test]
    fn regtest_requires_its_limit_and_real_work() {
        let genesis = bitcoin::blockdata::constants::genesis_block(Network::Regtest).header;
        let mut chain = HeaderChain::new(Network::Regtest);
        assert_eq!(chain.history(), 0);
        let mut header = Header {
            prev_blockhash: genesis.block_hash(),
            nonce: 0,
            ..genesis
        };
        // A nonce that meets the target, and one that does not.
        let mined = |mut h: Header, want: bool| {
            while h.target().is_met_by(h.block_hash()) != want {
                h.nonce += 1;
            }
            h
        };
        let unmined = mined(header, false);
        assert!(
            chain
                .connect(1, &unmined, unmined.block_hash())
                .unwrap_err()
                .contains("proof of work")
        );
        // Harder than the limit, and mined: still refused on regtest.
        header.bits = bits(0x207ffffe);
        let harder = mined(header, true);
        assert!(
            chain
                .connect(1, &harder, harder.block_hash())
                .unwrap_err()
                .contains("difficulty")
        );
        header.bits = genesis.bits;
        let good = mined(header, true);
        assert_eq!(chain.connect(1, &good, good.block_hash()), Ok(()));
        // A hash that is not the header's is checked as given.
        assert!(chain.connect(2, &good, BlockHash::all_zeros()).is_ok());
        assert!(
            chain
                .connect(3, &good, BlockHash::from_byte_array([0xff; 32]))
                .is_err()
        );
    }

    #[test]
    fn work_grows_with_difficulty() {
        let easy = work_of(Some(bits(0x207fffff)));
        let hard = work_of(Some(bits(0x1d00ffff)));
        assert!(hard > easy);
        assert_eq!(work_of(None), easy);
        assert!(no_work() < easy);
        assert_eq!(no_work() + easy, easy);
    }
}
