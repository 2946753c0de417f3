//! Loading components: every kind of bad upload gets a clear, specific error.

use super::*;
use atoll_runtime::LoadError;

fn load_err(bytes: &[u8]) -> LoadError {
    runtime().load("bad", bytes, AppSettings::default()).expect_err("must be rejected")
}

#[test]
fn non_wasm_bytes_are_rejected() {
    let err = load_err(b"#!/bin/sh\necho hi\n");
    assert!(matches!(err, LoadError::NotWasm), "{err:?}");
}

#[test]
fn core_module_is_rejected_with_a_hint() {
    let err = load_err(&wat::parse_str("(module)").expect("wat"));
    assert!(matches!(err, LoadError::CoreModule), "{err:?}");
    assert!(err.to_string().contains("wasm32-wasip2"), "{err}");
}

#[test]
fn truncated_component_is_invalid() {
    let wasm = std::fs::read(atoll_test_guests::HELLO).expect("built");
    let err = load_err(&wasm[..wasm.len() / 2]);
    assert!(matches!(err, LoadError::Invalid(_)), "{err:?}");
}

#[test]
fn component_without_incoming_handler_is_rejected() {
    let err = load_err(&wat::parse_str("(component)").expect("wat"));
    assert!(matches!(err, LoadError::NotAHandler(_)), "{err:?}");
    assert!(err.to_string().contains("wasi:http/incoming-handler"), "{err}");
}

#[test]
fn component_with_unknown_import_is_rejected_naming_it() {
    let err = load_err(
        &wat::parse_str(r#"(component (import "example:missing/thing" (instance (export "f" (func)))))"#)
            .expect("wat"),
    );
    assert!(matches!(err, LoadError::UnsatisfiedImport(_)), "{err:?}");
    assert!(err.to_string().contains("example:missing/thing"), "{err}");
}

#[test]
fn memory_cap_above_the_pool_is_a_settings_error() {
    let rt = runtime();
    let wasm = std::fs::read(atoll_test_guests::HELLO).expect("built");
    let mut settings = AppSettings::default();
    settings.limits.max_memory_bytes = rt.config().max_memory_bytes + 1;
    let err = rt.load("big", &wasm, settings).expect_err("over the pool");
    assert!(matches!(err, LoadError::Settings(_)), "{err:?}");
}

#[test]
fn same_bytes_are_the_same_version() {
    let rt = runtime();
    let wasm = std::fs::read(atoll_test_guests::HELLO).expect("built");
    let a = rt.load("a", &wasm, AppSettings::default()).expect("loads");
    let b = rt.load("b", &wasm, AppSettings::default()).expect("loads");
    assert_eq!(a.version(), b.version());
    assert_eq!(a.version(), &atoll_runtime::Version::of(&wasm));
}

#[test]
fn compiled_artifacts_are_cached_on_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = RuntimeConfig { cache_dir: Some(dir.path().to_owned()), ..RuntimeConfig::default() };
    let wasm = std::fs::read(atoll_test_guests::HELLO).expect("built");
    let version = Runtime::new(config.clone())
        .expect("rt")
        .load("a", &wasm, AppSettings::default())
        .expect("loads")
        .version()
        .clone();
    let artifact = dir.path().join(format!("{version}.cwasm"));
    assert!(artifact.exists(), "artifact written");
    // A corrupt artifact is ignored and replaced, never trusted.
    std::fs::write(&artifact, b"garbage").expect("write");
    Runtime::new(config).expect("rt").load("a", &wasm, AppSettings::default()).expect("still loads");
    assert_ne!(std::fs::read(&artifact).expect("read"), b"garbage");
}
