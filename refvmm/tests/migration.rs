//! Live migration between two refvmm processes: the VM moves and its
//! checks pass on the destination; refusals, a destination or a source
//! that stops, and a damaged stream lose nothing and run nothing twice.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn refvmm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_refvmm"))
}

/// A directory of this test's own.
fn dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("refvmm-migration-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A destination listening at `address`, with JSON reports.
fn destination(address: &str, config: Option<&Path>) -> Child {
    let mut command = refvmm();
    command.args(["--incoming", address, "--report", "json"]);
    if let Some(config) = config {
        command.arg("--config").arg(config);
    }
    command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("refvmm starts")
}

/// The source: runs `config` and migrates it to `address`.
fn source(config: &Path, address: &str) -> Output {
    refvmm()
        .args(["--config", config.to_str().unwrap(), "--report", "json"])
        .args(["--migrate-to", address])
        .output()
        .expect("refvmm runs")
}

fn json(out: &[u8]) -> serde_json::Value {
    serde_json::from_slice(out)
        .unwrap_or_else(|err| panic!("one JSON object ({err}): {}", String::from_utf8_lossy(out)))
}

/// Waits for `child` at most `limit`, reading its output as it comes (a
/// long report would fill the pipe).
fn finish(child: Child, limit: Duration) -> Output {
    let pid = child.id() as i32;
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || sender.send(child.wait_with_output()));
    match receiver.recv_timeout(limit) {
        Ok(output) => output.unwrap(),
        Err(_) => {
            // SAFETY: kill(2) of our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("the destination did not end within {limit:?}");
        }
    }
}

/// Waits until the destination bound its unix socket at `path` (without
/// connecting: the first connection is the sender's).
fn listening(path: &Path) {
    let start = Instant::now();
    while !path.exists() {
        assert!(start.elapsed() < Duration::from_secs(10), "no listener");
        std::thread::sleep(Duration::from_millis(10));
    }
}

const DIRTY_LOG: &str = r#"{"vcpus": 2, "accel": "soft", "memory": {"size_mib": 64},
  "workload": {"kind": "dirty_log", "iterations": 400, "bytes_per_vcpu_mib": 16},
  "migration": {"after_ms": 20, "max_downtime_ms": 30, "max_iterations": 5}}"#;

#[test]
fn a_soft_dirty_log_guest_moves_while_it_writes_and_its_checks_pass_on_the_destination() {
    let dir = dir("dirty-log");
    let config = write(&dir, "vm.json", DIRTY_LOG);
    let socket = dir.join("m.sock");
    let address = format!("unix:{}", socket.display());
    // The destination keeps memory where the source had anonymous memory.
    let overrides = write(&dir, "dest.json", r#"{"memory": {"backend": "memfd"}}"#);
    let dest = destination(&address, Some(&overrides));
    let src = source(&config, &address);
    let dest = finish(dest, Duration::from_secs(60));
    assert!(
        src.status.success(),
        "{}",
        String::from_utf8_lossy(&src.stderr)
    );
    assert!(
        dest.status.success(),
        "{}",
        String::from_utf8_lossy(&dest.stderr)
    );
    let src = json(&src.stdout);
    let dest = json(&dest.stdout);
    assert!(
        src["exit"]
            .as_str()
            .unwrap()
            .starts_with("migrated to unix:"),
        "{src}"
    );
    assert_eq!(src["migration"]["outcome"], "completed");
    assert!(src["migration"]["passes"].as_array().unwrap().len() >= 2);
    assert_eq!(dest["backend"], "memfd");
    assert_eq!(dest["exit"], "iterations done", "{dest}");
    assert_eq!(dest["migration"]["role"], "destination");
    // Together the two sides ran every pass: the destination the rest.
    let done_here = src["iterations"].as_array().unwrap().len();
    let done_there = dest["iterations"].as_array().unwrap().len();
    assert_eq!(done_here + done_there, 400, "{done_here} + {done_there}");
}

#[test]
fn an_idle_guest_with_random_memory_moves_and_the_destination_checks_every_word() {
    let dir = dir("idle");
    let config = write(
        &dir,
        "vm.json",
        r#"{"vcpus": 1, "accel": "soft", "memory": {"size_mib": 32},
            "workload": {"kind": "idle", "duration_ms": 60000, "fill": "random"},
            "migration": {"streams": 2}}"#,
    );
    let socket = dir.join("m.sock");
    let address = format!("unix:{}", socket.display());
    let dest = destination(&address, None);
    let start = Instant::now();
    let src = source(&config, &address);
    assert!(
        src.status.success(),
        "{}",
        String::from_utf8_lossy(&src.stderr)
    );
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "it did not idle its minute"
    );
    let src = json(&src.stdout);
    assert_eq!(src["migration"]["streams"], 2);
    assert_eq!(
        src["migration"]["zero_pages_skipped"], 0,
        "random memory has none"
    );
    // The destination idles the rest of the minute: stop it with a signal
    // once it verified memory and runs.
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: kill(2) of our own child.
    unsafe { libc::kill(dest.id() as i32, libc::SIGTERM) };
    let dest = finish(dest, Duration::from_secs(20));
    let report = json(&dest.stdout);
    assert_eq!(report["migration"]["outcome"], "completed", "{report}");
    assert_eq!(report["workload"], "idle");
}

#[test]
fn a_destination_configuration_that_changes_more_than_memory_is_refused_naming_the_field() {
    let dir = dir("overrides");
    let overrides = write(&dir, "dest.json", r#"{"vcpus": 4}"#);
    let out = refvmm()
        .args([
            "--incoming",
            &format!("unix:{}", dir.join("m.sock").display()),
        ])
        .args(["--config", overrides.to_str().unwrap(), "--report", "json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let report = json(&out.stdout);
    assert_eq!(report["error"]["field"], "vcpus", "{report}");
}

#[test]
fn a_destination_that_cannot_run_the_vm_refuses_it_and_the_source_finishes_the_workload() {
    let dir = dir("refused");
    let config = write(&dir, "vm.json", DIRTY_LOG);
    let socket = dir.join("m.sock");
    let address = format!("unix:{}", socket.display());
    // 64 MiB is not a whole number of 1 GiB pages.
    let overrides = write(
        &dir,
        "dest.json",
        r#"{"memory": {"backend": "hugetlb", "huge_page_size": "1G"}}"#,
    );
    let dest = destination(&address, Some(&overrides));
    let src = source(&config, &address);
    let dest = finish(dest, Duration::from_secs(30));
    assert_eq!(
        dest.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&dest.stderr)
    );
    assert_eq!(json(&dest.stdout)["error"]["field"], "memory.size_mib");
    assert_eq!(
        src.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&src.stderr)
    );
    let src = json(&src.stdout);
    assert_eq!(
        src["exit"], "iterations done",
        "the source ran it to the end: {src}"
    );
    assert_eq!(src["migration"]["outcome"], "failed");
    assert!(
        src["migration"]["why"]
            .as_str()
            .unwrap()
            .contains("memory.size_mib"),
        "{src}"
    );
}

#[test]
fn a_destination_that_dies_mid_stream_leaves_the_source_to_finish_and_exit_3() {
    let dir = dir("destination-dies");
    let config = write(&dir, "vm.json", DIRTY_LOG);
    let socket = dir.join("m.sock");
    // A destination that reads the header and some memory, then is gone.
    let listener = UnixListener::bind(&socket).unwrap();
    let fake = std::thread::spawn(move || {
        let (mut connection, _) = listener.accept().unwrap();
        let mut header = [0u8; 4096];
        let _ = connection.read(&mut header);
        // Accept, with its checksum.
        let reply = accept_reply();
        connection.write_all(&reply).unwrap();
        let mut memory = vec![0u8; 1 << 20];
        let _ = connection.read_exact(&mut memory);
        drop(connection);
    });
    let src = source(&config, &format!("unix:{}", socket.display()));
    fake.join().unwrap();
    assert_eq!(
        src.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&src.stderr)
    );
    let src = json(&src.stdout);
    assert_eq!(src["exit"], "iterations done", "{src}");
    assert_eq!(src["migration"]["outcome"], "failed");
}

/// The destination's `Accept` reply.
fn accept_reply() -> Vec<u8> {
    let mut reply = Vec::new();
    migrate::format::Writer::new(&mut reply)
        .reply(&migrate::format::Reply::Accept)
        .unwrap();
    reply
}

#[test]
fn a_source_that_dies_mid_stream_makes_the_destination_exit_1_within_seconds() {
    let dir = dir("source-dies");
    let socket = dir.join("m.sock");
    let address = format!("unix:{}", socket.display());
    let dest = destination(&address, None);
    listening(&socket);
    // A source that sends a header and half a page record, then is gone.
    let mut connection = UnixStream::connect(&socket).unwrap();
    let mut bytes = Vec::new();
    let config = r#"{"vcpus": 1, "accel": "soft", "memory": {"size_mib": 16},
        "workload": {"kind": "idle", "duration_ms": 1000}}"#;
    migrate::format::Writer::new(&mut bytes)
        .header(&migrate::Header {
            streams: 0,
            session: 1,
            memory_bytes: 16 << 20,
            config: config.into(),
        })
        .unwrap();
    connection.write_all(&bytes).unwrap();
    let mut reply = [0u8; 9];
    connection.read_exact(&mut reply).unwrap();
    let mut record = Vec::new();
    migrate::format::Writer::new(&mut record)
        .pages(0, &[7; 4096])
        .unwrap();
    // The record's head (13 fixed bytes, the page's checksum, the CRC),
    // then half the page.
    connection.write_all(&record[..25 + 2048]).unwrap();
    drop(connection);
    let start = Instant::now();
    let dest = finish(dest, Duration::from_secs(15));
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(dest.status.code(), Some(1));
    let report = json(&dest.stdout);
    let message = report["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("the stream stopped in page contents at byte"),
        "{message}"
    );
}

#[test]
fn a_flipped_byte_is_refused_by_the_destination_and_the_source_resumes() {
    let dir = dir("flipped");
    let config = write(&dir, "vm.json", DIRTY_LOG);
    let dest_socket = dir.join("dest.sock");
    let proxy_socket = dir.join("proxy.sock");
    let dest = destination(&format!("unix:{}", dest_socket.display()), None);
    listening(&dest_socket);
    // A proxy that flips one byte on its way: in the first page record's
    // page number, which its head's CRC covers. (A flipped byte in the
    // contents of a page the guest writes again is overwritten by the
    // next pass; `migrate`'s stream tests cover contents.)
    let proxy = UnixListener::bind(&proxy_socket).unwrap();
    let relay = std::thread::spawn(move || {
        let (mut from_source, _) = proxy.accept().unwrap();
        let mut to_dest = UnixStream::connect(&dest_socket).unwrap();
        let (mut back_from_dest, mut back_to_source) = (
            to_dest.try_clone().unwrap(),
            from_source.try_clone().unwrap(),
        );
        let back = std::thread::spawn(move || {
            let _ = std::io::copy(&mut back_from_dest, &mut back_to_source);
        });
        // The header: 36 fixed bytes ending in the configuration's
        // length, the configuration, the CRC; then the record's tag.
        let mut fixed = [0u8; 36];
        from_source.read_exact(&mut fixed).unwrap();
        to_dest.write_all(&fixed).unwrap();
        let config_len = u32::from_le_bytes(fixed[32..36].try_into().unwrap()) as usize;
        let target = 36 + config_len + 4 + 1;
        let mut buf = vec![0u8; 64 << 10];
        let mut total = 36;
        let mut flipped = false;
        loop {
            let n = match from_source.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if !flipped && total + n > target {
                buf[target - total] ^= 0x10;
                flipped = true;
            }
            total += n;
            if to_dest.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        to_dest.shutdown(std::net::Shutdown::Write).ok();
        let _ = back.join();
    });
    let src = source(&config, &format!("unix:{}", proxy_socket.display()));
    let dest = finish(dest, Duration::from_secs(30));
    let _ = relay.join();
    assert_eq!(
        dest.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&dest.stderr)
    );
    let message = json(&dest.stdout)["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(message.contains("checksum"), "{message}");
    assert_eq!(
        src.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&src.stderr)
    );
    let src = json(&src.stdout);
    assert_eq!(src["exit"], "iterations done");
    assert!(
        src["migration"]["why"]
            .as_str()
            .unwrap()
            .contains("checksum"),
        "{src}"
    );
}

#[test]
fn a_td_and_the_convert_workload_are_refused_before_anything_runs() {
    let dir = dir("not-migratable");
    let td = write(
        &dir,
        "td.json",
        r#"{"accel": "soft", "tdx": {"enabled": true}, "memory": {"size_mib": 64},
            "workload": {"kind": "dirty_log"}}"#,
    );
    let out = source(&td, "unix:/nonexistent/m.sock");
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(json(&out.stdout)["error"]["field"], "tdx.enabled");
    let out = refvmm()
        .args([
            "--config",
            td.to_str().unwrap(),
            "--migrate-to",
            "ftp:x",
            "--report",
            "json",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(json(&out.stdout)["error"]["field"], "--migrate-to");
}

#[test]
fn the_readme_commands_move_the_example_vm() {
    let dir = dir("example");
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/migration");
    let socket = dir.join("vm.sock");
    let address = format!("unix:{}", socket.display());
    let dest = destination(&address, Some(&examples.join("destination.json")));
    let src = source(&examples.join("source.json"), &address);
    let dest = finish(dest, Duration::from_secs(120));
    assert!(
        src.status.success(),
        "{}",
        String::from_utf8_lossy(&src.stderr)
    );
    assert!(
        dest.status.success(),
        "{}",
        String::from_utf8_lossy(&dest.stderr)
    );
    let src = json(&src.stdout);
    assert_eq!(src["migration"]["outcome"], "completed", "{src}");
    assert_eq!(src["migration"]["streams"], 2);
    assert_eq!(json(&dest.stdout)["backend"], "memfd");
}

/// Whether the host has KVM; otherwise the skip of `test` is reported.
fn kvm(test: &str) -> bool {
    gmem::HostCaps::get().allows(test, &[gmem::Capability::Kvm])
}

#[test]
fn a_kvm_counter_moves_at_its_checkpoint_and_counts_on_where_it_stopped() {
    if !kvm("a_kvm_counter_moves_at_its_checkpoint_and_counts_on_where_it_stopped") {
        return;
    }
    let dir = dir("kvm-counter");
    let config = write(
        &dir,
        "vm.json",
        r#"{"vcpus": 2, "accel": "kvm", "memory": {"size_mib": 16}, "workload": {"kind": "counter"}}"#,
    );
    let socket = dir.join("m.sock");
    let address = format!("unix:{}", socket.display());
    let dest = refvmm()
        .args(["--incoming", &address])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let src = refvmm()
        .args([
            "--config",
            config.to_str().unwrap(),
            "--migrate-to",
            &address,
        ])
        .output()
        .unwrap();
    let dest = finish(dest, Duration::from_secs(30));
    assert!(
        src.status.success(),
        "{}",
        String::from_utf8_lossy(&src.stderr)
    );
    assert!(
        dest.status.success(),
        "{}",
        String::from_utf8_lossy(&dest.stderr)
    );
    let here = String::from_utf8_lossy(&src.stdout);
    let there = String::from_utf8_lossy(&dest.stdout);
    // The source printed up to the checkpoint; the destination, with the
    // vCPU's registers it received, the rest.
    assert!(here.starts_with("0\n1\n2\n3\n4\n"), "{here}");
    assert!(!here.contains("5\n"), "{here}");
    assert!(there.starts_with("5\n6\n7\n8\n9\n"), "{there}");
    assert!(there.contains("workload counter: halted"), "{there}");
    assert!(
        there.contains("1 more ran to a halt"),
        "the parked vCPU moved too: {there}"
    );
}

#[test]
fn a_kvm_idle_guest_moves_over_tcp_with_two_connections() {
    if !kvm("a_kvm_idle_guest_moves_over_tcp_with_two_connections") {
        return;
    }
    let dir = dir("kvm-idle");
    // Random memory above the program: the destination checks every word
    // of it before its vCPU runs, then idles out the rest of the time.
    let config = write(
        &dir,
        "vm.json",
        r#"{"vcpus": 1, "accel": "kvm", "memory": {"size_mib": 32},
            "workload": {"kind": "idle", "duration_ms": 1500, "fill": "random"},
            "migration": {"after_ms": 100, "streams": 2}}"#,
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = format!("tcp:127.0.0.1:{}", listener.local_addr().unwrap().port());
    drop(listener);
    let dest = destination(&address, None);
    let src = source(&config, &address);
    assert!(
        src.status.success(),
        "{}",
        String::from_utf8_lossy(&src.stderr)
    );
    let report = json(&src.stdout);
    assert_eq!(report["migration"]["outcome"], "completed", "{report}");
    assert_eq!(report["migration"]["streams"], 2);
    // Nothing of the random memory is zero: all of it travelled (the
    // pages below the fill hold the program and may be zero).
    assert!(
        report["migration"]["pages"].as_u64().unwrap() >= (32 << 20) / 4096 - 2,
        "{report}"
    );
    let dest = finish(dest, Duration::from_secs(30));
    assert!(
        dest.status.success(),
        "{}",
        String::from_utf8_lossy(&dest.stderr)
    );
    let report = json(&dest.stdout);
    assert_eq!(report["accel"], "kvm", "{report}");
    assert_eq!(report["migration"]["role"], "destination");
    assert_eq!(report["exit"], "idle time over", "{report}");
}

#[test]
fn a_kvm_dirty_log_guest_moves_mid_workload_and_its_checks_pass_on_the_destination() {
    if !kvm("a_kvm_dirty_log_guest_moves_mid_workload_and_its_checks_pass_on_the_destination") {
        return;
    }
    let dir = dir("kvm-dirty-log");
    // Every page written in every pass: the guest dirties memory faster
    // than a 5 ms downtime allows, so pre-copy stops at its pass limit.
    let config = write(
        &dir,
        "vm.json",
        r#"{"vcpus": 2, "accel": "kvm", "memory": {"size_mib": 16},
            "workload": {"kind": "dirty_log", "iterations": 200, "bytes_per_vcpu_mib": 4,
                         "write_percent": 100},
            "migration": {"after_ms": 100, "max_downtime_ms": 5, "max_iterations": 4}}"#,
    );
    let socket = dir.join("m.sock");
    let address = format!("unix:{}", socket.display());
    let dest = destination(&address, None);
    let src = source(&config, &address);
    let dest = finish(dest, Duration::from_secs(60));
    assert!(
        src.status.success(),
        "{}",
        String::from_utf8_lossy(&src.stderr)
    );
    assert!(
        dest.status.success(),
        "{}",
        String::from_utf8_lossy(&dest.stderr)
    );
    let src = json(&src.stdout);
    let dest = json(&dest.stdout);
    assert_eq!(src["migration"]["outcome"], "completed", "{src}");
    let passes = src["migration"]["passes"].as_array().unwrap().len();
    assert!(passes >= 2, "{src}");
    if src["migration"]["converged"] == false {
        // The full copy, the 4 passes the limit allows, and the bounded
        // last copy at the switch-over.
        assert_eq!(passes, 6, "{src}");
    }
    // The destination verified every page the guest wrote last, and
    // together the two sides ran every pass.
    assert_eq!(dest["exit"], "iterations done", "{dest}");
    let done_here = src["iterations"].as_array().unwrap().len();
    let done_there = dest["iterations"].as_array().unwrap().len();
    assert_eq!(done_here + done_there, 200, "{done_here} + {done_there}");
    assert!(done_there > 0, "the destination ran passes: {dest}");
}
