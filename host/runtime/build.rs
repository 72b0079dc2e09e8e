//! Builds the guests in `guests/` for wasm32-wasip2 so that the runtime can embed the built-in
//! ones (see `src/builtin.rs`) and its tests can load the test guests.
//!
//! The guests are their own cargo workspace, built by a nested cargo with its own target
//! directory (so it never waits on the lock of the build that runs this script) and without the
//! outer build's compiler flags and wrappers (which are meant for the host target).

use std::path::{Path, PathBuf};
use std::process::Command;

const GUESTS: [&str; 5] = ["chat", "json", "best-of-n", "testbed", "bad-import"];

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let root = manifest.join("../..");
    let root = root.canonicalize().unwrap_or(root);
    let guests = root.join("guests");
    for p in [
        "guests/Cargo.toml",
        "guests/Cargo.lock",
        "guest-sdk/Cargo.toml",
        "guest-sdk/src",
        "wit",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    for g in GUESTS {
        println!(
            "cargo:rerun-if-changed={}",
            guests.join(g).join("Cargo.toml").display()
        );
        println!(
            "cargo:rerun-if-changed={}",
            guests.join(g).join("src").display()
        );
    }

    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    // <target>/<profile>/build/<pkg>-<hash>/out: share one guest target directory between
    // profiles and between `cargo build`, `test` and `clippy`, which each get their own OUT_DIR.
    let target_dir = out
        .ancestors()
        .nth(4)
        .map(|t| t.join("realm-guests"))
        .unwrap_or_else(|| out.join("realm-guests"));

    // Under rustup, the guests are built with the toolchain the repository pins
    // (rust-toolchain.toml, which lists the wasm32-wasip2 target), whatever toolchain builds the
    // host: `cargo +nightly fuzz` builds with a nightly that may lack the target. Through the
    // rustup proxy with its override removed, the nested cargo picks the pinned toolchain from
    // the guests' directory. Without rustup, the cargo that runs this script builds them.
    let under_rustup = std::env::var_os("RUSTUP_TOOLCHAIN").is_some()
        && Command::new("rustup")
            .arg("--version")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    let mut cmd = if under_rustup {
        let mut c = Command::new("cargo");
        c.env_remove("RUSTUP_TOOLCHAIN").env_remove("RUSTC");
        c
    } else {
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
    };
    cmd.current_dir(&guests)
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            "wasm32-wasip2",
        ])
        .arg("--manifest-path")
        .arg(guests.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    for g in GUESTS {
        cmd.args(["-p", g]);
    }
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTDOCFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_TARGET_DIR",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CLIPPY_ARGS",
        "CARGO_INCREMENTAL",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("could not run cargo to build the guests: {e}"));
    if !status.success() {
        panic!(
            "building the guests (cargo build --target wasm32-wasip2 in {}) failed; \
             is the wasm32-wasip2 target installed (rustup target add wasm32-wasip2)?",
            guests.display()
        );
    }
    let built = target_dir.join("wasm32-wasip2/release");
    let dest = out.join("guests");
    std::fs::create_dir_all(&dest).expect("create guests dir");
    for g in GUESTS {
        let file = format!("{}.wasm", g.replace('-', "_"));
        copy(&built.join(&file), &dest.join(&file));
    }
    println!("cargo:rustc-env=REALM_GUESTS_DIR={}", dest.display());
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to)
        .unwrap_or_else(|e| panic!("copying {} to {}: {e}", from.display(), to.display()));
}
