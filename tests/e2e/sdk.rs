//! The official `openai` Python SDK against the proxy: chat, completions and
//! embeddings, streamed and not, each producing exactly one correct record.
//!
//! Needs Python with `openai` installed: `scripts/test.sh` sets that up and points
//! LLMPROXY_TEST_PYTHON at it. Without it this test fails, saying how to fix it.

use crate::harness::*;
use std::process::Command;

#[test]
fn openai_sdk_does_not_notice_the_proxy() {
    let python = python();
    let probe = Command::new(&python).args(["-c", "import openai"]).output();
    assert!(
        probe.as_ref().is_ok_and(|o| o.status.success()),
        "the openai Python SDK is not importable with {python}: run scripts/test.sh, or `pip install openai` and set LLMPROXY_TEST_PYTHON"
    );
    let s = Stack::with(
        "auth:\n  enabled: true\n  keys:\n    - key: sk-sdk-test-key-0123456789\n      user_id: sdk-user\n",
        &[],
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk_client.py");
    let out = Command::new(&python)
        .arg(script)
        .arg(format!("http://{}/v1", s.addr()))
        .arg("sk-sdk-test-key-0123456789")
        .arg("mock-model")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "SDK script failed:\n{}\n{}\nproxy:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        s.proxy.output()
    );
    let expect = [
        ("sdk-chat", 5, 4, false, "/v1/chat/completions"),
        ("sdk-chat-stream", 5, 3, true, "/v1/chat/completions"),
        ("sdk-chat-stream-usage", 5, 2, true, "/v1/chat/completions"),
        ("sdk-completion", 3, 2, false, "/v1/completions"),
        ("sdk-completion-stream", 3, 5, true, "/v1/completions"),
        ("sdk-embedding", 3, 0, false, "/v1/embeddings"),
        ("sdk-responses", 3, 3, false, "/v1/responses"),
        ("sdk-responses-stream", 3, 4, true, "/v1/responses"),
        ("sdk-transcription", 0, 0, false, "/v1/audio/transcriptions"),
    ];
    let records = s.records(expect.len());
    assert_eq!(records.len(), expect.len(), "{records:?}");
    for (id, prompt, completion, stream, endpoint) in expect {
        let r = s.record(id);
        assert_eq!(r["prompt_tokens"], prompt, "{id}: {r}");
        assert_eq!(r["completion_tokens"], completion, "{id}: {r}");
        assert_eq!(r["total_tokens"], prompt + completion, "{id}: {r}");
        assert_eq!(r["is_stream"], stream, "{id}");
        assert_eq!(r["endpoint"], endpoint, "{id}");
        assert_eq!(r["user_id"], "sdk-user");
        assert_eq!(r["outcome"], "completed");
        assert_eq!(r["usage_source"], "backend");
    }
    assert_eq!(
        s.record("sdk-transcription")["usage_details"]["seconds"],
        2,
        "audio billed in the seconds the backend reported"
    );
    assert_eq!(
        raw_posts(&s.receiver).len(),
        expect.len(),
        "a record was delivered twice"
    );
}

#[test]
fn anthropic_sdk_does_not_notice_the_proxy() {
    let python = python();
    let probe = Command::new(&python)
        .args(["-c", "import anthropic"])
        .output();
    assert!(
        probe.as_ref().is_ok_and(|o| o.status.success()),
        "the anthropic Python SDK is not importable with {python}: run scripts/test.sh, or `pip install anthropic` and set LLMPROXY_TEST_PYTHON"
    );
    let s = Stack::with(
        "auth:\n  enabled: true\n  keys:\n    - key: sk-sdk-anthropic-0123456789\n      user_id: claude-user\n",
        &[],
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk_anthropic.py");
    let out = Command::new(&python)
        .arg(script)
        .arg(format!("http://{}", s.addr()))
        .arg("sk-sdk-anthropic-0123456789")
        .arg("mock-model")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "Anthropic SDK script failed:\n{}\n{}\nproxy:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        s.proxy.output()
    );
    for (id, prompt, completion, stream) in [
        ("sdk-messages", 5, 4, false),
        ("sdk-messages-stream", 5, 3, true),
        ("sdk-messages-raw-stream", 5, 2, true),
    ] {
        let r = s.record(id);
        assert_eq!(
            (r["prompt_tokens"].as_u64(), r["completion_tokens"].as_u64()),
            (Some(prompt), Some(completion)),
            "{id}: {r}"
        );
        assert_eq!(r["is_stream"], stream);
        assert_eq!(r["endpoint"], "/v1/messages");
        assert_eq!(r["user_id"], "claude-user");
        assert_eq!(r["usage_source"], "backend");
    }
    let r = s.record("sdk-count-tokens");
    assert_eq!(r["endpoint"], "/v1/messages/count_tokens");
    assert_eq!(r["usage_source"], "none");
}
