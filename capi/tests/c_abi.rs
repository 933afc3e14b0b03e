//! The C ABI from C: the test programs in `tests/c/` and the example in
//! `examples/` are compiled with `cc -std=c11 -Wall -Wextra -Werror` against
//! the committed header, linked statically and dynamically, and run (under
//! valgrind too when it is installed). Also: the committed header equals a
//! fresh cbindgen run, and every exported function is in it, documented.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The directory with the libmmukit.a and libmmukit.so built alongside this
/// test binary: its own `deps` directory. (Cargo copies a library up to the
/// profile directory only when it was asked to build it directly, so the copy
/// there can be missing or older than the sources under test.)
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().to_owned()
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A C program that skips prints `skip TEST: needs CAPABILITY ...` (having
/// asked `mmukit_host_has`): record it as the Rust tests record theirs.
fn record_c_skips(stdout: &str) {
    for line in stdout.lines() {
        let Some((test, rest)) = line
            .strip_prefix("skip ")
            .and_then(|line| line.split_once(": needs "))
        else {
            continue;
        };
        let name = rest.split([' ', ':']).next().unwrap_or_default();
        let cap = gmem::Capability::from_name(name)
            .unwrap_or_else(|| panic!("{test} skips for an unknown capability: {line}"));
        // `CAP (detail)` or `CAP: detail`.
        let detail = rest[name.len()..].trim_start_matches([' ', ':']);
        let detail = detail
            .strip_prefix('(')
            .and_then(|inner| inner.strip_suffix(')'))
            .unwrap_or(detail);
        gmem::caps::record_skip(&format!("C {test}"), cap, detail);
    }
}

fn compile_and_run(source: &Path) {
    let lib = lib_dir();
    let stat = lib.join("libmmukit.a");
    assert!(stat.exists(), "{} missing", stat.display());
    let stem = source.file_stem().unwrap().to_str().unwrap();
    let out_dir = std::env::temp_dir().join(format!("mmukit-capi-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir).unwrap();
    let include = root().join("include");
    let common = ["-std=c11", "-Wall", "-Wextra", "-Werror", "-g"];
    // The shared library's soname is libmmukit.so.MAJOR: the loader finds
    // it through a link next to the binaries.
    let soname = out_dir.join(format!("libmmukit.so.{}", env!("CARGO_PKG_VERSION_MAJOR")));
    let _ = std::fs::remove_file(&soname);
    std::os::unix::fs::symlink(lib.join("libmmukit.so"), &soname).unwrap();
    let static_bin = out_dir.join(format!("{stem}-static"));
    let dynamic_bin = out_dir.join(format!("{stem}-dynamic"));
    let status = Command::new("cc")
        .args(common)
        .arg("-I")
        .arg(&include)
        .arg(source)
        .arg(&stat)
        .args(["-lpthread", "-ldl", "-lm", "-lrt", "-lutil", "-o"])
        .arg(&static_bin)
        .status()
        .unwrap();
    assert!(status.success(), "static link of {stem}");
    let status = Command::new("cc")
        .args(common)
        .arg("-I")
        .arg(&include)
        .arg(source)
        .arg("-L")
        .arg(&lib)
        .arg(format!("-Wl,-rpath,{}", out_dir.display()))
        .args(["-lmmukit", "-o"])
        .arg(&dynamic_bin)
        .status()
        .unwrap();
    assert!(status.success(), "dynamic link of {stem}");
    for bin in [&static_bin, &dynamic_bin] {
        let out = Command::new(bin).output().unwrap();
        assert!(
            out.status.success(),
            "{}: {}{}",
            bin.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if bin == &static_bin {
            record_c_skips(&String::from_utf8_lossy(&out.stdout));
        }
    }
    if have("valgrind") {
        let out = Command::new("valgrind")
            .args([
                "--error-exitcode=99",
                "--leak-check=full",
                "--errors-for-leak-kinds=definite",
                "--quiet",
            ])
            .arg(&dynamic_bin)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "valgrind {stem}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        eprintln!("valgrind not installed: {stem} ran without it");
    }
}

#[test]
fn c_tests_and_the_example_pass_static_and_dynamic() {
    if !have("cc") {
        panic!("the C ABI tests need a C compiler (scripts/setup installs one)");
    }
    let mut sources: Vec<PathBuf> = std::fs::read_dir(root().join("capi/tests/c"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "c"))
        .collect();
    sources.push(root().join("capi/examples/hypervisor.c"));
    sources.sort();
    assert!(sources.len() >= 4);
    for source in &sources {
        compile_and_run(source);
    }
}

#[test]
fn the_header_compiles_as_c89_c11_and_cxx() {
    let dir = std::env::temp_dir().join(format!("mmukit-header-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let source = dir.join("use.c");
    std::fs::write(
        &source,
        "#include \"mmukit.h\"\n\
         int main(void) { const char *v = mmukit_version(); return v[0] == 0; }\n",
    )
    .unwrap();
    let include = root().join("include");
    let mut compilers: Vec<(&str, Vec<&str>)> = vec![
        ("cc", vec!["-std=c89", "-Wall", "-Wextra", "-Werror"]),
        (
            "cc",
            vec!["-std=c11", "-pedantic", "-Wall", "-Wextra", "-Werror"],
        ),
    ];
    if have("c++") {
        compilers.push((
            "c++",
            vec!["-x", "c++", "-std=c++11", "-Wall", "-Wextra", "-Werror"],
        ));
    } else {
        eprintln!("skip C++: no c++ compiler");
    }
    for (compiler, flags) in compilers {
        let out = Command::new(compiler)
            .args(&flags)
            .arg("-I")
            .arg(&include)
            .arg("-fsyntax-only")
            .arg(&source)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{compiler} {flags:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_library_installs_with_a_soname_and_pkg_config_builds_a_program() {
    if !have("pkg-config") {
        panic!("the install test needs pkg-config (scripts/setup installs it)");
    }
    let prefix = std::env::temp_dir().join(format!("mmukit-prefix-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&prefix);
    let status = Command::new(root().join("scripts/install-capi"))
        .arg(&prefix)
        .env("MMUKIT_CAPI_LIB_DIR", lib_dir())
        .status()
        .unwrap();
    assert!(status.success(), "scripts/install-capi");
    let version = env!("CARGO_PKG_VERSION");
    let major = env!("CARGO_PKG_VERSION_MAJOR");
    let lib = prefix.join("lib");
    assert!(lib.join(format!("libmmukit.so.{version}")).is_file());
    assert_eq!(
        std::fs::read_link(lib.join(format!("libmmukit.so.{major}"))).unwrap(),
        PathBuf::from(format!("libmmukit.so.{version}"))
    );
    if have("readelf") {
        let out = Command::new("readelf")
            .arg("-d")
            .arg(lib.join(format!("libmmukit.so.{version}")))
            .output()
            .unwrap();
        let dynamic = String::from_utf8_lossy(&out.stdout);
        assert!(
            dynamic.contains(&format!("[libmmukit.so.{major}]")),
            "no soname libmmukit.so.{major}: {dynamic}"
        );
    }
    let pc_path = lib.join("pkgconfig");
    let flags = Command::new("pkg-config")
        .args(["--cflags", "--libs", "mmukit"])
        .env("PKG_CONFIG_PATH", &pc_path)
        .output()
        .unwrap();
    assert!(
        flags.status.success(),
        "{}",
        String::from_utf8_lossy(&flags.stderr)
    );
    let flags = String::from_utf8(flags.stdout).unwrap();
    let modversion = Command::new("pkg-config")
        .args(["--modversion", "mmukit"])
        .env("PKG_CONFIG_PATH", &pc_path)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&modversion.stdout).trim(), version);
    let source = prefix.join("hello.c");
    std::fs::write(
        &source,
        "#include <stdio.h>\n#include <string.h>\n#include <mmukit.h>\n\
         int main(void) {\n\
             struct mmukit_cache_config config = {sizeof config, 0, true, 0, NULL};\n\
             struct mmukit_cache *cache = NULL;\n\
             if (mmukit_cache_new(&config, &cache) != 0) return 1;\n\
             if (mmukit_cache_topup(cache, 1) != 0) return 2;\n\
             mmukit_cache_destroy(cache);\n\
             puts(mmukit_version());\n\
             return strcmp(mmukit_version(), \"0\") <= 0;\n\
         }\n",
    )
    .unwrap();
    let program = prefix.join("hello");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cc -std=c11 -Wall -Wextra -Werror {} -o {} {flags}",
            source.display(),
            program.display()
        ))
        .status()
        .unwrap();
    assert!(status.success(), "building with pkg-config's flags");
    let out = Command::new(&program)
        .env("LD_LIBRARY_PATH", &lib)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), version);
    let _ = std::fs::remove_dir_all(&prefix);
}

#[test]
fn the_committed_header_is_fresh() {
    let fresh = include_str!(concat!(env!("OUT_DIR"), "/mmukit.h"));
    let committed = std::fs::read_to_string(root().join("include/mmukit.h")).unwrap();
    assert!(
        fresh == committed,
        "include/mmukit.h is stale: run `MMUKIT_WRITE_HEADER=1 cargo build -p mmukit-capi` and commit it"
    );
}

#[test]
fn every_export_is_in_the_header_and_documented() {
    let header = std::fs::read_to_string(root().join("include/mmukit.h")).unwrap();
    let mut exports = 0;
    for entry in std::fs::read_dir(root().join("capi/src")).unwrap() {
        let path = entry.unwrap().path();
        let source = std::fs::read_to_string(&path).unwrap();
        exports += check_exports(&source, &header);
    }
    assert!(exports >= 25, "only {exports} exports found");
}

/// Checks the exports of one source file against the header; returns how
/// many there are.
fn check_exports(source: &str, header: &str) -> usize {
    let lines: Vec<&str> = source.lines().collect();
    let mut exports = 0;
    for (i, line) in lines.iter().enumerate() {
        let Some(rest) = line
            .trim_start()
            .strip_prefix("pub unsafe extern \"C\" fn ")
            .or_else(|| line.trim_start().strip_prefix("pub extern \"C\" fn "))
        else {
            continue;
        };
        let name = rest.split('(').next().unwrap();
        exports += 1;
        assert!(name.starts_with("mmukit_"), "{name} lacks the prefix");
        assert!(
            header.contains(&format!("{name}(")),
            "{name} is not in the header"
        );
        assert_eq!(lines[i - 1].trim(), "#[unsafe(no_mangle)]", "{name}");
        assert!(
            lines[..i - 1]
                .iter()
                .rev()
                .take_while(|l| l.trim_start().starts_with("///"))
                .count()
                > 0,
            "{name} has no documentation"
        );
        let documented = header
            .split(&format!("{name}("))
            .next()
            .unwrap()
            .lines()
            .rev()
            .nth(1)
            .is_some_and(|l| l.trim_start().starts_with("*/"));
        assert!(documented, "{name} has no comment in the header");
    }
    exports
}
