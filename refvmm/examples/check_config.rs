//! Parses a refvmm configuration (a file given as the argument, or a small
//! soft-TD one) and prints it with every default filled in, or the field
//! that is wrong.

use refvmm::config::Config;

fn main() {
    let result = match std::env::args().nth(1) {
        Some(path) => Config::load(std::path::Path::new(&path)),
        None => Config::parse(
            r#"{"accel": "soft", "tdx": {"enabled": true},
                "workload": {"kind": "dirty_log", "iterations": 2}}"#,
        ),
    };
    match result {
        Ok(config) => println!(
            "{}",
            serde_json::to_string_pretty(&config).expect("configs serialize")
        ),
        Err(err) => {
            eprintln!("{err}");
            std::process::exit(2);
        }
    }
}
