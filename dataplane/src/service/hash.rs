//! Small, fast hashes for fixed-size keys. The deterministic ones pick
//! endpoints, so every node computes the same answer; the seeded ones index
//! local tables, so a peer cannot aim collisions at them.

use std::hash::{BuildHasher, Hasher};

const K0: u64 = 0x243f_6a88_85a3_08d3;
const K1: u64 = 0x1319_8a2e_0370_7344;
const K2: u64 = 0xa409_3822_299f_31d0;

/// 64×64→128-bit multiply, halves xored: the core of foldhash/wyhash.
#[inline]
fn folded_mul(a: u64, b: u64) -> u64 {
    let product = u128::from(a) * u128::from(b);
    (product as u64) ^ ((product >> 64) as u64)
}

/// Hashes two words under `seed`.
#[inline]
pub fn hash2(seed: u64, a: u64, b: u64) -> u64 {
    let h = folded_mul(a ^ seed ^ K0, b ^ K1);
    folded_mul(h ^ K2, seed ^ K1 ^ 0x9e37_79b9_7f4a_7c15)
}

/// A seed no peer can predict, without a new dependency: std's per-process
/// random SipHash keys.
pub fn random_seed() -> u64 {
    std::collections::hash_map::RandomState::new().hash_one(0x5eed_u64)
}

/// `BuildHasher` for maps keyed by one packed word (the frontend map).
#[derive(Debug, Default, Clone, Copy)]
pub struct WordHasherBuilder;

impl BuildHasher for WordHasherBuilder {
    type Hasher = WordHasher;
    fn build_hasher(&self) -> WordHasher {
        WordHasher(0)
    }
}

/// Hashes the words written to it; keys write one `u64`.
#[derive(Debug, Default, Clone, Copy)]
pub struct WordHasher(u64);

impl Hasher for WordHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }
    fn write_u64(&mut self, word: u64) {
        self.0 = hash2(self.0, word, K2);
    }
}
