//! refvmm end to end: the examples run and report what they should, bad
//! configurations exit 2 naming the problem and leave nothing behind, a
//! signal stops a run cleanly, and snapshot + restore print what one
//! uninterrupted run prints.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use gmem::{Capability, HostCaps};
use refvmm::config::BackendName;

fn refvmm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_refvmm"))
}

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name)
}

fn run(args: &[&str]) -> Output {
    refvmm().args(args).output().expect("refvmm runs")
}

fn json_report(config: &Path) -> serde_json::Value {
    let out = run(&["--config", config.to_str().unwrap(), "--report", "json"]);
    assert!(
        out.status.success(),
        "{}: {}",
        config.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

/// Whether the host has every capability `needs` lists; otherwise the
/// skip of `test` is reported, naming the missing one.
fn host_allows(test: &str, needs: &[Capability]) -> bool {
    HostCaps::get().allows(test, needs)
}

/// Whether `pages` 2 MiB HugeTLB pages are free now; otherwise the skip of
/// `test` is reported.
fn free_2m(test: &str, pages: u64) -> bool {
    gmem::caps::hugetlb_pages_free(test, 2 << 20, pages)
}

fn free_2m_pages() -> u64 {
    gmem::HostCaps::probe()
        .pool(2 << 20)
        .map_or(0, |pool| pool.available)
}

fn write_config(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("refvmm-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn hello_prints_its_line_on_anonymous_and_guest_memfd_memory() {
    let test = "hello_prints_its_line_on_anonymous_and_guest_memfd_memory";
    if !host_allows(test, &[Capability::Kvm]) {
        return;
    }
    for (name, needs) in [
        ("hello.json", &[][..]),
        ("hello-guest-memfd.json", &[Capability::GuestMemfdMmap][..]),
    ] {
        if !host_allows(&format!("{test} ({name})"), needs) {
            // Refused before anything runs, naming the field and the
            // capability.
            let out = run(&["--config", example(name).to_str().unwrap()]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
            assert!(
                stderr.contains("memory.backend: needs guest_memfd_mmap"),
                "{stderr}"
            );
            assert!(out.stdout.is_empty(), "no guest ran: {:?}", out.stdout);
            continue;
        }
        let out = run(&["--config", example(name).to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.starts_with("Hello from mmukit guest\n"), "{stdout}");
        let report = json_report(&example(name));
        assert_eq!(report["exit"], "halted");
        assert_eq!(report["serial_bytes"], 24);
    }
}

#[test]
fn dirty_log_on_kvm_verifies_every_iteration() {
    if !host_allows(
        "dirty_log_on_kvm_verifies_every_iteration",
        &[Capability::Kvm],
    ) {
        return;
    }
    if !free_2m("dirty_log_on_kvm_verifies_every_iteration", 16) {
        return;
    }
    let report = json_report(&example("dirty-log-hugetlb.json"));
    let iterations = report["iterations"].as_array().unwrap();
    assert_eq!(iterations.len(), 3);
    for it in iterations {
        assert!(it["dirty_pages"].as_u64().unwrap() >= 2 * 1024);
    }
    assert!(report["prefault_gib_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn soft_dirty_log_splits_eagerly_or_lazily_and_runs_tdx() {
    // The three examples use 256 + 256 + 128 MiB of HugeTLB memory, one at
    // a time.
    if !free_2m("soft_dirty_log_splits_eagerly_or_lazily_and_runs_tdx", 128) {
        return;
    }
    let eager = json_report(&example("dirty-log-soft-eager.json"));
    assert_eq!(eager["iterations"].as_array().unwrap().len(), 3);
    assert!(eager["pages_before_enable"]["2m"].as_u64().unwrap() > 0);
    assert_eq!(eager["pages_after_enable"]["2m"], 0);
    assert_eq!(eager["pages_after_enable"]["1g"], 0);
    assert_eq!(eager["cache"]["fallback_allocations"], 0);
    assert!(eager["splits"]["eager"].as_u64().unwrap() > 0);
    assert_eq!(eager["splits"]["fallbacks"], 0);
    let lazy = json_report(&example("dirty-log-soft-lazy.json"));
    assert!(lazy["pages_after_enable"]["2m"].as_u64().unwrap() > 0);
    assert!(lazy["splits"]["lazy"].as_u64().unwrap() > 0);
    assert_eq!(lazy["splits"]["eager"], 0);
    let tdx = json_report(&example("soft-tdx.json"));
    assert!(tdx["tdx"]["seamcalls"].as_u64().unwrap() > 0);
    assert_eq!(
        tdx["pages_after_enable"]["2m"], 0,
        "demoted for dirty logging"
    );
}

/// The soft MMU's shared leaves follow the host's pages, as KVM's
/// `host_pfn_mapping_level` bounds a leaf by the host page table: 2M over
/// transparent huge pages, 4K (and nothing for eager splitting) otherwise.
#[test]
fn the_soft_mmu_maps_ordinary_memory_with_the_hosts_page_size() {
    for backend in ["anonymous", "memfd"] {
        let config = write_config(
            &format!("host-pages-{backend}.json"),
            &format!(
                r#"{{"vcpus": 1, "accel": "soft", "memory": {{"size_mib": 32, "backend": "{backend}"}},
                    "mmu": {{"eager_split": true}},
                    "workload": {{"kind": "dirty_log", "iterations": 1, "bytes_per_vcpu_mib": 16}}}}"#
            ),
        );
        let report = json_report(&config);
        let before = &report["pages_before_enable"];
        if report["transparent_huge_pages"] == true {
            // 16 MiB of 2 MiB transparent huge pages: 2 MiB leaves.
            assert!(before["2m"].as_u64().unwrap() > 0, "{backend}: {report}");
        } else {
            // 4 KiB pages on the host: 4 KiB leaves only, nothing to split.
            assert_eq!(before["2m"], 0, "{backend}: {report}");
            assert_eq!(before["4k"], 16 * 256, "{backend}: {report}");
            assert_eq!(report["splits"]["eager"], 0, "{backend}: {report}");
        }
        assert_eq!(before["1g"], 0, "{backend}: {report}");
    }
}

/// Anonymous memory of a VM with no private pages is private anonymous
/// memory: on a host in the stock `madvise` mode it gets transparent huge
/// pages, and the report says what the kernel gave (read back from smaps).
#[test]
fn default_memory_gets_huge_pages_under_the_hosts_default_thp_mode() {
    let config = write_config(
        "default-memory-pages.json",
        r#"{"vcpus": 1, "accel": "soft", "memory": {"size_mib": 32, "prefault": true},
            "workload": {"kind": "dirty_log", "iterations": 1, "bytes_per_vcpu_mib": 16}}"#,
    );
    let report = json_report(&config);
    let pages = &report["memory_pages"];
    assert_eq!(pages["form"], "private anonymous", "{report}");
    assert_eq!(pages["resident_bytes"], 32 << 20, "{report}");
    if !host_allows(
        "default_memory_gets_huge_pages_under_the_hosts_default_thp_mode",
        &[Capability::AnonymousThp],
    ) {
        return;
    }
    assert_eq!(report["transparent_huge_pages"], true, "{report}");
    // Prefaulted into 2 MiB pages, then the 16 MiB the vCPU writes was
    // split for dirty logging in the MMU only: the host keeps its huge pages.
    assert!(
        pages["huge_page_bytes"].as_u64().unwrap() >= 16 << 20,
        "{report}"
    );
    assert!(report["pages_before_enable"]["2m"].as_u64().unwrap() > 0);
    // Memory that may hold private pages stays shared anonymous memory.
    let convert = write_config(
        "convert-anonymous.json",
        r#"{"vcpus": 1, "accel": "soft",
            "memory": {"size_mib": 8, "backend": "anonymous", "private_backend": "memfd"},
            "workload": {"kind": "convert", "rounds": 1, "huge_pages_per_vcpu": 2}}"#,
    );
    let convert = json_report(&convert);
    assert_eq!(
        convert["memory_pages"]["form"], "shared anonymous",
        "{convert}"
    );
}

#[test]
fn manual_protect_on_kvm_clears_and_catches_every_write() {
    if !host_allows(
        "manual_protect_on_kvm_clears_and_catches_every_write",
        &[Capability::Kvm, Capability::ManualDirtyLogProtect],
    ) {
        return;
    }
    let config = write_config(
        "manual-kvm.json",
        r#"{"vcpus": 2, "accel": "kvm", "memory": {"size_mib": 16},
            "mmu": {"manual_protect": true},
            "workload": {"kind": "dirty_log", "iterations": 3, "bytes_per_vcpu_mib": 2,
                         "write_percent": 50}}"#,
    );
    let out = run(&["--config", config.to_str().unwrap(), "--report", "json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let iterations = report["iterations"].as_array().unwrap();
    assert_eq!(iterations.len(), 3);
    // refvmm checks every written page is in each pass's log (after the
    // previous pass cleared and re-protected them); half the pages of each
    // 2 MiB share are written.
    for it in iterations {
        assert!(it["clear_dirty_log_s"].as_f64().unwrap() > 0.0);
        assert!(it["dirty_pages"].as_u64().unwrap() >= 2 * 256);
    }
    // Cleared pages that were only read stay clean: a later pass logs the
    // written half, not all of memory (initially-set bits were cleared).
    let last = iterations[2]["dirty_pages"].as_u64().unwrap();
    assert!(last < 16 * 256, "{last} dirty pages of 4096");
}

#[test]
fn manual_protect_and_partial_writes_are_verified_too() {
    let config = write_config(
        "manual.json",
        r#"{"vcpus": 2, "accel": "soft", "memory": {"size_mib": 64},
            "mmu": {"manual_protect": true},
            "workload": {"kind": "dirty_log", "iterations": 2, "bytes_per_vcpu_mib": 8,
                         "write_percent": 50}}"#,
    );
    let report = json_report(&config);
    let iterations = report["iterations"].as_array().unwrap();
    assert!(iterations[1]["clear_dirty_log_s"].as_f64().unwrap() > 0.0);
    // Half the pages of 2 x 8 MiB are written each pass.
    assert!(iterations[1]["dirty_pages"].as_u64().unwrap() >= 2048);
}

#[test]
fn bad_configs_exit_2_naming_the_problem_and_leave_nothing_behind() {
    let free_before = free_2m_pages();
    let cases = [
        (r#"{"vcpus": 1, "colour": "red"}"#, "colour"),
        (r#"{"memory": {"size_mib": 0}}"#, "memory.size_mib"),
        (
            r#"{"memory": {"size_mib": 3, "backend": "hugetlb"}}"#,
            "memory.size_mib",
        ),
        (r#"{"tdx": {"enabled": true}}"#, "tdx.enabled"),
        (r#"{"memory": {"backend": "secret"}}"#, "memory.backend"),
        (r#"{"accel": "soft"}"#, "workload.kind"),
        (
            r#"{"workload": {"kind": "binary", "path": "/no/such/file", "load_gpa": 4096, "entry_gpa": 4096}}"#,
            "workload.path",
        ),
        (
            r#"{"memory": {"size_mib": 1048576, "backend": "hugetlb", "huge_page_size": "2M"}, "accel": "soft", "workload": {"kind": "dirty_log"}}"#,
            "hugepages-2048kB",
        ),
    ];
    for (i, (text, needle)) in cases.into_iter().enumerate() {
        let path = write_config(&format!("bad{i}.json"), text);
        let out = run(&["--config", path.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}: {stderr}");
        assert!(stderr.contains(needle), "{text}: {stderr}");
    }
    // Other tests may hold pages for a moment; ours must all come back.
    let deadline = Instant::now() + Duration::from_secs(20);
    while free_2m_pages() < free_before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        free_2m_pages() >= free_before,
        "no huge pages kept reserved"
    );
    let out = run(&["--config", "/no/such/config.json"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn print_config_fills_every_default_and_check_host_answers() {
    let out = run(&["--print-config", example("hello.json").to_str().unwrap()]);
    assert!(out.status.success());
    let config: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(config["memory"]["prefault_threads"], 2);
    assert_eq!(config["mmu"]["cache_capacity"], 40);
    assert_eq!(config["tdx"]["pamt_policy"], "on_install");
    let out = run(&["--check-host"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for line in ["kvm:", "hugetlb", "memfd_secret:"] {
        assert!(text.contains(line), "{text}");
    }
}

/// Starts refvmm on `config`, sends SIGTERM after half a second, and
/// returns its output once it has stopped (promptly).
fn run_then_sigterm(config: &Path, extra: &[&str]) -> Output {
    let child = refvmm()
        .args(["--config", config.to_str().unwrap()])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: signals our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let start = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "it stopped promptly"
    );
    out
}

#[test]
fn sigterm_stops_a_run_cleanly() {
    let config = write_config(
        "long.json",
        r#"{"vcpus": 2, "accel": "soft", "memory": {"size_mib": 64},
            "workload": {"kind": "dirty_log", "iterations": 1000, "bytes_per_vcpu_mib": 16}}"#,
    );
    let out = run_then_sigterm(&config, &[]);
    assert_eq!(
        out.status.code(),
        Some(130),
        "a stopped run is not a success"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("stopped by a signal"));
    // With a JSON report, the report still comes, and says so.
    let out = run_then_sigterm(&config, &["--report", "json"]);
    assert_eq!(out.status.code(), Some(130));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON report");
    assert_eq!(report["interrupted"], true);
    assert_eq!(report["exit"], "stopped by a signal");
    assert_eq!(report["workload"], "dirty_log");
}

#[test]
fn snapshot_then_restore_prints_what_one_run_prints() {
    if !host_allows(
        "snapshot_then_restore_prints_what_one_run_prints",
        &[Capability::Kvm],
    ) {
        return;
    }
    let config = example("counter.json");
    let whole = run(&["--config", config.to_str().unwrap(), "--report", "json"]);
    assert!(whole.status.success());
    let dir = std::env::temp_dir().join(format!("refvmm-snap-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let first = run(&[
        "--config",
        config.to_str().unwrap(),
        "--snapshot",
        dir.to_str().unwrap(),
        "--report",
        "json",
    ]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let second = run(&["--restore", dir.to_str().unwrap(), "--report", "json"]);
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    // With --report json the serial output is on stderr.
    let joined = [first.stderr.clone(), second.stderr.clone()].concat();
    assert_eq!(
        String::from_utf8_lossy(&joined),
        String::from_utf8_lossy(&whole.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&whole.stderr),
        "0\n1\n2\n3\n4\n5\n6\n7\n8\n9\n"
    );
    // A damaged snapshot is refused.
    let memory = dir.join("memory.bin");
    let mut bytes = std::fs::read(&memory).unwrap();
    bytes[0x1000] ^= 0xff;
    std::fs::write(&memory, bytes).unwrap();
    let damaged = run(&["--restore", dir.to_str().unwrap()]);
    assert_eq!(damaged.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&damaged.stderr).contains("checksum"));
    // A snapshot is not overwritten unless asked: refused before the guest
    // runs, the old files untouched.
    let state = std::fs::read(dir.join("snapshot.json")).unwrap();
    let again = [
        "--config",
        config.to_str().unwrap(),
        "--snapshot",
        dir.to_str().unwrap(),
    ];
    let refused = run(&again);
    assert_eq!(refused.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--overwrite"), "{stderr}");
    assert!(refused.stdout.is_empty(), "no guest ran");
    assert_eq!(std::fs::read(dir.join("snapshot.json")).unwrap(), state);
    let replaced = run(&[&again[..], &["--overwrite"]].concat());
    assert!(replaced.status.success());
    let restored = run(&["--restore", dir.to_str().unwrap(), "--report", "json"]);
    assert!(restored.status.success(), "the new snapshot is whole");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_flat_binary_runs_in_real_and_long_mode() {
    if !host_allows(
        "a_flat_binary_runs_in_real_and_long_mode",
        &[Capability::Kvm],
    ) {
        return;
    }
    // Real mode: out 0x3f8 'R'; hlt.
    let real = write_config("real.bin", "");
    std::fs::write(&real, [0xba, 0xf8, 0x03, 0xb0, b'R', 0xee, 0xf4]).unwrap();
    // Long mode: mov dx, 0x3f8; mov al, 'L'; out dx, al; mov dx, 0x501; out dx, al.
    let long = write_config("long.bin", "");
    std::fs::write(
        &long,
        [
            0x66, 0xba, 0xf8, 0x03, 0xb0, b'L', 0xee, 0x66, 0xba, 0x01, 0x05, 0xee,
        ],
    )
    .unwrap();
    for (binary, mode, expected, exit) in [
        (&real, "real", "R", "halted"),
        (&long, "long", "L", "shutdown port"),
    ] {
        let config = write_config(
            &format!("{mode}.json"),
            &format!(
                r#"{{"vcpus": 1, "memory": {{"size_mib": 4}}, "workload": {{"kind": "binary",
                    "path": "{}", "load_gpa": 65536, "entry_gpa": 65536, "mode": "{mode}"}}}}"#,
                binary.display()
            ),
        );
        let out = run(&["--config", config.to_str().unwrap(), "--report", "json"]);
        assert!(
            out.status.success(),
            "{mode}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stderr), expected);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["exit"], exit);
    }
}

#[test]
fn sigterm_kicks_a_spinning_kvm_guest_out_and_stops_cleanly() {
    if !host_allows(
        "sigterm_kicks_a_spinning_kvm_guest_out_and_stops_cleanly",
        &[Capability::Kvm],
    ) {
        return;
    }
    // Real mode: jmp $ (the guest never exits on its own).
    let binary = write_config("spin.bin", "");
    std::fs::write(&binary, [0xeb, 0xfe]).unwrap();
    let config = write_config(
        "spin.json",
        &format!(
            r#"{{"vcpus": 1, "memory": {{"size_mib": 4}}, "workload": {{"kind": "binary",
                "path": "{}", "load_gpa": 4096, "entry_gpa": 4096}}}}"#,
            binary.display()
        ),
    );
    let out = run_then_sigterm(&config, &[]);
    assert_eq!(out.status.code(), Some(130));
    assert!(String::from_utf8_lossy(&out.stdout).contains("stopped by a signal"));
}

#[test]
fn convert_moves_a_soft_td_and_its_hugetlb_file_together() {
    if !free_2m("convert_moves_a_soft_td_and_its_hugetlb_file_together", 8) {
        return;
    }
    let report = json_report(&example("convert-td-hugetlb.json"));
    let convert = &report["convert"];
    assert_eq!(report["workload"], "convert");
    assert_eq!(convert["vm_type"], "td");
    assert_eq!(convert["private_backend"], "hugetlb");
    // 2 vCPUs x 4 rounds: a 4 KiB page and a whole 2 MiB page, each way.
    assert_eq!(convert["conversions"], 32);
    assert_eq!(convert["conversions_4k"], 16);
    // Each 4 KiB page made shared is then touched as private: an exit.
    assert_eq!(convert["memory_fault_exits"], 8);
    // Only the first 4 KiB conversion in each vCPU's first 2 MiB page finds
    // a 2M private leaf to demote; a TD never promotes it back.
    assert_eq!(convert["demotes"], 2);
    assert_eq!(convert["pages_before"]["2m"], 4);
    assert_eq!(convert["pages_after"]["4k"], 1024);
    assert_eq!(convert["hugetlb_splits"], 8);
    assert_eq!(convert["hugetlb_merges"], 8);
    assert!(convert["pamt_pages"].as_u64().unwrap() > 0);
    assert!(convert["pages_checked"].as_u64().unwrap() > 16_000);
}

#[test]
fn convert_runs_a_software_protected_vm_on_every_plain_backend() {
    for (backend, needs) in [
        ("memfd", &[][..]),
        ("anonymous", &[][..]),
        ("secret", &[Capability::MemfdSecret][..]),
    ] {
        let test =
            format!("convert_runs_a_software_protected_vm_on_every_plain_backend ({backend})");
        if !host_allows(&test, needs) {
            continue;
        }
        let config = write_config(
            &format!("convert-{backend}.json"),
            &format!(
                r#"{{ "vcpus": 2, "accel": "soft",
                     "memory": {{ "size_mib": 8, "backend": "memfd", "private_backend": "{backend}" }},
                     "workload": {{ "kind": "convert", "rounds": 2 }} }}"#
            ),
        );
        let report = json_report(&config);
        let convert = &report["convert"];
        assert_eq!(convert["vm_type"], "software_protected", "{backend}");
        assert_eq!(convert["conversions"], 16, "{backend}");
        // Its faults take their kind from the attributes: no exits.
        assert_eq!(convert["memory_fault_exits"], 0, "{backend}");
        assert_eq!(convert["demotes"], 0, "{backend}");
    }
}

#[test]
fn convert_configs_that_cannot_work_exit_2_naming_the_field() {
    for (text, field) in [
        (
            r#"{"accel":"soft","workload":{"kind":"convert"}}"#,
            "memory.private_backend",
        ),
        (
            r#"{"accel":"kvm","memory":{"private_backend":"memfd"},"workload":{"kind":"convert"}}"#,
            "memory.private_backend",
        ),
        (
            r#"{"accel":"soft","memory":{"private_backend":"guest_memfd"},"workload":{"kind":"convert"}}"#,
            "memory.private_backend",
        ),
        (
            r#"{"accel":"soft","vcpus":8,"memory":{"size_mib":16,"private_backend":"memfd"},"workload":{"kind":"convert"}}"#,
            "memory.size_mib",
        ),
        (
            r#"{"accel":"soft","memory":{"private_backend":"memfd"},"workload":{"kind":"convert","huge_pages_per_vcpu":1}}"#,
            "workload.huge_pages_per_vcpu",
        ),
        (
            r#"{"accel":"soft","memory":{"private_backend":"memfd"},"workload":{"kind":"convert","iterations":2}}"#,
            "iterations",
        ),
    ] {
        let config = write_config("convert-bad.json", text);
        let out = run(&["--config", config.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{text}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(field), "{text}: {stderr}");
    }
}

#[test]
fn a_config_is_one_json_object_and_nothing_after_it() {
    for (text, says) in [
        ("[]", "one JSON object"),
        (r#"[2, "soft"]"#, "one JSON object"),
        (
            r#"{"vcpus": 1} {"vcpus": 2}"#,
            "text after the configuration object",
        ),
        (
            r#"{"vcpus": 1} // text"#,
            "text after the configuration object",
        ),
        (
            r#"{"memory": [64, "anonymous"]}"#,
            "memory: must be a JSON object",
        ),
        (r#"{"workload": ["hello"]}"#, "workload"),
    ] {
        let config = write_config("not-an-object.json", text);
        let out = run(&["--config", config.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{text}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{text}: {stderr}");
    }
}

#[test]
fn a_config_read_is_capped_and_a_fifo_wait_stops_on_a_signal() {
    let start = Instant::now();
    let out = run(&["--config", "/dev/zero"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("limit"));
    assert!(start.elapsed() < Duration::from_secs(10));

    let fifo = std::env::temp_dir().join(format!("refvmm-fifo-{}", std::process::id()));
    let _ = std::fs::remove_file(&fifo);
    let path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    let child = refvmm()
        .args(["--config", fifo.to_str().unwrap()])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let start = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "the signal was ignored"
    );
    assert_eq!(out.status.code(), Some(130));
    assert!(String::from_utf8_lossy(&out.stderr).contains("stopped by a signal"));
    let _ = std::fs::remove_file(&fifo);
}

#[test]
fn binary_errors_name_their_own_field_and_an_empty_binary_is_refused() {
    let empty = write_config("empty.bin", "");
    let code = write_config("code.bin", "\u{f4}");
    for (path, load, entry, field) in [
        (&empty, 0x1000, 0x1000, "workload.path"),
        (&code, 0x1000, 0x4000_0000, "workload.entry_gpa"),
        (&code, 0x4000_0000, 0x1000, "workload.load_gpa"),
    ] {
        let config = write_config(
            "binary-bad.json",
            &format!(
                r#"{{"memory": {{"size_mib": 16}},
                    "workload": {{"kind": "binary", "path": "{}", "load_gpa": {load},
                                  "entry_gpa": {entry}}}}}"#,
                path.display()
            ),
        );
        let out = run(&["--config", config.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{field}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(field), "{field}: {stderr}");
    }
}

#[test]
fn log_file_and_metrics_file_record_the_run() {
    let dir = std::env::temp_dir().join(format!("refvmm-logs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (log, metrics) = (dir.join("run.log"), dir.join("metrics.jsonl"));
    let config = write_config(
        "logged.json",
        r#"{"vcpus": 2, "accel": "soft", "memory": {"size_mib": 16},
            "tdx": {"enabled": true},
            "workload": {"kind": "dirty_log", "iterations": 3, "bytes_per_vcpu_mib": 4}}"#,
    );
    let out = run(&[
        "--config",
        config.to_str().unwrap(),
        "--log-file",
        log.to_str().unwrap(),
        "--metrics-file",
        metrics.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = std::fs::read_to_string(&log).unwrap();
    for phase in ["creating guest memory", "dirty-log pass", "TD teardown"] {
        assert!(log.contains(phase), "no {phase:?} in the log:\n{log}");
    }
    assert!(!log.contains('\u{1b}'), "no ANSI escapes in a log file");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
        .collect();
    let last = lines.last().expect("at least the final line");
    assert_eq!(last["passes"], 3);
    assert!(last["faults"].as_u64().unwrap() > 0);
    assert!(last["elapsed_s"].as_f64().unwrap() >= 0.0);
    for field in ["vcpu_exits", "serial_bytes", "splits", "conversions"] {
        assert!(last.get(field).is_some(), "{field}");
    }
    // stderr is not a terminal here: no colour there either.
    assert!(!String::from_utf8_lossy(&out.stderr).contains('\u{1b}'));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every example parses; each runs where the host has what it needs
/// (`engine::host_needs`), and is refused with exit 2 naming the field and
/// the capability where it does not.
#[test]
fn every_example_is_valid_and_runs_where_the_host_allows() {
    let mut ran = 0;
    for entry in std::fs::read_dir(example("")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let out = run(&["--print-config", path.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let config = refvmm::config::Config::load(&path).unwrap();
        let needs = refvmm::engine::host_needs(&config);
        let test = format!("example {}", path.file_name().unwrap().to_string_lossy());
        let capabilities: Vec<Capability> = needs.iter().map(|need| need.capability).collect();
        if !host_allows(&test, &capabilities) {
            let missing = needs
                .iter()
                .find(|need| !HostCaps::get().has(need.capability))
                .unwrap();
            let out = run(&["--config", path.to_str().unwrap()]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{test}: {stderr}");
            let named = format!("{}: needs {}", missing.field, missing.capability);
            assert!(stderr.contains(&named), "{test}: {stderr}");
            continue;
        }
        let hugetlb = config.memory.backend == BackendName::Hugetlb
            || config.memory.private_backend == Some(BackendName::Hugetlb);
        let page = 1u64 << config.memory.huge_page_size.log2();
        if hugetlb && !gmem::caps::hugetlb_pages_free(&test, page, config.memory_bytes() / page) {
            continue;
        }
        let out = run(&["--config", path.to_str().unwrap(), "--report", "json"]);
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        ran += 1;
    }
    assert!(ran > 0, "no example ran");
}

#[test]
fn memory_the_host_cannot_map_is_blamed_on_its_size() {
    use std::os::unix::process::CommandExt;
    let config = write_config(
        "too-big.json",
        r#"{"accel": "soft", "memory": {"size_mib": 65536},
            "workload": {"kind": "dirty_log", "iterations": 1, "bytes_per_vcpu_mib": 1}}"#,
    );
    let mut command = refvmm();
    command.args(["--config", config.to_str().unwrap()]);
    // SAFETY: setrlimit is async-signal-safe; only the child is limited.
    unsafe {
        command.pre_exec(|| {
            // 8 GiB of address space: the 64 GiB mapping cannot be had.
            let limit = libc::rlimit {
                rlim_cur: 8 << 30,
                rlim_max: 8 << 30,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = command.output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("memory.size_mib"), "{stderr}");
    assert!(!stderr.contains("memory.backend"), "{stderr}");
}

#[test]
fn missing_host_features_exit_2_before_any_guest_runs() {
    let caps = gmem::HostCaps::probe();
    // Transparent huge pages, required: anonymous memory of a VM with no
    // private pages is private anonymous memory (the anonymous THP mode
    // decides), memfd memory is shmem (the shmem THP mode decides).
    for (backend, capability, mode) in [
        (
            "anonymous",
            Capability::AnonymousThp,
            "transparent_hugepage/enabled",
        ),
        ("memfd", Capability::ShmemThp, "shmem_enabled"),
    ] {
        let config = write_config(
            &format!("require-thp-{backend}.json"),
            &format!(
                r#"{{"vcpus": 1, "accel": "soft", "memory": {{"size_mib": 4, "backend": "{backend}", "require_transparent_huge_pages": true}},
                    "workload": {{"kind": "dirty_log", "iterations": 1, "bytes_per_vcpu_mib": 1}}}}"#
            ),
        );
        let refused = |out: &Output| {
            assert_eq!(out.status.code(), Some(2), "{backend}");
            let stderr = String::from_utf8_lossy(&out.stderr);
            let needs = format!(
                "memory.require_transparent_huge_pages: needs {}",
                capability.name()
            );
            assert!(stderr.contains(&needs), "{stderr}");
            assert!(stderr.contains(mode), "{stderr}");
            assert!(out.stdout.is_empty(), "no guest ran: {:?}", out.stdout);
        };
        let out = run(&["--config", config.to_str().unwrap()]);
        if caps.has(capability) {
            assert!(out.status.success(), "the requirement is met ({backend})");
        } else {
            refused(&out);
        }
        // Hidden, the mode counts as off on every host.
        let out = refvmm()
            .args(["--config", config.to_str().unwrap()])
            .env("MMUKIT_HIDE_CAPS", capability.name())
            .output()
            .unwrap();
        refused(&out);
    }
    // More HugeTLB pages than the whole pool holds: never met, however
    // many pages the tests running beside this one take or give back.
    let pool = caps.pool(2 << 20).map_or(0, |pool| pool.total);
    let config = write_config(
        "too-many-huge-pages.json",
        &format!(
            r#"{{"accel": "soft", "memory": {{"size_mib": {}, "backend": "hugetlb"}},
                "workload": {{"kind": "dirty_log", "iterations": 1, "bytes_per_vcpu_mib": 1}}}}"#,
            (pool + 8) * 2
        ),
    );
    let out = run(&["--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("memory.backend"), "{stderr}");
    assert!(
        stderr.contains(&format!("{} free", pool + 8)) || stderr.contains("needs"),
        "{stderr}"
    );
    // And --check-host says what the host has.
    let out = run(&["--check-host"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("shmem_thp: "), "{text}");
}

#[test]
fn sixteen_vcpus_write_guest_memory_past_4_gib_on_kvm() {
    if !host_allows(
        "sixteen_vcpus_write_guest_memory_past_4_gib_on_kvm",
        &[Capability::Kvm],
    ) {
        return;
    }
    // 4160 MiB: 3 GiB below the MMIO hole, the rest from 4 GiB. With more
    // than 3 GiB the shares sit at the top of memory, past 4 GiB, and the
    // long-mode guest reaches them through its page tables.
    let config = write_config(
        "big16.json",
        r#"{"vcpus": 16, "accel": "kvm", "memory": {"size_mib": 4160, "backend": "anonymous"},
            "workload": {"kind": "dirty_log", "iterations": 2, "bytes_per_vcpu_mib": 2}}"#,
    );
    let report = json_report(&config);
    assert_eq!(report["vcpus"], 16);
    assert_eq!(report["memory_bytes"].as_u64().unwrap(), 4160 << 20);
    for iteration in report["iterations"].as_array().unwrap() {
        // Every page of every share, each one logged (refvmm checks which).
        assert_eq!(iteration["dirty_pages"], 16 * 512);
    }
    // What cannot work is refused before the run.
    for (text, field) in [
        (
            r#"{"accel": "kvm", "memory": {"size_mib": 262144},
                "workload": {"kind": "dirty_log", "iterations": 1, "bytes_per_vcpu_mib": 1}}"#,
            "memory.size_mib",
        ),
        (
            r#"{"accel": "kvm", "memory": {"size_mib": 8192},
                "workload": {"kind": "binary", "path": "/bin/sh", "load_gpa": 3489660928,
                             "entry_gpa": 4096}}"#,
            "workload.load_gpa",
        ),
    ] {
        let config = write_config("big-bad.json", text);
        let out = run(&["--config", config.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{text}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(field), "{text}: {stderr}");
    }
}

/// Messages a user can act on: no Rust type names, no `?:` for a syntax
/// error, no float notation for a big integer; the file named for
/// validation errors too; an empty file and a byte-order mark get their
/// own message; `--config -` reads standard input.
#[test]
fn bad_input_gets_messages_a_user_can_act_on() {
    let cases: [(&[u8], &str); 7] = [
        (br#"{"vcpus": 1,}"#, "trailing comma"),
        (b"", "the configuration is empty"),
        (b"\xef\xbb\xbf{\"vcpus\": 1}", "byte-order mark"),
        (
            br#"{"memory": 5}"#,
            "memory: invalid type: integer `5`, expected a JSON object",
        ),
        (
            br#"{"memory": {"size_mib": 100000000000000000000}}"#,
            "memory.size_mib: invalid type: a number that is not a whole number in range",
        ),
        (br#"{"vcpus": 65}"#, "vcpus: must be between 1 and 64"),
        (br#"{"workload": 3}"#, "expected a JSON object"),
    ];
    for (i, (text, needle)) in cases.into_iter().enumerate() {
        let path = write_config(&format!("message{i}.json"), "");
        std::fs::write(&path, text).unwrap();
        let out = run(&["--config", path.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(needle), "{needle:?}: {stderr}");
        assert!(
            stderr.contains(&format!("{}: ", path.display())),
            "names the file: {stderr}"
        );
        for internal in ["struct ", "RawWorkload", "MemoryConfig", "?:", "e+", "u64"] {
            assert!(!stderr.contains(internal), "{internal:?} in {stderr}");
        }
    }
    // Standard input.
    let mut child = refvmm()
        .args(["--config", "-", "--report", "json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(
            br#"{"accel": "soft", "memory": {"size_mib": 8},
                 "workload": {"kind": "dirty_log", "iterations": 1, "bytes_per_vcpu_mib": 1}}"#,
        )
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["iterations"].as_array().unwrap().len(), 1);
    let out = refvmm()
        .args(["--config", "-"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("<stdin>: the configuration is empty"));
}

/// Every configured vCPU is created and runs: with `hello` the first runs
/// the program and the others park on a `hlt`; the report counts them. A
/// binary that would cover the parking `hlt` is refused, naming its field.
#[test]
fn every_configured_vcpu_of_a_hello_run_is_created_and_runs() {
    if !host_allows(
        "every_configured_vcpu_of_a_hello_run_is_created_and_runs",
        &[Capability::Kvm],
    ) {
        return;
    }
    let config = write_config(
        "hello-4.json",
        r#"{"vcpus": 4, "memory": {"size_mib": 4}, "workload": {"kind": "hello"}}"#,
    );
    let out = run(&["--config", config.to_str().unwrap(), "--report", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["vcpus"], 4);
    assert_eq!(report["vcpus_parked"], 3);
    assert_eq!(report["exit"], "halted");
    // 3 parking exits, then the hello's.
    assert!(report["vcpu_exits"].as_u64().unwrap() > 3);
    assert!(String::from_utf8_lossy(&out.stderr).contains("Hello from mmukit guest"));
    let binary = write_config("cover-park.bin", "");
    std::fs::write(&binary, [0xf4; 32]).unwrap();
    let config = write_config(
        "cover-park.json",
        &format!(
            r#"{{"vcpus": 2, "memory": {{"size_mib": 4}}, "workload": {{"kind": "binary",
                "path": "{}", "load_gpa": 4080, "entry_gpa": 4080}}}}"#,
            binary.display()
        ),
    );
    let out = run(&["--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("workload.load_gpa"));
}

/// With `--report json` every ending prints one JSON object on stdout:
/// exit 2 (configuration or host) and exit 1 (the guest failed) as
/// `{"exit", "error": {"field", "message"}}`; `--check-host` prints JSON,
/// and exits 2 when the host lacks what `--config` needs.
#[test]
fn every_exit_prints_one_json_object_with_report_json() {
    let one_object = |out: &Output| -> serde_json::Value {
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text.trim().lines().count(), 1, "one object: {text}");
        serde_json::from_str(text.trim()).expect("JSON on stdout")
    };
    let bad = write_config("json-bad.json", r#"{"vcpus": 0}"#);
    let out = run(&["--config", bad.to_str().unwrap(), "--report", "json"]);
    assert_eq!(out.status.code(), Some(2));
    let object = one_object(&out);
    assert_eq!(object["exit"], 2);
    assert_eq!(object["error"]["field"], "vcpus");
    assert!(
        object["error"]["message"]
            .as_str()
            .unwrap()
            .contains("between 1 and 64")
    );
    // A host that lacks a capability: hide KVM, so every host lacks it.
    let hello = example("hello.json");
    let out = refvmm()
        .args(["--config", hello.to_str().unwrap(), "--report", "json"])
        .env("MMUKIT_HIDE_CAPS", "kvm")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let object = one_object(&out);
    assert_eq!(object["error"]["field"], "accel");
    assert!(
        object["error"]["message"]
            .as_str()
            .unwrap()
            .contains("needs kvm")
    );
    // --check-host: JSON, by name; and against a configuration.
    let out = refvmm()
        .args([
            "--check-host",
            "--report",
            "json",
            "--config",
            hello.to_str().unwrap(),
        ])
        .env("MMUKIT_HIDE_CAPS", "kvm")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let object = one_object(&out);
    assert_eq!(object["capabilities"]["kvm"]["available"], false);
    assert_eq!(
        object["capabilities"]["guest_memfd_mmap"]["available"],
        false
    );
    assert_eq!(object["hidden"][0], "kvm");
    assert_eq!(object["config_runs_here"], false);
    assert_eq!(object["exit"], 2);
    assert_eq!(object["error"]["field"], "accel");
    let soft = example("dirty-log-soft-lazy.json");
    let out = run(&["--check-host", "--config", soft.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("hugetlb_2m: "), "{text}");
    assert!(
        !text.contains("0x"),
        "capabilities by name, not hex: {text}"
    );
    assert_eq!(
        out.status.success(),
        HostCaps::get().has(Capability::Hugetlb2M),
        "{text}"
    );
    // An unknown capability to hide is refused.
    let out = refvmm()
        .args(["--check-host"])
        .env("MMUKIT_HIDE_CAPS", "kvmm")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    // The guest fails (exit 1): long mode, ud2 with no IDT triple-faults.
    if !host_allows(
        "every_exit_prints_one_json_object_with_report_json (exit 1)",
        &[Capability::Kvm],
    ) {
        return;
    }
    let binary = write_config("ud2.bin", "");
    std::fs::write(&binary, [0x0f, 0x0b]).unwrap();
    let config = write_config(
        "ud2.json",
        &format!(
            r#"{{"vcpus": 1, "memory": {{"size_mib": 4}}, "workload": {{"kind": "binary",
                "path": "{}", "load_gpa": 1048576, "entry_gpa": 1048576, "mode": "long"}}}}"#,
            binary.display()
        ),
    );
    let out = run(&["--config", config.to_str().unwrap(), "--report", "json"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let object = one_object(&out);
    assert_eq!(object["exit"], 1);
    assert!(
        object["error"]["message"]
            .as_str()
            .unwrap()
            .contains("guest")
    );
    // What a VMM developer needs: the exit, and the registers where the
    // guest stood (long mode, paging on).
    let guest = &object["error"]["guest"];
    assert!(
        guest["exit"]
            .as_str()
            .unwrap()
            .contains("KVM_EXIT_SHUTDOWN"),
        "{guest}"
    );
    assert_eq!(guest["vcpu"], 0);
    assert_ne!(
        guest["registers"]["efer"].as_u64().unwrap() & (1 << 10),
        0,
        "{guest}"
    );
    assert!(guest["registers"]["cr3"].as_u64().unwrap() > 0, "{guest}");
}

/// `workload.timeout_ms` ends a guest that never stops: exit 1, naming the
/// timeout, with the registers of the vCPU where it spun; and a soft run
/// past its timeout fails the same way.
#[test]
fn a_spinning_guest_is_stopped_at_the_workload_timeout_with_its_registers() {
    let soft = write_config(
        "soft-timeout.json",
        r#"{"vcpus": 2, "accel": "soft", "memory": {"size_mib": 64},
            "workload": {"kind": "dirty_log", "iterations": 1000, "bytes_per_vcpu_mib": 16,
                         "timeout_ms": 300}}"#,
    );
    let out = run(&["--config", soft.to_str().unwrap(), "--report", "json"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let object: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        object["error"]["message"]
            .as_str()
            .unwrap()
            .contains("workload.timeout_ms"),
        "{object}"
    );
    if !host_allows(
        "a_spinning_guest_is_stopped_at_the_workload_timeout_with_its_registers (kvm)",
        &[Capability::Kvm],
    ) {
        return;
    }
    // Real mode at 0x1000: jmp $ (the guest never exits on its own).
    let binary = write_config("spin-timeout.bin", "");
    std::fs::write(&binary, [0xeb, 0xfe]).unwrap();
    let config = write_config(
        "spin-timeout.json",
        &format!(
            r#"{{"vcpus": 1, "memory": {{"size_mib": 4}}, "workload": {{"kind": "binary",
                "path": "{}", "load_gpa": 4096, "entry_gpa": 4096, "timeout_ms": 300}}}}"#,
            binary.display()
        ),
    );
    let out = run(&["--config", config.to_str().unwrap(), "--report", "json"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let object: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let guest = &object["error"]["guest"];
    assert!(
        guest["exit"].as_str().unwrap().contains("timeout_ms"),
        "{guest}"
    );
    // Real mode, CS based at 0: the jmp at 0x1000 is where it spins.
    assert_eq!(guest["registers"]["rip"], 0x1000, "{guest}");
    assert_eq!(
        guest["registers"]["cr0"].as_u64().unwrap() & 1,
        0,
        "{guest}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("real mode, rip=0x1000"), "{stderr}");
}

/// Prefaulting more memory than the host has available is refused before
/// anything is touched, naming `memory.size_mib` (as a HugeTLB shortfall
/// is).
#[test]
fn prefault_past_the_hosts_available_memory_is_refused_naming_the_size() {
    // Past all the host's memory, not just what is available now: tests
    // running beside this one free memory between a count and the run.
    // SAFETY: a `sysinfo` struct is plain integers, valid all zero.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: sysinfo(2) only fills the struct it is given, ours.
    assert_eq!(unsafe { libc::sysinfo(&mut info) }, 0);
    let total = info.totalram * u64::from(info.mem_unit);
    assert!(HostCaps::probe().mem_available.expect("MemAvailable") <= total);
    let config = write_config(
        "prefault-too-big.json",
        &format!(
            r#"{{"accel": "soft", "memory": {{"size_mib": {}, "prefault": true}},
                "workload": {{"kind": "dirty_log", "iterations": 1, "bytes_per_vcpu_mib": 1}}}}"#,
            (total >> 20) + 1024
        ),
    );
    let out = run(&["--config", config.to_str().unwrap(), "--report", "json"]);
    assert_eq!(out.status.code(), Some(2));
    let object: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(object["error"]["field"], "memory.size_mib");
    assert!(
        object["error"]["message"]
            .as_str()
            .unwrap()
            .contains("MiB available"),
        "{object}"
    );
}

/// Starts refvmm on `config` with a metrics file, waits until it has done
/// `passes` dirty-log passes, then stops it with SIGTERM.
fn stop_after_passes(config: &Path, passes: u64) -> Output {
    let metrics = config.with_extension("metrics");
    let _ = std::fs::remove_file(&metrics);
    let mut child = refvmm()
        .args(["--config", config.to_str().unwrap(), "--report", "json"])
        .arg("--metrics-file")
        .arg(&metrics)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done = std::fs::read_to_string(&metrics)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter_map(|line| line["passes"].as_u64())
            .max()
            .unwrap_or(0);
        let exited = child.try_wait().unwrap().is_some();
        if done >= passes || exited || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: signals our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait_with_output().unwrap()
}

/// An interrupted run's JSON report keeps what finished: the prefault
/// rate, the populate and enable times, and every pass done (as many as the
/// live metrics counted), on the soft accelerator and on KVM.
#[test]
fn an_interrupted_json_report_keeps_the_passes_it_finished() {
    for accel in ["soft", "kvm"] {
        let test = format!("an_interrupted_json_report_keeps_the_passes_it_finished ({accel})");
        if accel == "kvm" && !host_allows(&test, &[Capability::Kvm]) {
            continue;
        }
        let config = write_config(
            &format!("interrupted-{accel}.json"),
            &format!(
                r#"{{"vcpus": 2, "accel": "{accel}", "memory": {{"size_mib": 64, "prefault": true}},
                    "workload": {{"kind": "dirty_log", "iterations": 1000, "bytes_per_vcpu_mib": 16}}}}"#
            ),
        );
        let out = stop_after_passes(&config, 2);
        assert_eq!(
            out.status.code(),
            Some(130),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a report");
        assert_eq!(report["interrupted"], true, "{report}");
        let iterations = report["iterations"].as_array().expect("iterations kept");
        assert!(iterations.len() >= 2, "{accel}: {report}");
        assert_eq!(report["passes"], iterations.len(), "{accel}: {report}");
        assert!(report["prefault_gib_s"].as_f64().unwrap() > 0.0, "{report}");
        assert!(report["populate_s"].as_f64().unwrap() > 0.0, "{report}");
    }
}

/// On a terminal a long run shows its progress: pass N of M, the memory
/// written and the rate (run under `script`, which gives refvmm a
/// pseudo-terminal). Off a terminal nothing of it is printed.
#[test]
fn a_long_run_shows_its_passes_on_a_terminal_and_nowhere_else() {
    let config = write_config(
        "progress.json",
        r#"{"vcpus": 2, "accel": "soft", "memory": {"size_mib": 64},
            "workload": {"kind": "dirty_log", "iterations": 200, "bytes_per_vcpu_mib": 16}}"#,
    );
    let command = format!(
        "{} --config {}",
        env!("CARGO_BIN_EXE_refvmm"),
        config.display()
    );
    let out = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .output()
        .expect("script(1), from util-linux");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(screen.contains("dirty-log pass "), "{screen}");
    assert!(screen.contains("/200"), "{screen}");
    assert!(screen.contains("written, "), "{screen}");
    let piped = run(&["--config", config.to_str().unwrap()]);
    assert!(piped.status.success());
    assert!(!String::from_utf8_lossy(&piped.stderr).contains("dirty-log pass"));
}
