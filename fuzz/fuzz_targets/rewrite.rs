//! The stream_options rewrite: for any body the proxy accepts, the rewritten body is
//! valid JSON equal to the input plus `stream_options.include_usage: true`. And the
//! request scan takes only bodies serde reads the same way.
#![no_main]
use libfuzzer_sys::fuzz_target;
use llmproxy::config::UsageMode;
use llmproxy::relay::rewrite::{check_scan_against_serde, inspect, rewrite};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    check_scan_against_serde(data);
    let Ok(info) = inspect(data, true) else { return };
    let Some(out) = rewrite(data, &info, UsageMode::Final) else { return };
    // JSON numbers have no range limit but serde_json's Value does (`1E2666...`): the
    // equality below is checked for inputs a Value can hold.
    let Ok(mut want) = serde_json::from_slice::<Value>(data) else { return };
    let got: Value = serde_json::from_slice(&out).expect("rewrite produced invalid JSON");
    let obj = want.as_object_mut().expect("accepted bodies are objects");
    let mut opts = match obj.remove("stream_options") {
        Some(Value::Object(o)) => o,
        _ => Default::default(),
    };
    opts.insert("include_usage".into(), Value::Bool(true));
    obj.insert("stream_options".into(), Value::Object(opts));
    assert_eq!(got, want);
});
