//! Seeds derived from several values, so that every random choice depends only on what it
//! should (the run seed, the epoch, the sample index) and never on threads or timing.

/// splitmix64's finaliser: a bijection on u64 that spreads every input bit over the output.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A seed for the tuple `parts`. Order matters: `mix(&[a, b]) != mix(&[b, a])` in general.
pub fn mix(parts: &[u64]) -> u64 {
    parts.iter().fold(0x6f78_636c_6970_0001u64, |acc, &p| splitmix64(acc ^ splitmix64(p)))
}

#[cfg(test)]
mod tests {
    use super::mix;

    #[test]
    fn mix_separates_tuples() {
        assert_eq!(mix(&[1, 2]), mix(&[1, 2]));
        assert_ne!(mix(&[1, 2]), mix(&[2, 1]));
        assert_ne!(mix(&[0, 0]), mix(&[0]));
        assert_ne!(mix(&[7, 0, 1]), mix(&[7, 1, 0]));
    }
}
