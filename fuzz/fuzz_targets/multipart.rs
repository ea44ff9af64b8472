//! The multipart form scanner: never a panic, bounded memory, and the same fields
//! whatever the split of its input.
#![no_main]
use libfuzzer_sys::fuzz_target;
use llmproxy::http::multipart::{MultipartScanner, boundary};

fuzz_target!(|data: &[u8]| {
    // The first line is the Content-Type, the rest the body.
    let (ctype, body) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&b"multipart/form-data; boundary=xyz"[..], data),
    };
    let Ok(b) = boundary(ctype) else { return };
    let mut whole = MultipartScanner::new(&b);
    whole.feed(body);
    let cut = body.first().map_or(0, |&c| c as usize * 7).min(body.len());
    let mut split = MultipartScanner::new(&b);
    split.feed(&body[..cut]);
    split.feed(&body[cut..]);
    let mut bytewise = MultipartScanner::new(&b);
    for byte in body.chunks(1) {
        bytewise.feed(byte);
    }
    let (w, s, bw) = (whole.finish(), split.finish(), bytewise.finish());
    assert_eq!(w, s);
    assert_eq!(w, bw);
});
