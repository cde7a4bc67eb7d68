//! SipHash-2-4, the hash BIP158 keys with each block's hash.
//!
//! Hashing every watched script once per block is the floor of filter
//! matching, so this is the one place where lockstep spends effort on raw
//! speed. Scripts are stored pre-cut into SipHash words and transposed in
//! blocks of [`LANES`] (word `w` of eight scripts side by side), so that
//! eight hashes run in the lanes of one AVX-512 register (two AVX2 ones):
//! each message word is one vector load, and SipHash's long serial chain
//! of rounds runs eight times at once. Checked against rust-bitcoin's
//! `siphash24` in the tests.

const C0: u64 = 0x736f_6d65_7073_6575;
const C1: u64 = 0x646f_7261_6e64_6f6d;
const C2: u64 = 0x6c79_6765_6e65_7261;
const C3: u64 = 0x7465_6462_7974_6573;

/// SipHash-2-4 of one message.
#[inline]
pub fn siphash24(k0: u64, k1: u64, data: &[u8]) -> u64 {
    let mut v = [k0 ^ C0, k1 ^ C1, k0 ^ C2, k1 ^ C3];
    let mut chunks = data.chunks_exact(8);
    for chunk in &mut chunks {
        let m = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        compress(&mut v, m);
    }
    compress(&mut v, last_word(chunks.remainder(), data.len()));
    finish(v)
}

/// Messages hashed side by side: one vector register of 64-bit lanes with
/// AVX-512, two with AVX2.
pub const LANES: usize = 8;

/// SipHash words of a message of `len` bytes: its whole 8-byte words and
/// the final word (the tail and the length).
#[inline]
pub fn words_per_message(len: usize) -> usize {
    len / 8 + 1
}

/// Stores message number `index` (of length `len`) in `words`, the
/// transposed layout [`for_each_block`] hashes: per block of [`LANES`]
/// messages, word `w` of lane `l` at index
/// `(block · words_per_message(len) + w) · LANES + l`. Messages must be
/// pushed in index order; a block's unused lanes stay zero (their hashes
/// mean nothing).
pub fn push_message(words: &mut Vec<u64>, len: usize, index: usize, message: &[u8]) {
    debug_assert_eq!(message.len(), len);
    let per = words_per_message(len);
    let (block, lane) = (index / LANES, index % LANES);
    if lane == 0 {
        words.resize((block + 1) * per * LANES, 0);
    }
    let base = block * per * LANES + lane;
    let (chunks, tail) = message.as_chunks::<8>();
    for (w, chunk) in chunks.iter().enumerate() {
        words[base + w * LANES] = u64::from_le_bytes(*chunk);
    }
    words[base + (per - 1) * LANES] = last_word(tail, len);
}

/// A decoded filter's bitmap, as the kernels test hashes against it: a
/// hash maps into `0..range` (`(hash · range) >> 64`), and its bucket
/// `value >> shift` has a bit in `bitmap`, set when the filter holds a
/// value in that bucket.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Probe<'a> {
    pub(crate) range: u64,
    pub(crate) shift: u32,
    pub(crate) bitmap: &'a [u64],
}

impl Probe<'_> {
    /// `(hash · range) >> 64` of [`LANES`] hashes, lane-wise.
    #[inline(always)]
    pub(crate) fn map_lanes(&self, hashes: &[u64; LANES]) -> [u64; LANES] {
        let mut mapped = [0u64; LANES];
        for (m, h) in mapped.iter_mut().zip(hashes) {
            *m = ((u128::from(*h) * u128::from(self.range)) >> 64) as u64;
        }
        mapped
    }

    /// A bit per lane (bit `l` for `hashes[l]`) whose bucket's bit is set:
    /// almost always none. A set bit still needs the exact test.
    #[cfg(test)]
    pub(crate) fn hits(&self, hashes: &[u64; LANES]) -> u32 {
        self.hits_of_mapped(&self.map_lanes(hashes))
    }

    /// As [`Self::hits`], for values already mapped into the range.
    #[inline(always)]
    pub(crate) fn hits_of_mapped(&self, mapped: &[u64; LANES]) -> u32 {
        let mut hits = 0u32;
        for (lane, m) in mapped.iter().enumerate() {
            let bucket = m >> self.shift;
            let word = self
                .bitmap
                .get((bucket >> 6) as usize)
                .copied()
                .unwrap_or(0);
            hits |= (((word >> (bucket & 63)) & 1) as u32) << lane;
        }
        hits
    }
}

/// Calls `hit(block, lanes, mapped)` for each block in `blocks` of a
/// transposed arena whose hashes pass `probe`'s bitmap test in some lanes
/// (bit `l` of `lanes` for lane `l`), with the block's hashes mapped into
/// the range (`(hash · range) >> 64`, exact): hashing, mapping and testing
/// in one pass, the first two in vector registers where the CPU has
/// AVX-512.
#[inline]
pub(crate) fn for_each_probe_hit(
    k0: u64,
    k1: u64,
    words: &[u64],
    per_message: usize,
    blocks: std::ops::Range<usize>,
    probe: &Probe<'_>,
    mut hit: impl FnMut(usize, u32, &[u64; LANES]),
) {
    #[cfg(target_arch = "x86_64")]
    if kernel() == Kernel::Avx512 && probe.range <= u64::from(u32::MAX) {
        // SAFETY: the CPU has AVX-512 F and VL (`kernel()` checked).
        #[allow(
            unsafe_code,
            reason = "calling a target-feature copy after runtime detection"
        )]
        return unsafe { probe_avx512(k0, k1, words, per_message, blocks, probe, hit) };
    }
    for_each_block(k0, k1, words, per_message, blocks, |b, hashes| {
        let mapped = probe.map_lanes(hashes);
        let lanes = probe.hits_of_mapped(&mapped);
        if lanes != 0 {
            hit(b, lanes, &mapped);
        }
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

/// The widest kernel this CPU runs, detected once.
fn kernel() -> Kernel {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static KERNEL: OnceLock<Kernel> = OnceLock::new();
        *KERNEL.get_or_init(|| {
            if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512vl")
            {
                Kernel::Avx512
            } else if std::is_x86_feature_detected!("avx2") {
                Kernel::Avx2
            } else {
                Kernel::Portable
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    Kernel::Portable
}

/// Calls `each(block, hashes)` with the SipHash-2-4 of the [`LANES`]
/// messages of each block in `blocks` of a transposed arena (see
/// [`push_message`]), using the widest vector unit this CPU has (detected
/// once). Loading a block's word is one vector load, so the rounds are all
/// that is left.
#[inline]
pub fn for_each_block(
    k0: u64,
    k1: u64,
    words: &[u64],
    per_message: usize,
    blocks: std::ops::Range<usize>,
    each: impl FnMut(usize, &[u64; LANES]),
) {
    #[cfg(target_arch = "x86_64")]
    match kernel() {
        // SAFETY: the CPU was checked for these features (`kernel()`); the
        // functions are the portable code compiled with them enabled, and
        // the AVX-512 kernel's intrinsics.
        #[allow(
            unsafe_code,
            reason = "calling a target-feature copy after runtime detection"
        )]
        Kernel::Avx512 => {
            return unsafe { blocks_avx512(k0, k1, words, per_message, blocks, each) };
        }
        #[allow(
            unsafe_code,
            reason = "calling a target-feature copy after runtime detection"
        )]
        Kernel::Avx2 => return unsafe { blocks_avx2(k0, k1, words, per_message, blocks, each) },
        Kernel::Portable => {}
    }
    blocks_portable(k0, k1, words, per_message, blocks, each)
}

/// The AVX-512 kernels, written with intrinsics: the compiler's own
/// vectorization of the portable code left SipHash's finalization scalar.
/// Two blocks (16 messages) go through the rounds together, because one
/// block alone is a single dependency chain that leaves the vector units
/// waiting on latency.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{C0, C1, C2, C3, LANES, Probe};

    #[inline]
    #[target_feature(enable = "avx512f,avx512vl")]
    fn round(v: &mut [__m512i; 4]) {
        v[0] = _mm512_add_epi64(v[0], v[1]);
        v[2] = _mm512_add_epi64(v[2], v[3]);
        v[1] = _mm512_xor_si512(_mm512_rol_epi64::<13>(v[1]), v[0]);
        v[3] = _mm512_xor_si512(_mm512_rol_epi64::<16>(v[3]), v[2]);
        v[0] = _mm512_rol_epi64::<32>(v[0]);
        v[2] = _mm512_add_epi64(v[2], v[1]);
        v[0] = _mm512_add_epi64(v[0], v[3]);
        v[1] = _mm512_xor_si512(_mm512_rol_epi64::<17>(v[1]), v[2]);
        v[3] = _mm512_xor_si512(_mm512_rol_epi64::<21>(v[3]), v[0]);
        v[2] = _mm512_rol_epi64::<32>(v[2]);
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512vl")]
    fn load(words: &[u64; LANES]) -> __m512i {
        // SAFETY: `words` is 64 readable bytes; the load is unaligned.
        #[allow(unsafe_code, reason = "an unaligned vector load of a whole array")]
        unsafe {
            _mm512_loadu_si512(words.as_ptr().cast())
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512vl")]
    pub(super) fn store(v: __m512i) -> [u64; LANES] {
        let mut out = [0u64; LANES];
        // SAFETY: `out` is 64 writable bytes; the store is unaligned.
        #[allow(unsafe_code, reason = "an unaligned vector store into a whole array")]
        unsafe {
            _mm512_storeu_si512(out.as_mut_ptr().cast(), v)
        };
        out
    }

    /// The hashes of two blocks of the same message length.
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl")]
    fn hash_pair(k0: u64, k1: u64, first: &[u64], second: &[u64]) -> (__m512i, __m512i) {
        let init = [
            _mm512_set1_epi64((k0 ^ C0) as i64),
            _mm512_set1_epi64((k1 ^ C1) as i64),
            _mm512_set1_epi64((k0 ^ C2) as i64),
            _mm512_set1_epi64((k1 ^ C3) as i64),
        ];
        let (mut x, mut y) = (init, init);
        for (mx, my) in first
            .as_chunks::<LANES>()
            .0
            .iter()
            .zip(second.as_chunks().0)
        {
            let (mx, my) = (load(mx), load(my));
            x[3] = _mm512_xor_si512(x[3], mx);
            y[3] = _mm512_xor_si512(y[3], my);
            round(&mut x);
            round(&mut y);
            round(&mut x);
            round(&mut y);
            x[0] = _mm512_xor_si512(x[0], mx);
            y[0] = _mm512_xor_si512(y[0], my);
        }
        let ff = _mm512_set1_epi64(0xff);
        x[2] = _mm512_xor_si512(x[2], ff);
        y[2] = _mm512_xor_si512(y[2], ff);
        for _ in 0..4 {
            round(&mut x);
            round(&mut y);
        }
        let fold = |v: [__m512i; 4]| {
            _mm512_xor_si512(_mm512_xor_si512(v[0], v[1]), _mm512_xor_si512(v[2], v[3]))
        };
        (fold(x), fold(y))
    }

    /// Calls `each(b, hashes of b, hashes of b + 1, whether b + 1 is in
    /// blocks)` for the blocks `blocks` in pairs (a lone last block is
    /// hashed next to itself).
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl")]
    pub(super) fn pairs(
        k0: u64,
        k1: u64,
        words: &[u64],
        per_message: usize,
        blocks: std::ops::Range<usize>,
        mut each: impl FnMut(usize, __m512i, __m512i, bool),
    ) {
        let stride = per_message * LANES;
        let end = blocks.end.min(words.len() / stride.max(1));
        let mut b = blocks.start;
        while b < end {
            let pair = b + 1 < end;
            let first = &words[b * stride..(b + 1) * stride];
            let second = if pair {
                &words[(b + 1) * stride..(b + 2) * stride]
            } else {
                first
            };
            let (hx, hy) = hash_pair(k0, k1, first, second);
            each(b, hx, hy, pair);
            b += 2;
        }
    }

    /// `(h · r) >> 64` lane-wise, for a range below 2^32.
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl")]
    fn map(hashes: __m512i, r: __m512i) -> __m512i {
        let hi = _mm512_mul_epu32(_mm512_srli_epi64::<32>(hashes), r);
        let lo = _mm512_srli_epi64::<32>(_mm512_mul_epu32(hashes, r));
        _mm512_srli_epi64::<32>(_mm512_add_epi64(hi, lo))
    }

    /// The lanes of two blocks' hashes whose bucket bit is set in
    /// `probe`'s bitmap (bits 0-7 for `x`, 8-15 for `y`), and the hashes
    /// mapped into the range. The mapping is `(h · r) >> 64` for a range
    /// below 2^32 from 32-bit halves (`h·r = hi·r·2^32 + lo·r`, and
    /// `hi·r + (lo·r >> 32) < 2^64`); the bitmap test is one gather of 16
    /// 32-bit words for both blocks (two gathers of 8 u64 words measured
    /// 8-13% slower in all; storing the mapped values for a scalar test
    /// loop, 1.2-1.5× slower).
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl")]
    pub(super) fn probe_pair_hits(
        x: __m512i,
        y: __m512i,
        probe: &Probe<'_>,
    ) -> (u32, __m512i, __m512i) {
        debug_assert!(probe.range <= u64::from(u32::MAX));
        let r = _mm512_set1_epi64(probe.range as i64);
        let (mx, my) = (map(x, r), map(y, r));
        if probe.bitmap.is_empty() {
            return (0, mx, my);
        }
        let count = _mm_cvtsi32_si128(probe.shift as i32);
        // Buckets are below 2^32 (mapped values are), so 32-bit lanes hold
        // them: x's in lanes 0-7, y's in 8-15.
        let bucket = _mm512_inserti64x4::<1>(
            _mm512_castsi256_si512(_mm512_cvtepi64_epi32(_mm512_srl_epi64(mx, count))),
            _mm512_cvtepi64_epi32(_mm512_srl_epi64(my, count)),
        );
        // The bitmap's u64 words read as twice as many little-endian u32
        // words: bucket k is bit k & 31 of u32 word k >> 5.
        let last = _mm512_set1_epi32((probe.bitmap.len() * 2 - 1) as i32);
        let index = _mm512_min_epu32(_mm512_srli_epi32::<5>(bucket), last);
        // SAFETY: every index is at most `2 · bitmap.len() - 1` (clamped
        // just above; the bitmap is not empty), in u32 words of 4 bytes.
        #[allow(unsafe_code, reason = "a gather of bitmap words at clamped indices")]
        let words = unsafe { _mm512_i32gather_epi32::<4>(index, probe.bitmap.as_ptr().cast()) };
        let bits = _mm512_srlv_epi32(words, _mm512_and_si512(bucket, _mm512_set1_epi32(31)));
        (
            u32::from(_mm512_test_epi32_mask(bits, _mm512_set1_epi32(1))),
            mx,
            my,
        )
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl")]
fn blocks_avx512(
    k0: u64,
    k1: u64,
    words: &[u64],
    per_message: usize,
    blocks: std::ops::Range<usize>,
    mut each: impl FnMut(usize, &[u64; LANES]),
) {
    avx512::pairs(k0, k1, words, per_message, blocks, |b, hx, hy, pair| {
        each(b, &avx512::store(hx));
        if pair {
            each(b + 1, &avx512::store(hy));
        }
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl")]
fn probe_avx512(
    k0: u64,
    k1: u64,
    words: &[u64],
    per_message: usize,
    blocks: std::ops::Range<usize>,
    probe: &Probe<'_>,
    mut hit: impl FnMut(usize, u32, &[u64; LANES]),
) {
    // Hits are collected without a branch on them (a slot is written for
    // every block and kept only when it has a hit), then handed out per
    // chunk: a branch on the gather's result mispredicts on every hit and
    // throws away the hashing already under way behind it.
    const CHUNK: usize = 64;
    let mut found = [(0usize, 0u32, [0u64; LANES]); CHUNK];
    let mut start = blocks.start;
    while start < blocks.end {
        let end = blocks.end.min(start + CHUNK);
        let mut n = 0;
        avx512::pairs(k0, k1, words, per_message, start..end, |b, hx, hy, pair| {
            let (lanes, mx, my) = avx512::probe_pair_hits(hx, hy, probe);
            let (lx, ly) = (lanes & 0xff, if pair { lanes >> 8 } else { 0 });
            if let Some(slot) = found.get_mut(n) {
                *slot = (b, lx, avx512::store(mx));
            }
            n += usize::from(lx != 0);
            if let Some(slot) = found.get_mut(n) {
                *slot = (b + 1, ly, avx512::store(my));
            }
            n += usize::from(ly != 0);
        });
        for (b, lanes, mapped) in &found[..n.min(CHUNK)] {
            hit(*b, *lanes, mapped);
        }
        start = end;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn blocks_avx2(
    k0: u64,
    k1: u64,
    words: &[u64],
    per_message: usize,
    blocks: std::ops::Range<usize>,
    each: impl FnMut(usize, &[u64; LANES]),
) {
    blocks_portable(k0, k1, words, per_message, blocks, each)
}

#[inline(always)]
fn blocks_portable(
    k0: u64,
    k1: u64,
    words: &[u64],
    per_message: usize,
    blocks: std::ops::Range<usize>,
    mut each: impl FnMut(usize, &[u64; LANES]),
) {
    let stride = per_message * LANES;
    for b in blocks {
        let Some(block) = words.get(b * stride..(b + 1) * stride) else {
            return;
        };
        each(b, &hash_block(k0, k1, block));
    }
}

/// The hashes of one block of [`LANES`] messages of `block.len() / LANES`
/// words each.
#[inline(always)]
fn hash_block(k0: u64, k1: u64, block: &[u64]) -> [u64; LANES] {
    let mut v = [
        [k0 ^ C0; LANES],
        [k1 ^ C1; LANES],
        [k0 ^ C2; LANES],
        [k1 ^ C3; LANES],
    ];
    for m in block.as_chunks::<LANES>().0 {
        compress_lanes(&mut v, m);
    }
    for x in &mut v[2] {
        *x ^= 0xff;
    }
    for _ in 0..4 {
        round_lanes(&mut v);
    }
    std::array::from_fn(|lane| v[0][lane] ^ v[1][lane] ^ v[2][lane] ^ v[3][lane])
}

/// The final word: the last `len % 8` bytes and the length's low byte on top.
#[inline(always)]
fn last_word(tail: &[u8], len: usize) -> u64 {
    let mut b = (len as u64) << 56;
    for (i, &byte) in tail.iter().enumerate() {
        b |= u64::from(byte) << (8 * i);
    }
    b
}

#[inline(always)]
fn round(v: &mut [u64; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13) ^ v[0];
    v[0] = v[0].rotate_left(32);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(16) ^ v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(21) ^ v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(17) ^ v[2];
    v[2] = v[2].rotate_left(32);
}

#[inline(always)]
fn compress(v: &mut [u64; 4], m: u64) {
    v[3] ^= m;
    round(v);
    round(v);
    v[0] ^= m;
}

#[inline(always)]
fn finish(mut v: [u64; 4]) -> u64 {
    v[2] ^= 0xff;
    for _ in 0..4 {
        round(&mut v);
    }
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

#[inline(always)]
fn round_lanes<const N: usize>(v: &mut [[u64; N]; 4]) {
    let [v0, v1, v2, v3] = v;
    for l in 0..N {
        v0[l] = v0[l].wrapping_add(v1[l]);
        v2[l] = v2[l].wrapping_add(v3[l]);
        v1[l] = v1[l].rotate_left(13) ^ v0[l];
        v3[l] = v3[l].rotate_left(16) ^ v2[l];
        v0[l] = v0[l].rotate_left(32);
        v0[l] = v0[l].wrapping_add(v3[l]);
        v2[l] = v2[l].wrapping_add(v1[l]);
        v3[l] = v3[l].rotate_left(21) ^ v0[l];
        v1[l] = v1[l].rotate_left(17) ^ v2[l];
        v2[l] = v2[l].rotate_left(32);
    }
}

#[inline(always)]
fn compress_lanes<const N: usize>(v: &mut [[u64; N]; 4], m: &[u64; N]) {
    for l in 0..N {
        v[3][l] ^= m[l];
    }
    round_lanes(v);
    round_lanes(v);
    for l in 0..N {
        v[0][l] ^= m[l];
    }
}

#[cfg(test)]
mod tests {
    use bitcoin::hashes::siphash24;
    use proptest::prelude::*;

    use super::LANES;

    /// What a kernel calls per block.
    type Each<'a> = dyn FnMut(usize, &[u64; LANES]) + 'a;

    fn messages(len: usize, count: usize, seed: u64) -> Vec<Vec<u8>> {
        (0..count)
            .map(|i| {
                (0..len)
                    .map(|j| (seed.wrapping_mul((i * len + j) as u64 + 1) >> 7) as u8)
                    .collect()
            })
            .collect()
    }

    fn arena(len: usize, messages: &[Vec<u8>]) -> Vec<u64> {
        let mut words = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            super::push_message(&mut words, len, i, m);
        }
        words
    }

    proptest! {
        #[test]
        fn equals_rust_bitcoin(k0: u64, k1: u64, data in proptest::collection::vec(any::<u8>(), 0..80)) {
            let reference = siphash24::Hash::hash_with_keys(k0, k1, &data).as_u64();
            prop_assert_eq!(super::siphash24(k0, k1, &data), reference);
        }

        #[test]
        fn every_kernel_equals_one_at_a_time(k0: u64, k1: u64, len in 0usize..50, count in 0usize..40, seed: u64) {
            let messages = messages(len, count, seed);
            let words = arena(len, &messages);
            let per = super::words_per_message(len);
            let blocks = count.div_ceil(LANES);
            let collect = |kernel: &dyn Fn(&mut Each)| {
                let mut seen = vec![None; count];
                kernel(&mut |b, hashes| {
                    for (lane, h) in hashes.iter().enumerate() {
                        if let Some(slot) = seen.get_mut(b * LANES + lane) {
                            *slot = Some(*h);
                        }
                    }
                });
                seen
            };
            let dispatched = collect(&|f| super::for_each_block(k0, k1, &words, per, 0..blocks, f));
            for (i, got) in dispatched.iter().enumerate() {
                prop_assert_eq!(*got, Some(super::siphash24(k0, k1, &messages[i])));
            }
            let portable = collect(&|f| super::blocks_portable(k0, k1, &words, per, 0..blocks, f));
            prop_assert_eq!(&portable, &dispatched);
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx2") {
                // SAFETY: AVX2 was detected just above.
                #[allow(unsafe_code, reason = "testing the AVX2 copy on a CPU that has AVX2")]
                let avx2 = collect(&|f| unsafe { super::blocks_avx2(k0, k1, &words, per, 0..blocks, f) });
                prop_assert_eq!(&avx2, &dispatched);
            }
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512vl") {
                // SAFETY: AVX-512 F and VL were detected just above.
                #[allow(unsafe_code, reason = "testing the AVX-512 copy on a CPU that has it")]
                let avx512 = collect(&|f| unsafe { super::blocks_avx512(k0, k1, &words, per, 0..blocks, f) });
                prop_assert_eq!(&avx512, &dispatched);
            }
        }
    }

    #[test]
    fn blocks_past_the_arena_are_not_hashed() {
        let words = arena(22, &messages(22, 3, 7));
        let mut calls = 0;
        super::for_each_block(1, 2, &words, super::words_per_message(22), 0..5, |_, _| {
            calls += 1
        });
        assert_eq!(calls, 1);
    }
}
