//! ARCHITECTURE.md's crate map says, for every package, which mmukit
//! crates it depends on: this checks each line against `cargo metadata`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

/// The crate map's rows: package name to (folder, mmukit dependencies).
fn crate_map(text: &str) -> BTreeMap<String, (String, BTreeSet<String>)> {
    let section = text
        .split("\n## ")
        .find(|section| section.starts_with("Crate map"))
        .expect("ARCHITECTURE.md has a `## Crate map` section");
    section
        .lines()
        .filter(|line| line.starts_with("| `"))
        .map(|line| {
            let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
            assert_eq!(cells.len(), 4, "a crate map row has four cells: {line}");
            let unquote = |cell: &str| cell.trim_matches('`').to_owned();
            let deps = match cells[3] {
                "none" => BTreeSet::new(),
                list => list.split(',').map(|dep| dep.trim().to_owned()).collect(),
            };
            (unquote(cells[1]), (unquote(cells[0]), deps))
        })
        .collect()
}

/// Every workspace package: name to (folder, workspace packages it depends
/// on, normal dependencies only).
fn workspace(root: &Path) -> BTreeMap<String, (String, BTreeSet<String>)> {
    let cargo = option_env!("CARGO").unwrap_or("cargo");
    let output = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(root)
        .output()
        .expect("cargo metadata runs");
    assert!(
        output.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("cargo metadata prints JSON");
    let packages = metadata["packages"].as_array().expect("packages");
    let names: BTreeSet<String> = packages
        .iter()
        .map(|p| p["name"].as_str().expect("a name").to_owned())
        .collect();
    packages
        .iter()
        .map(|package| {
            let manifest = Path::new(package["manifest_path"].as_str().expect("a manifest"));
            let folder = manifest
                .parent()
                .and_then(|dir| dir.strip_prefix(root).ok())
                .expect("packages live under the workspace root")
                .display()
                .to_string();
            let deps = package["dependencies"]
                .as_array()
                .expect("dependencies")
                .iter()
                .filter(|dep| dep["kind"].is_null())
                .filter_map(|dep| dep["name"].as_str())
                .filter(|name| names.contains(*name))
                .map(str::to_owned)
                .collect();
            let name = package["name"].as_str().expect("a name").to_owned();
            (name, (format!("{folder}/"), deps))
        })
        .collect()
}

#[test]
fn the_crate_map_names_every_package_its_folder_and_its_mmukit_dependencies() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace");
    let text = std::fs::read_to_string(root.join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let documented = crate_map(&text);
    let actual = workspace(root);
    assert_eq!(
        documented.keys().collect::<Vec<_>>(),
        actual.keys().collect::<Vec<_>>(),
        "the crate map lists every workspace package, and only those"
    );
    for (name, (folder, deps)) in &actual {
        let (documented_folder, documented_deps) = &documented[name];
        assert_eq!(documented_folder, folder, "{name}'s folder");
        assert_eq!(documented_deps, deps, "{name}'s mmukit dependencies");
    }
}

#[test]
fn architecture_stays_short() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace");
    let text = std::fs::read_to_string(root.join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let lines = text.lines().count();
    assert!(
        lines < 350,
        "ARCHITECTURE.md is {lines} lines: keep it under 350"
    );
}
