//! Request and response heads: never a panic, and a parsed head's framing is
//! consistent (Content-Length and Transfer-Encoding never both accepted).
#![no_main]
use libfuzzer_sys::fuzz_target;
use llmproxy::http::body::Framing;
use llmproxy::http::head::{RequestHead, ResponseHead};

fuzz_target!(|data: &[u8]| {
    let mut req = RequestHead::default();
    if let Ok(Some(n)) = req.parse(data, 64 * 1024) {
        assert!(n <= data.len());
        let has_cl = req.headers.get("content-length").is_some();
        let has_te = req.headers.get("transfer-encoding").is_some();
        assert!(!(has_cl && has_te), "both framing headers accepted");
        if let Framing::Length(_) = req.framing() {
            assert!(has_cl);
        }
        if has_te {
            // Accepted only as chunked alone: one coding over every line.
            assert_eq!(req.framing(), Framing::Chunked);
            let codings: Vec<&[u8]> = req
                .headers
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case(b"transfer-encoding"))
                .flat_map(|(_, v)| v.split(|&b| b == b','))
                .map(<[u8]>::trim_ascii)
                .filter(|c| !c.is_empty())
                .collect();
            assert_eq!(codings.len(), 1, "several codings accepted");
            assert!(codings[0].eq_ignore_ascii_case(b"chunked"));
        }
        let _ = (req.method(), req.path(), req.route(), req.keep_alive);
    }
    let mut resp = ResponseHead::default();
    if let Ok(Some(n)) = resp.parse(data, 64 * 1024) {
        assert!(n <= data.len());
        let _ = resp.framing("GET");
        let _ = resp.framing("HEAD");
    }
});
