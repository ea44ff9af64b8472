//! Steady-state relaying does no heap allocation per chunk: after warm-up, relaying
//! more streams through the same `BodyRelay` (SSE scanning, metering, hiding the usage
//! chunk, stripping continuous usage, chunked framing) allocates nothing per chunk.
//! Counted with a thread-local counting allocator, so other test threads do not count.

use llmproxy::http::body::{BodyDecoder, Framing, encode_chunk};
use llmproxy::relay::body::Edits;
use llmproxy::relay::body::{BodyRelay, Mode};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: defers to the system allocator; only counts calls on this thread.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs() -> u64 {
    ALLOCS.with(Cell::get)
}

/// A vLLM stream with continuous usage, escaped text and a usage-only chunk, framed
/// as the backend sends it (chunked, one event per chunk).
fn upstream_stream() -> Vec<u8> {
    let mut body = Vec::new();
    for i in 0..256 {
        let ev = format!(
            "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"line {i}\\n\\\"q\\\" \\u00e9\"}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":{{\"prompt_tokens\":15,\"total_tokens\":{},\"completion_tokens\":{}}}}}\n\n",
            16 + i,
            i + 1
        );
        encode_chunk(&mut body, ev.as_bytes());
    }
    encode_chunk(&mut body, b"data: {\"id\":\"chatcmpl-1\",\"choices\":[],\"usage\":{\"prompt_tokens\":15,\"total_tokens\":271,\"completion_tokens\":256,\"prompt_tokens_details\":{\"cached_tokens\":8}}}\n\n");
    encode_chunk(&mut body, b"data: [DONE]\n\n");
    body.extend_from_slice(b"0\r\n\r\n");
    body
}

fn relay_once(r: &mut BodyRelay, mode: Mode, upstream: &[u8], out: &mut Vec<u8>) {
    r.start(
        mode,
        true,
        llmproxy::routes::StreamShape::Chat,
        llmproxy::routes::UsageAt::Usage,
    );
    let mut dec = BodyDecoder::new(Framing::Chunked);
    // Reads of an odd size, so events and chunk heads straddle them.
    for read in upstream.chunks(777) {
        out.clear();
        let mut rest = read;
        while !rest.is_empty() {
            // As the response path calls them: whole chunks handed out with their framing.
            let n = dec
                .decode_framed(rest, |span, whole| r.on_chunk(span, whole, out))
                .unwrap();
            rest = &rest[n..];
            if dec.is_done() {
                break;
            }
        }
    }
    r.finish(out);
    r.finish_metering();
    assert!(dec.is_done());
}

const STREAMS: u64 = 20;

#[test]
fn steady_state_relay_allocates_nothing_per_chunk() {
    let upstream = upstream_stream();
    for mode in [
        Mode::Sse(Edits {
            hide_usage_only: false,
            strip_chunk_usage: false,
            ..Edits::default()
        }),
        Mode::Sse(Edits {
            hide_usage_only: true,
            strip_chunk_usage: true,
            ..Edits::default()
        }),
        Mode::Sse(Edits {
            hide_usage_only: true,
            strip_chunk_usage: false,
            ..Edits::default()
        }),
        Mode::Sse(Edits {
            hide_usage_only: false,
            strip_chunk_usage: false,
            ..Edits::default()
        }),
        Mode::Sse(Edits {
            hide_usage_only: false,
            strip_chunk_usage: true,
            keep_final_usage: true,
            strip_timings: true,
        }),
        Mode::Json,
        Mode::Raw,
    ] {
        let mut r = BodyRelay::default();
        let mut out = Vec::with_capacity(64 * 1024);
        // Warm-up: buffers reach their size (the meter alternates two usage buffers).
        relay_once(&mut r, mode, &upstream, &mut out);
        relay_once(&mut r, mode, &upstream, &mut out);
        let before = allocs();
        for _ in 0..STREAMS {
            relay_once(&mut r, mode, &upstream, &mut out);
        }
        let n = allocs() - before;
        // Per chunk: nothing. Per stream: at most one small allocation, when the final
        // usage carries a nested `*_tokens_details` object (serde_json's nesting stack
        // while it skips the raw usage value).
        assert!(
            n <= STREAMS,
            "{mode:?}: {n} allocations over {STREAMS} streams of 258 chunks"
        );
        if let Mode::Sse(_) = mode {
            let (u, _) = r.meter.finish(true);
            assert_eq!(
                (u.prompt_tokens, u.completion_tokens, u.total_tokens),
                (15, 256, 271)
            );
        }
    }
}

/// Over TLS, the relayed chunks go through rustls as `Io` drives it (`writer`,
/// `write_tls` into a reused buffer; `read_tls`, `process_new_packets`, `reader`). Our
/// side reuses its buffers. rustls allocates one buffer per record each way: sending,
/// its record layer's `encrypt` returns an owned message (in its buffered and
/// unbuffered APIs alike); receiving, the buffered API copies each record's plaintext
/// into a queue of owned buffers (the unbuffered API would decrypt in place instead).
/// So a chunk costs at most one allocation per direction over TLS, each taking
/// the chunk the previous record freed, reused by the allocator; none over plain TCP.
#[test]
fn tls_costs_at_most_rustls_one_record_buffer_per_chunk_and_direction() {
    use std::io::{Read, Write};
    use std::sync::Arc;
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server_cfg = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let client_cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut server = rustls::ServerConnection::new(Arc::new(server_cfg)).unwrap();
    server.set_buffer_limit(None);
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut client = rustls::ClientConnection::new(Arc::new(client_cfg), name).unwrap();
    let mut wire = Vec::with_capacity(128 * 1024);
    let pump =
        |from: &mut dyn FnMut(&mut Vec<u8>), to: &mut dyn FnMut(&[u8]), wire: &mut Vec<u8>| {
            wire.clear();
            from(wire);
            to(wire);
        };
    while client.is_handshaking() || server.is_handshaking() {
        pump(
            &mut |w| {
                while client.wants_write() {
                    client.write_tls(w).unwrap();
                }
            },
            &mut |b| {
                let mut r = b;
                while !r.is_empty() {
                    server.read_tls(&mut r).unwrap();
                    server.process_new_packets().unwrap();
                }
            },
            &mut wire,
        );
        pump(
            &mut |w| {
                while server.wants_write() {
                    server.write_tls(w).unwrap();
                }
            },
            &mut |b| {
                let mut r = b;
                while !r.is_empty() {
                    client.read_tls(&mut r).unwrap();
                    client.process_new_packets().unwrap();
                }
            },
            &mut wire,
        );
    }
    // A stream's chunks as the relay writes them: one SSE event each.
    let upstream = upstream_stream();
    let chunks: Vec<&[u8]> = upstream.split_inclusive(|&b| b == b'\n').collect();
    let mut plain = vec![0u8; 64 * 1024];
    let sent = std::cell::Cell::new(0u64);
    let mut send = |chunk: &[u8], wire: &mut Vec<u8>| {
        let a = allocs();
        server.writer().write_all(chunk).unwrap();
        wire.clear();
        while server.wants_write() {
            server.write_tls(wire).unwrap();
        }
        sent.set(sent.get() + allocs() - a);
        let mut rd = &wire[..];
        while !rd.is_empty() {
            client.read_tls(&mut rd).unwrap();
            let st = client.process_new_packets().unwrap();
            let n = st.plaintext_bytes_to_read();
            client.reader().read_exact(&mut plain[..n]).unwrap();
        }
    };
    for c in &chunks {
        send(c, &mut wire); // warm-up
    }
    sent.set(0);
    let before = allocs();
    let rounds = 10;
    for _ in 0..rounds {
        for c in &chunks {
            send(c, &mut wire);
        }
    }
    let n = allocs() - before;
    let records = rounds * chunks.len() as u64;
    eprintln!(
        "TLS: {n} allocations for {records} chunks, {} of them sending",
        sent.get()
    );
    assert!(
        sent.get() <= records && n <= 2 * records,
        "{n} allocations for {records} chunks over TLS, {} sending (at most rustls's record buffer each way)",
        sent.get()
    );
}
