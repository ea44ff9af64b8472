//! Byte search tuned for JSON and SSE as LLM backends send them: mostly short runs
//! (member names, enum values, numbers, one token of text) between the bytes a scanner
//! stops at.

/// Where the first byte of `set` in `bytes` is (`bytes.len()` if none), sixteen bytes
/// at a time. JSON is mostly short runs (names, enum values, numbers) between
/// structural bytes: this stops within the first block on those without the set-up of
/// a general vector search, and still moves fast through long generated text.
#[inline]
pub fn find_any<const N: usize>(bytes: &[u8], set: [u8; N]) -> usize {
    let mut i = 0;
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{
            __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_or_si128,
            _mm_set1_epi8, _mm_setzero_si128,
        };
        // SAFETY: SSE2 is part of the x86_64 baseline, so these intrinsics are always
        // available; every load reads 16 bytes at `i` with `i + 16 <= bytes.len()`, and
        // `_mm_loadu_si128` has no alignment requirement.
        unsafe {
            let needles = set.map(|b| _mm_set1_epi8(b as i8));
            while i + 16 <= bytes.len() {
                let v = _mm_loadu_si128(bytes.as_ptr().add(i).cast::<__m128i>());
                let mut hit = _mm_setzero_si128();
                for n in needles {
                    hit = _mm_or_si128(hit, _mm_cmpeq_epi8(v, n));
                }
                let mask = _mm_movemask_epi8(hit) as u32;
                if mask != 0 {
                    return i + mask.trailing_zeros() as usize;
                }
                i += 16;
            }
        }
    }
    while i < bytes.len() && !set.contains(&bytes[i]) {
        i += 1;
    }
    i
}

/// How many leading bytes of `bytes` go into a JSON string as they are: none of `"`,
/// `\\` or a control byte (below 0x20). Sixteen bytes at a time, like `find_any`; the
/// last partial block is one more 16-byte look (overlapping bytes already known plain,
/// or a padded copy of a string shorter than 16) instead of a byte loop: record fields
/// (ids, names, keys) are short, and their tails were most of their serialization.
#[inline]
pub fn json_plain_len(bytes: &[u8]) -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{
            __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_max_epu8, _mm_movemask_epi8,
            _mm_or_si128, _mm_set1_epi8,
        };
        /// Bit k set when byte k of the 16 at `p` needs escaping.
        /// SAFETY (callers): 16 bytes are readable at `p`.
        #[inline(always)]
        unsafe fn escapes16(p: *const u8) -> u32 {
            // SAFETY: SSE2 is part of the x86_64 baseline; the load is unaligned and
            // the caller guarantees 16 readable bytes.
            unsafe {
                let v = _mm_loadu_si128(p.cast::<__m128i>());
                let below = _mm_set1_epi8(0x1f);
                // max(v, 0x1f) == 0x1f exactly when v <= 0x1f (unsigned).
                let control = _mm_cmpeq_epi8(_mm_max_epu8(v, below), below);
                let hit = _mm_or_si128(
                    _mm_or_si128(
                        _mm_cmpeq_epi8(v, _mm_set1_epi8(b'"' as i8)),
                        _mm_cmpeq_epi8(v, _mm_set1_epi8(b'\\' as i8)),
                    ),
                    control,
                );
                _mm_movemask_epi8(hit) as u32
            }
        }
        let n = bytes.len();
        let p = bytes.as_ptr();
        if n < 16 {
            let mut pad = [b'a'; 16];
            pad[..n].copy_from_slice(bytes);
            // SAFETY: `pad` is 16 bytes.
            let m = unsafe { escapes16(pad.as_ptr()) };
            return if m == 0 {
                n
            } else {
                m.trailing_zeros() as usize
            };
        }
        let mut i = 0;
        while i + 16 <= n {
            // SAFETY: i + 16 <= n.
            let m = unsafe { escapes16(p.add(i)) };
            if m != 0 {
                return i + m.trailing_zeros() as usize;
            }
            i += 16;
        }
        if i == n {
            return n;
        }
        // The last 16 bytes: those before `i` were found plain, so the first hit is
        // at or after `i`. SAFETY: n >= 16.
        let m = unsafe { escapes16(p.add(n - 16)) };
        if m == 0 {
            n
        } else {
            n - 16 + m.trailing_zeros() as usize
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        bytes
            .iter()
            .position(|&b| b < 0x20 || b == b'"' || b == b'\\')
            .unwrap_or(bytes.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn finds_what_a_plain_search_finds(
            bytes in proptest::collection::vec(prop_oneof![Just(b'"'), Just(b'\\'), Just(b'{'), any::<u8>()], 0..80),
        ) {
            let want = bytes.iter().position(|b| [b'"', b'\\'].contains(b)).unwrap_or(bytes.len());
            prop_assert_eq!(find_any(&bytes, [b'"', b'\\']), want);
            let want = bytes.iter().position(|b| b"\"{}[]".contains(b)).unwrap_or(bytes.len());
            prop_assert_eq!(find_any(&bytes, [b'"', b'{', b'}', b'[', b']']), want);
        }

        #[test]
        fn json_plain_len_stops_where_escaping_starts(
            bytes in proptest::collection::vec(prop_oneof![Just(b'"'), Just(b'\\'), Just(0x1f_u8), Just(0x20_u8), Just(0x7f_u8), Just(0x80_u8), 0x20u8..0x7f], 0..80),
        ) {
            let want = bytes.iter().position(|&b| b < 0x20 || b == b'"' || b == b'\\').unwrap_or(bytes.len());
            prop_assert_eq!(json_plain_len(&bytes), want);
        }
    }
}
