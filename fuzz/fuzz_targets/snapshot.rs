//! The snapshot decoder on arbitrary bytes: refused cleanly, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let dir = std::path::Path::new("/nonexistent-snapshot-dir");
    if let Ok(snapshot) = refvmm::snapshot::decode(&text, dir) {
        assert_eq!(snapshot.format_version, refvmm::snapshot::FORMAT_VERSION);
    }
});
