//! The chunked decoder: never a panic, and the same output and end whatever the
//! split points of the input.
#![no_main]
use libfuzzer_sys::fuzz_target;
use llmproxy::http::body::{BodyDecoder, Framing};

fn decode(input: &[u8], cuts: &[usize]) -> (Result<Vec<u8>, ()>, usize) {
    let mut d = BodyDecoder::new(Framing::Chunked);
    let mut out = Vec::new();
    let mut consumed = 0;
    let mut bounds: Vec<usize> = cuts.iter().map(|&c| c.min(input.len())).collect();
    bounds.sort_unstable();
    bounds.push(input.len());
    for end in bounds {
        if end < consumed {
            continue;
        }
        match d.decode(&input[consumed..end], |s| out.extend_from_slice(s)) {
            Ok(n) => consumed += n,
            Err(_) => return (Err(()), consumed),
        }
        if d.is_done() {
            break;
        }
    }
    (Ok(out), consumed)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let cuts = [data[0] as usize, data[1] as usize * 3];
    let input = &data[2..];
    let whole = decode(input, &[]);
    let split = decode(input, &cuts);
    match (&whole.0, &split.0) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a, b);
            assert_eq!(whole.1, split.1);
        }
        (Err(_), Err(_)) => {}
        // An error may surface later in a split decode only if the whole input erred.
        _ => assert!(whole.0.is_err() || split.0.is_err()),
    }
});
