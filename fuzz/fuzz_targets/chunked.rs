//! The chunked decoder: never a panic, the same output and end whatever the split
//! points of the input (whole size lines read at once, or byte by byte), and a chunk
//! handed out whole is its size line, its data and CRLF.
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
        let read = &input[consumed..end];
        match d.decode_framed(read, |s, whole| {
            out.extend_from_slice(s);
            if let Some(w) = whole {
                let head = &w[..w.len() - s.len() - 2];
                assert!(head.len() > 2 && head.ends_with(b"\r\n"));
                let hex = std::str::from_utf8(&head[..head.len() - 2]).expect("hex");
                assert_eq!(usize::from_str_radix(hex, 16).ok(), Some(s.len()));
                assert_eq!(&w[head.len()..], [s, b"\r\n"].concat());
            }
        }) {
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
    let every_byte: Vec<usize> = (1..input.len()).collect();
    let bytes = decode(input, &every_byte);
    assert_eq!(whole.0.is_ok(), bytes.0.is_ok());
    if let (Ok(a), Ok(b)) = (&whole.0, &bytes.0) {
        assert_eq!((a, whole.1), (b, bytes.1));
    }
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
