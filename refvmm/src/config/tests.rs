//! The configuration's tests: defaults, and every bad input named.

use super::*;

#[cfg(test)]
mod defaults {
    use super::*;

    #[test]
    fn an_empty_object_is_the_default_config() {
        assert_eq!(Config::parse("{}").unwrap(), Config::default());
    }

    #[test]
    fn unknown_fields_and_bad_values_name_the_field() {
        let cases = [
            (r#"{"vcpu": 2}"#, "vcpu"),
            (r#"{"memory": {"size": 4}}"#, "size"),
            (r#"{"memory": {"size_mib": 0}}"#, "memory.size_mib"),
            (r#"{"vcpus": "two"}"#, "vcpus"),
            (
                r#"{"memory": {"backend": "hugetlb", "size_mib": 3}}"#,
                "memory.size_mib",
            ),
            (r#"{"tdx": {"enabled": true}}"#, "tdx.enabled"),
            (r#"{"memory": {"backend": "secret"}}"#, "memory.backend"),
            (r#"{"accel": "soft"}"#, "workload.kind"),
            (
                r#"{"workload": {"kind": "dirty_log", "write_percent": 101}}"#,
                "workload.write_percent",
            ),
            (
                r#"{"workload": {"kind": "binary", "path": "/nonexistent", "load_gpa": 0, "entry_gpa": 0}}"#,
                "workload.path",
            ),
        ];
        for (text, field) in cases {
            let err = Config::parse(text).unwrap_err().to_string();
            assert!(err.contains(field), "{text}: {err}");
        }
    }
}

#[cfg(test)]
mod bad_input {
    use super::*;

    /// Sets `path` (dotted) to `value` in a valid dirty_log config.
    fn with(path: &str, value: serde_json::Value) -> String {
        let mut config = serde_json::json!({
            "vcpus": 1,
            "accel": "kvm",
            "memory": {"size_mib": 64, "backend": "anonymous", "huge_page_size": "2M",
                       "prefault": false, "prefault_threads": 2},
            "mmu": {"eager_split": true, "manual_protect": false, "cache_capacity": 40},
            "tdx": {"enabled": false, "pamt_policy": "on_install"},
            "workload": {"kind": "dirty_log", "iterations": 1, "bytes_per_vcpu_mib": 1,
                         "write_percent": 100}
        });
        let mut at = &mut config;
        let parts: Vec<&str> = path.split('.').collect();
        for part in &parts[..parts.len() - 1] {
            at = &mut at[*part];
        }
        at[parts[parts.len() - 1]] = value;
        config.to_string()
    }

    #[test]
    fn every_field_with_a_wrong_type_is_named() {
        let fields = [
            "vcpus",
            "accel",
            "memory.size_mib",
            "memory.backend",
            "memory.huge_page_size",
            "memory.prefault",
            "memory.prefault_threads",
            "mmu.eager_split",
            "mmu.manual_protect",
            "mmu.cache_capacity",
            "tdx.enabled",
            "tdx.pamt_policy",
            "workload.iterations",
            "workload.bytes_per_vcpu_mib",
            "workload.write_percent",
        ];
        for field in fields {
            for wrong in [serde_json::json!([1]), serde_json::json!({"x": 1})] {
                let err = Config::parse(&with(field, wrong.clone()))
                    .unwrap_err()
                    .to_string();
                let leaf = field.rsplit('.').next().unwrap();
                assert!(err.contains(leaf), "{field} = {wrong}: {err}");
            }
        }
        for (text, named) in [
            (
                r#"{"workload": {"kind": "hello", "iterations": 3}}"#,
                "iterations",
            ),
            (
                r#"{"workload": {"kind": "binary", "path": "/bin/true"}}"#,
                "load_gpa",
            ),
            (
                r#"{"workload": {"kind": "dirty_log", "mode": "long"}}"#,
                "mode",
            ),
            (
                r#"{"workload": {"kind": "counter", "colour": 1}}"#,
                "colour",
            ),
        ] {
            let err = Config::parse(text).unwrap_err().to_string();
            assert!(err.contains(named), "{text}: {err}");
        }
        let err = Config::parse(&with("workload.kind", serde_json::json!("dance")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("workload") && err.contains("dance"), "{err}");
    }

    #[test]
    fn out_of_range_values_are_named() {
        let cases = [
            ("vcpus", serde_json::json!(0), "vcpus"),
            ("vcpus", serde_json::json!(65), "vcpus"),
            ("vcpus", serde_json::json!(-1), "vcpus"),
            ("memory.size_mib", serde_json::json!(0), "memory.size_mib"),
            (
                "memory.size_mib",
                serde_json::json!(u64::MAX),
                "memory.size_mib",
            ),
            (
                "memory.prefault_threads",
                serde_json::json!(0),
                "memory.prefault_threads",
            ),
            (
                "mmu.cache_capacity",
                serde_json::json!(4),
                "mmu.cache_capacity",
            ),
            (
                "workload.iterations",
                serde_json::json!(0),
                "workload.iterations",
            ),
            (
                "workload.bytes_per_vcpu_mib",
                serde_json::json!(0),
                "workload.bytes_per_vcpu_mib",
            ),
            (
                "workload.bytes_per_vcpu_mib",
                serde_json::json!(1u64 << 40),
                "memory.size_mib",
            ),
            (
                "workload.write_percent",
                serde_json::json!(101),
                "workload.write_percent",
            ),
        ];
        for (field, value, named) in cases {
            let err = Config::parse(&with(field, value.clone()))
                .unwrap_err()
                .to_string();
            assert!(err.contains(named), "{field} = {value}: {err}");
        }
    }
}
