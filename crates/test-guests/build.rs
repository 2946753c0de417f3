//! Builds the `guests/` workspace for `wasm32-wasip2` and writes the path of each built component
//! into `$OUT_DIR/guests.rs`, as wasmtime's `crates/test-programs/artifacts` does.

use std::path::PathBuf;
use std::process::Command;

/// Each guest's component file name (without `.wasm`) and the constant naming it.
const GUESTS: &[(&str, &str)] = &[
    ("hello", "HELLO"),
    ("probe", "PROBE"),
    ("counter", "COUNTER"),
    ("todo", "TODO"),
    ("kv-draft", "KV_DRAFT"),
    // spin-sdk 7 (WASI 0.3) libraries: cdylib outputs are named with underscores.
    ("spin_hello", "SPIN_HELLO"),
    ("spin_counter", "SPIN_COUNTER"),
    ("probe3", "PROBE3"),
    ("spin_sqlite", "SPIN_SQLITE"),
    ("spin2", "SPIN2"),
];
const TARGET: &str = "wasm32-wasip2";

fn main() {
    let manifest_dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let guests = manifest_dir.join("../../guests").canonicalize().expect("the guests/ workspace exists");
    for path in [
        "Cargo.toml",
        "Cargo.lock",
        "hello",
        "counter",
        "todo",
        "spin-hello",
        "spin-counter",
        "testing",
        "../wit",
    ] {
        println!("cargo:rerun-if-changed={}", guests.join(path).display());
    }
    ensure_target();

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--release", "--target", TARGET, "--manifest-path"])
        .arg(guests.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", guests.join("target"));
    // The outer build's settings are for the host target, not for the guests.
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_WORKSPACE_WRAPPER",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("can run cargo to build the guests");
    assert!(status.success(), "building the guests/ workspace for {TARGET} failed");

    let out_dir = guests.join("target").join(TARGET).join("release");
    let mut generated = String::new();
    for (file, constant) in GUESTS {
        let wasm = out_dir.join(format!("{file}.wasm"));
        assert!(wasm.exists(), "guest {file} was not built at {}", wasm.display());
        generated.push_str(&format!(
            "/// The built `{file}` component (guests/).\npub const {constant}: &str = {:?};\n",
            wasm.display().to_string()
        ));
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("guests.rs");
    std::fs::write(out, generated).expect("can write guests.rs");
}

/// Installs the wasm32-wasip2 standard library through rustup when it is missing.
fn ensure_target() {
    let sysroot = Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    if sysroot.is_some_and(|root| root.join("lib/rustlib").join(TARGET).exists()) {
        return;
    }
    let status = Command::new("rustup").args(["target", "add", TARGET]).status();
    assert!(
        matches!(status, Ok(s) if s.success()),
        "the {TARGET} target is missing and `rustup target add {TARGET}` failed; install it and retry"
    );
}
