//! A small, fast pseudo-random generator (xorshift64*) for WebSocket
//! masking keys and handshake nonces. Masking only has to be unpredictable
//! to a browser's scripts, which a load generator has none of; speed
//! matters more here than cryptographic strength.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Distinct seeds for generators made in the same nanosecond.
static SEEDS: AtomicU64 = AtomicU64::new(0x9E37_79B9_7F4A_7C15);

/// xorshift64* (Vigna, 2016).
#[derive(Clone, Debug)]
pub struct FastRng(u64);

impl FastRng {
    /// A generator from a fixed seed (zero is replaced).
    pub fn new(seed: u64) -> Self {
        Self(if seed == 0 {
            0x2545_F491_4F6C_DD1D
        } else {
            seed
        })
    }

    /// A generator seeded from the clock and a process-wide counter.
    pub fn seeded() -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let salt = SEEDS.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
        Self::new(nanos ^ salt.rotate_left(17))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    pub fn bytes16(&mut self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&self.next_u64().to_ne_bytes());
        out[8..].copy_from_slice(&self.next_u64().to_ne_bytes());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differs_between_generators_and_draws() {
        let mut a = FastRng::seeded();
        let mut b = FastRng::seeded();
        assert_ne!(a.next_u64(), b.next_u64());
        assert_ne!(a.next_u64(), a.next_u64());
        assert_ne!(FastRng::new(0).next_u64(), 0);
    }
}
