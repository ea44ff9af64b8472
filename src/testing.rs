//! Test helpers shared by the unit tests of the pure modules.

/// `input` cut at `cuts` (clamped, in any order): the pieces a reader would see.
pub fn pieces<'a>(input: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut bounds: Vec<usize> = cuts.iter().map(|&c| c.min(input.len())).collect();
    bounds.sort_unstable();
    bounds.push(input.len());
    let mut prev = 0;
    bounds
        .into_iter()
        .map(|c| {
            let piece = &input[prev..c];
            prev = c;
            piece
        })
        .collect()
}
