//! The incremental SSE scanner against a plain reference implementation of the SSE
//! spec: the same events (data and start offset) for any input and any split.
#![no_main]
use libfuzzer_sys::fuzz_target;
use llmproxy::sse::SseScanner;

fn reference(input: &[u8]) -> Vec<(Vec<u8>, u64)> {
    let mut out = Vec::new();
    let mut data: Option<Vec<u8>> = None;
    let mut start: Option<u64> = None;
    let mut i = 0;
    while i < input.len() {
        let line_start = i;
        while i < input.len() && input[i] != b'\r' && input[i] != b'\n' {
            i += 1;
        }
        let line = &input[line_start..i];
        if i < input.len() {
            if input[i] == b'\r' && i + 1 < input.len() && input[i + 1] == b'\n' {
                i += 2;
            } else {
                i += 1;
            }
        } else {
            break;
        }
        if line.is_empty() {
            if let Some(mut d) = data.take() {
                d.pop();
                out.push((d, start.unwrap_or(0)));
            }
            start = None;
            continue;
        }
        start.get_or_insert(line_start as u64);
        if line[0] == b':' {
            continue;
        }
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(p) => {
                let v = &line[p + 1..];
                (&line[..p], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        if name == b"data" {
            let d = data.get_or_insert_with(Vec::new);
            d.extend_from_slice(value);
            d.push(b'\n');
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let mut cuts = vec![data[0] as usize, data[1] as usize * 2, data[2] as usize * 5];
    let input = &data[3..];
    let want = reference(input);
    cuts.iter_mut().for_each(|c| *c = (*c).min(input.len()));
    cuts.sort_unstable();
    cuts.push(input.len());
    let mut s = SseScanner::new();
    let mut got = Vec::new();
    let mut prev = 0;
    for c in cuts {
        s.feed(&input[prev..c], |e| got.push((e.data.to_vec(), e.start)));
        prev = c;
    }
    assert_eq!(got, want);
});
