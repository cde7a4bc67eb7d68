//! SipHash-2-4, the hash BIP158 keys with each block's hash.
//!
//! Hashing every watched script once per block is the floor of filter
//! matching, so this is the one place where lockstep spends effort on raw
//! speed: scripts of one length are hashed four at a time, which lets the
//! CPU overlap four independent dependency chains (SipHash's rounds are a
//! long serial chain, so one hash at a time leaves most execution units
//! idle). Checked against rust-bitcoin's `siphash24` in the tests.

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

/// SipHash-2-4 of four messages of the same length `len`, stored back to
/// back in `data` (`4 * len` bytes).
#[inline]
pub fn siphash24_x4(k0: u64, k1: u64, data: &[u8], len: usize) -> [u64; 4] {
    siphash24_lanes::<4>(k0, k1, data, len)
}

/// SipHash-2-4 of `N` messages of the same length, back to back in `data`.
/// Written lane-wise so that the compiler keeps `N` chains in flight, or
/// packs them into vector registers when the caller enables AVX2/AVX-512.
#[inline(always)]
fn siphash24_lanes<const N: usize>(k0: u64, k1: u64, data: &[u8], len: usize) -> [u64; N] {
    debug_assert_eq!(data.len(), N * len);
    let mut v = [[k0 ^ C0; N], [k1 ^ C1; N], [k0 ^ C2; N], [k1 ^ C3; N]];
    let words = len / 8;
    for w in 0..words {
        let m: [u64; N] = std::array::from_fn(|lane| {
            let at = lane * len + w * 8;
            u64::from_le_bytes(data[at..at + 8].try_into().expect("8 bytes"))
        });
        compress_lanes(&mut v, m);
    }
    let m: [u64; N] =
        std::array::from_fn(|lane| last_word(&data[lane * len + words * 8..(lane + 1) * len], len));
    compress_lanes(&mut v, m);
    for x in &mut v[2] {
        *x ^= 0xff;
    }
    for _ in 0..4 {
        round_lanes(&mut v);
    }
    std::array::from_fn(|lane| v[0][lane] ^ v[1][lane] ^ v[2][lane] ^ v[3][lane])
}

/// Calls `each(i, hash)` with the SipHash-2-4 of each of the messages of
/// length `len` stored back to back in `data`, using the widest vector
/// unit this CPU has (detected once).
#[inline]
pub fn for_each_siphash24(k0: u64, k1: u64, data: &[u8], len: usize, each: impl FnMut(usize, u64)) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static KERNEL: OnceLock<u8> = OnceLock::new();
        let kernel = *KERNEL.get_or_init(|| {
            if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512vl")
            {
                2
            } else if std::is_x86_feature_detected!("avx2") {
                1
            } else {
                0
            }
        });
        match kernel {
            // SAFETY: the CPU was checked for these features just above; the
            // functions are the portable code compiled with them enabled.
            #[allow(
                unsafe_code,
                reason = "calling a target-feature copy after runtime detection"
            )]
            2 => return unsafe { each_avx512(k0, k1, data, len, each) },
            #[allow(
                unsafe_code,
                reason = "calling a target-feature copy after runtime detection"
            )]
            1 => return unsafe { each_avx2(k0, k1, data, len, each) },
            _ => {}
        }
    }
    each_lanes::<4>(k0, k1, data, len, each)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl")]
fn each_avx512(k0: u64, k1: u64, data: &[u8], len: usize, each: impl FnMut(usize, u64)) {
    each_lanes::<8>(k0, k1, data, len, each)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn each_avx2(k0: u64, k1: u64, data: &[u8], len: usize, each: impl FnMut(usize, u64)) {
    each_lanes::<8>(k0, k1, data, len, each)
}

#[inline(always)]
fn each_lanes<const N: usize>(
    k0: u64,
    k1: u64,
    data: &[u8],
    len: usize,
    mut each: impl FnMut(usize, u64),
) {
    let count = data.len().checked_div(len).unwrap_or(0);
    let blocks = count / N;
    for b in 0..blocks {
        let hashes = siphash24_lanes::<N>(k0, k1, &data[b * N * len..(b + 1) * N * len], len);
        for (lane, hash) in hashes.into_iter().enumerate() {
            each(b * N + lane, hash);
        }
    }
    for i in blocks * N..count {
        each(i, siphash24(k0, k1, &data[i * len..(i + 1) * len]));
    }
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
fn compress_lanes<const N: usize>(v: &mut [[u64; N]; 4], m: [u64; N]) {
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

    proptest! {
        #[test]
        fn equals_rust_bitcoin(k0: u64, k1: u64, data in proptest::collection::vec(any::<u8>(), 0..80)) {
            let reference = siphash24::Hash::hash_with_keys(k0, k1, &data).as_u64();
            prop_assert_eq!(super::siphash24(k0, k1, &data), reference);
        }

        #[test]
        fn every_kernel_equals_one_at_a_time(k0: u64, k1: u64, len in 0usize..50, count in 0usize..40, seed: u64) {
            let data: Vec<u8> = (0..count * len).map(|i| (seed.wrapping_mul(i as u64 + 1) >> 7) as u8).collect();
            let mut seen = vec![None; if len == 0 { 0 } else { count }];
            super::for_each_siphash24(k0, k1, &data, len, |i, h| seen[i] = Some(h));
            for (i, got) in seen.iter().enumerate() {
                prop_assert_eq!(*got, Some(super::siphash24(k0, k1, &data[i * len..(i + 1) * len])));
            }
            let mut portable = vec![None; seen.len()];
            super::each_lanes::<4>(k0, k1, &data, len, |i, h| portable[i] = Some(h));
            prop_assert_eq!(&portable, &seen);
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx2") {
                let mut avx2 = vec![None; seen.len()];
                // SAFETY: AVX2 was detected just above.
                #[allow(unsafe_code, reason = "testing the AVX2 copy on a CPU that has AVX2")]
                unsafe { super::each_avx2(k0, k1, &data, len, |i, h| avx2[i] = Some(h)) };
                prop_assert_eq!(&avx2, &seen);
            }
        }

        #[test]
        fn four_lanes_equal_one_at_a_time(k0: u64, k1: u64, len in 0usize..50, seed: u64) {
            let data: Vec<u8> = (0..4 * len).map(|i| (seed.wrapping_mul(i as u64 + 1) >> 7) as u8).collect();
            let lanes = super::siphash24_x4(k0, k1, &data, len);
            for (lane, got) in lanes.iter().enumerate() {
                prop_assert_eq!(*got, super::siphash24(k0, k1, &data[lane * len..(lane + 1) * len]));
            }
        }
    }
}
