//! Generates `mmukit.h` from the crate with cbindgen into OUT_DIR; with
//! `MMUKIT_WRITE_HEADER=1` also writes `include/mmukit.h` (the committed
//! copy, which a test compares against the fresh one).

use std::path::PathBuf;

fn main() {
    let crate_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo")).join("mmukit.h");
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    println!("cargo:rerun-if-env-changed=MMUKIT_WRITE_HEADER");
    // The shared library's soname carries the major version: the ABI only
    // grows within it (see the header's ABI policy).
    let major = std::env::var("CARGO_PKG_VERSION_MAJOR").expect("set by cargo");
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libmmukit.so.{major}");
    let config = cbindgen::Config::from_root_or_default(&crate_dir);
    // The sources alone, from lib.rs and the modules it declares (no
    // `cargo metadata`, which a packaged crate whose mmukit dependencies are
    // not yet on a registry cannot run): every type the header shows is
    // defined in this crate.
    let builder = cbindgen::Builder::new()
        .with_config(config)
        .with_src(crate_dir.join("src/lib.rs"));
    let bindings = builder.generate().expect("cbindgen generates the header");
    let mut text = Vec::new();
    bindings.write(&mut text);
    let text = c89_comments(&String::from_utf8(text).expect("cbindgen writes UTF-8"));
    std::fs::write(&out, &text).expect("writing the header into OUT_DIR");
    if std::env::var_os("MMUKIT_WRITE_HEADER").is_some_and(|v| v == "1") {
        std::fs::write(crate_dir.join("../include/mmukit.h"), &text)
            .expect("writing include/mmukit.h");
    }
}

/// cbindgen's C++ guards carry `//` comments, which C89 does not have.
fn c89_comments(header: &str) -> String {
    header
        .lines()
        .map(|line| match line.split_once("// ") {
            Some((code, comment)) if !code.trim().is_empty() => {
                format!("{}/* {} */", code, comment.trim_end())
            }
            _ => line.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}
