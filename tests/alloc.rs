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
            let n = dec.decode(rest, |span| r.on_span(span, out)).unwrap();
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
