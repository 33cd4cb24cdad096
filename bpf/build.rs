//! Compiles `src/capture.bpf.c` and `src/splice.bpf.c` into BPF ELF objects
//! with clang and leaves them in `OUT_DIR` for `include_bytes!`. This is the one place C becomes bytes:
//! each object carries BTF (`-g`) so aya can load BTF-defined maps and the
//! layout test in `common` can check the shared structs against it.
//!
//! clang is found as `$CLANG`, else `clang-19`, else `clang`. Its absence is a
//! one-line error that says what to install.
use std::{env, path::PathBuf, process::Command};

fn main() {
    for f in ["src/capture.bpf.c", "src/capture.h", "src/splice.bpf.c", "src/splice.h"] {
        println!("cargo:rerun-if-changed={f}");
    }
    println!("cargo:rerun-if-env-changed=CLANG");

    let clang = find_clang().unwrap_or_else(|| {
        eprintln!(
            "error: no clang found to compile the eBPF programs: install it (Debian: \
             `apt-get install clang-19 libbpf-dev`) or set CLANG=/path/to/clang"
        );
        std::process::exit(1);
    });

    for name in ["capture", "splice"] {
        compile(&clang, name);
    }
}

/// Compiles `src/{name}.bpf.c` into `$OUT_DIR/{name}.bpf.o`, or exits with
/// what to install.
fn compile(clang: &str, name: &str) {
    let src = PathBuf::from(format!("src/{name}.bpf.c"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join(format!("{name}.bpf.o"));
    // Debian keeps <asm/types.h> under the multiarch directory; the BPF target
    // does not search it by itself.
    let arch = env::var("CARGO_CFG_TARGET_ARCH").expect("cargo sets the target arch");
    let multiarch = format!("/usr/include/{arch}-linux-gnu");
    let status = Command::new(clang)
        .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
        .arg(format!("-I{multiarch}"))
        .arg("-c")
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => {
            eprintln!(
                "error: {clang} failed ({s}) compiling {}; libbpf headers come from \
                 `apt-get install libbpf-dev`",
                src.display()
            );
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("error: could not run {clang}: {e}");
            std::process::exit(1);
        }
    }
    println!("cargo:{name}_object={}", out.display());
}

fn find_clang() -> Option<String> {
    env::var("CLANG")
        .ok()
        .into_iter()
        .chain(["clang-19".to_string(), "clang".to_string()])
        .find(|c| Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()))
}
