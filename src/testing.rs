//! Test helpers shared by the unit tests of the pure modules.

/// `input` cut at `cuts` (clamped, in any order): the pieces a reader would see.
pub fn pieces<'a>(input: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut bounds: Vec<usize> = cuts.iter().map(|&c| c.min(input.len())).collect();
    bounds.sort_unstable();
    bounds.push(input.len());
    let mut prev = 0;
    bounds
        .into_iter()
        .map(|c| {
            let piece = &input[prev..c];
            prev = c;
            piece
        })
        .collect()
}

/// Removes this process's scratch directories (`llmproxy-*-<pid>*` in the temp dir)
/// when the test process exits, passed or failed; call it wherever one is made.
pub fn clean_at_exit() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    extern "C" fn clean() {
        let pid = std::process::id().to_string();
        let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            let ours = name.starts_with("llmproxy-") && name.split('-').any(|part| part == pid);
            if ours {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    // SAFETY: registers a plain extern "C" function with no captured state.
    ONCE.call_once(|| unsafe {
        libc::atexit(clean);
    });
}
