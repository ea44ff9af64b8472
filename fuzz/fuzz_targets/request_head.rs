//! Request and response heads: never a panic, a parsed head's framing is consistent
//! (Content-Length and Transfer-Encoding never both accepted), and the headers found
//! by index are those a scan finds.
#![no_main]
use libfuzzer_sys::fuzz_target;
use llmproxy::http::body::Framing;
use llmproxy::http::head::{Known, RequestHead, ResponseHead};

fuzz_target!(|data: &[u8]| {
    let mut req = RequestHead::default();
    if let Ok(Some(n)) = req.parse(data, 64 * 1024) {
        assert!(n <= data.len());
        // A scan of every header, independent of the index the parser keeps.
        let scan = |name: &[u8]| -> Vec<&[u8]> {
            req.headers
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v)
                .collect()
        };
        for (k, name) in [
            (Known::ContentLength, &b"content-length"[..]),
            (Known::TransferEncoding, b"transfer-encoding"),
            (Known::Connection, b"connection"),
            (Known::Expect, b"expect"),
            (Known::Authorization, b"authorization"),
            (Known::ContentType, b"content-type"),
        ] {
            let want = scan(name);
            assert_eq!(req.headers.values(k).collect::<Vec<_>>(), want);
            assert_eq!(req.headers.known(k), want.first().copied());
        }
        let te = scan(b"transfer-encoding");
        let has_cl = !scan(b"content-length").is_empty();
        let has_te = !te.is_empty();
        assert!(!(has_cl && has_te), "both framing headers accepted");
        if let Framing::Length(_) = req.framing() {
            assert!(has_cl);
        }
        if has_te {
            // Accepted only as chunked alone: one coding over every line.
            assert_eq!(req.framing(), Framing::Chunked);
            let codings: Vec<&[u8]> = te
                .iter()
                .flat_map(|v| v.split(|&b| b == b','))
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
