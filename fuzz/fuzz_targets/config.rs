//! The refvmm configuration parser on arbitrary text: never a panic, and
//! every error names a field (or says where the JSON broke).
#![no_main]

use libfuzzer_sys::fuzz_target;
use refvmm::config::{Config, ConfigError};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text) {
        Ok(config) => {
            // A parsed config prints and parses back to itself.
            let printed = serde_json_roundtrip(&config);
            assert_eq!(Config::parse(&printed).unwrap(), config);
        }
        Err(ConfigError::Invalid {
            field,
            message,
            file,
        }) => {
            assert!(!field.is_empty() && !message.is_empty());
            assert!(file.is_none(), "text parsed directly names no file");
        }
        Err(ConfigError::Parse { message, .. }) => assert!(!message.is_empty()),
        Err(ConfigError::Read { .. }) => unreachable!("no file is read"),
    }
});

fn serde_json_roundtrip(config: &Config) -> String {
    serde_json::to_string(config).unwrap()
}
