//! The layering of `src/`, checked from the source: a module may import (`use crate::…` or a
//! `crate::…` path) only from its own layer or the layers below it, so the picture in
//! `src/lib.rs` and the README stays true and no import circle comes back.
//!
//!   commands (cli, admin, top, tune) → server → shard → group, partition, cluster → log, quorum
//!
//! `config`, `metrics`, `alloc` and `notify` are leaves that every layer may use (and that use
//! only each other). A new top-level module fails this test until it is given a layer here.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Higher imports lower; equal ranks are peers.
fn rank(module: &str) -> Option<u8> {
    Some(match module {
        "config" | "metrics" | "alloc" | "notify" => 0,
        "log" | "quorum" => 1,
        "group" | "partition" | "cluster" => 2,
        "shard" => 3,
        "server" => 4,
        "cli" | "admin" | "top" | "tune" | "lib" | "main" => 5,
        _ => return None,
    })
}

/// Upward imports known to remain, each with the reason it is still there. An entry that is no
/// longer needed fails the test, so this list only shrinks.
const KNOWN: &[(&str, &str, &str)] = &[(
    "src/partition/mod.rs",
    "server",
    "Kafka error codes below the handlers (issue 7: one error type per layer)",
)];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src/") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file under `src/` belongs to (`src/server/handlers/fetch.rs` → server).
fn module_of(rel: &Path) -> String {
    let first = rel
        .components()
        .nth(1)
        .expect("a path under src/")
        .as_os_str()
        .to_string_lossy()
        .to_string();
    first.trim_end_matches(".rs").to_string()
}

/// The top-level modules a source text names through `crate::`, comments left out.
fn imported_modules(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            let before = rest[..i].chars().last();
            rest = &rest[i + "crate::".len()..];
            // `fjord_crate::x` or `my_crate::x` are not this crate.
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            if let Some(group) = rest.strip_prefix('{') {
                let inner = group.split('}').next().unwrap_or("");
                for item in inner.split(',') {
                    let name: String = item
                        .trim()
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() {
                        out.insert(name);
                    }
                }
                continue;
            }
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

/// Every (file, imported module) pair that goes up a layer.
fn upward_imports(root: &Path) -> Vec<(String, String)> {
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    files.sort();
    assert!(
        files.len() > 20,
        "found only {} files under src/",
        files.len()
    );
    let mut found = Vec::new();
    for path in files {
        let rel = path.strip_prefix(root).expect("under the root");
        let from = module_of(rel);
        let from_rank = rank(&from).unwrap_or_else(|| {
            panic!(
                "{}: module `{from}` has no layer in tests/layering.rs",
                rel.display()
            )
        });
        let text = std::fs::read_to_string(&path).expect("read a source file");
        for to in imported_modules(&text) {
            // `crate::foo` where foo is not a top-level module (a macro path, say) is no layer.
            let Some(to_rank) = rank(&to) else { continue };
            if to_rank > from_rank {
                found.push((rel.display().to_string(), to));
            }
        }
    }
    found
}

#[test]
fn no_module_imports_from_a_layer_above_it() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let found = upward_imports(root);
    let unexpected: Vec<String> = found
        .iter()
        .filter(|(file, to)| !KNOWN.iter().any(|(f, t, _)| f == file && t == to))
        .map(|(file, to)| format!("{file} imports crate::{to}, a layer above it"))
        .collect();
    assert!(
        unexpected.is_empty(),
        "upward imports (see the layers at the top of tests/layering.rs):\n{}",
        unexpected.join("\n")
    );
    let stale: Vec<String> = KNOWN
        .iter()
        .filter(|(f, t, _)| !found.iter().any(|(file, to)| file == f && to == t))
        .map(|(f, t, why)| format!("{f} → {t} ({why}) is gone: remove it from KNOWN"))
        .collect();
    assert!(stale.is_empty(), "{}", stale.join("\n"));
}

#[test]
fn the_scanner_sees_every_form_of_import() {
    let text = "use crate::shard::{invoke, Shard};\n\
                use crate::{log, server::errors};\n\
                let n = crate::metrics::cache_lookup(true); // crate::cli in a comment\n\
                let x = other_crate::group::y;\n";
    let got: Vec<String> = imported_modules(text).into_iter().collect();
    assert_eq!(got, vec!["log", "metrics", "server", "shard"]);
}
