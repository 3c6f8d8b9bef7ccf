//! The layering of `src/` as `src/lib.rs` draws it: every `use crate::…` points to the
//! importer's own layer or below, the module imports have no cycle, and every module is
//! on the map.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module → layer, read from the `layer N: a b c` lines of `src/lib.rs`.
fn map(lib: &str) -> BTreeMap<String, u32> {
    lib.lines()
        .filter_map(|l| l.trim_start_matches("//!").trim().strip_prefix("layer "))
        .flat_map(|l| {
            let (n, mods) = l.split_once(':').expect("layer N: modules");
            let n: u32 = n.trim().parse().expect("layer number");
            mods.split_whitespace()
                .map(move |m| (m.to_owned(), n))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Code without comments and without the `#[cfg(test)] mod tests` tail.
fn code(text: &str) -> String {
    let text = text
        .split("#[cfg(test)]\nmod tests")
        .next()
        .unwrap_or_default();
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Top-level module → the top-level modules it names as `crate::x`.
fn imports(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("rs") {
                continue;
            }
            let rel = path.strip_prefix(src).expect("under src");
            let first = rel.components().next().expect("component");
            let module = first
                .as_os_str()
                .to_str()
                .expect("utf-8")
                .trim_end_matches(".rs")
                .to_owned();
            if module == "lib" || module == "main" {
                continue;
            }
            let text = code(&std::fs::read_to_string(&path).expect("read"));
            let deps = out.entry(module.clone()).or_default();
            for (i, _) in text.match_indices("crate::") {
                let name: String = text[i + 7..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_' || c.is_ascii_digit())
                    .collect();
                if !name.is_empty() && name != module {
                    deps.insert(name);
                }
            }
        }
    }
    out
}

#[test]
fn imports_point_down_the_layers_and_have_no_cycle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let layers = map(&std::fs::read_to_string(root.join("src/lib.rs")).expect("lib.rs"));
    assert!(layers.len() > 10, "the layer map in src/lib.rs: {layers:?}");
    let graph = imports(&root.join("src"));

    let mut problems = Vec::new();
    for (module, deps) in &graph {
        let Some(&mine) = layers.get(module) else {
            problems.push(format!("{module} is not on the layer map in src/lib.rs"));
            continue;
        };
        for dep in deps {
            match layers.get(dep) {
                None => problems.push(format!("{module} → {dep}: {dep} is not on the map")),
                Some(&theirs) if theirs > mine => problems.push(format!(
                    "{module} (layer {mine}) imports {dep} (layer {theirs}): an upward arrow"
                )),
                Some(_) => {}
            }
        }
    }

    // No cycle, even within a layer: a depth-first search for a back edge.
    fn visit<'a>(
        m: &'a str,
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
        problems: &mut Vec<String>,
    ) {
        if let Some(at) = path.iter().position(|p| *p == m) {
            problems.push(format!("import cycle: {} → {m}", path[at..].join(" → ")));
            return;
        }
        if !done.insert(m) {
            return;
        }
        path.push(m);
        for dep in graph.get(m).into_iter().flatten() {
            visit(dep, graph, path, done, problems);
        }
        path.pop();
    }
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        visit(m, &graph, &mut Vec::new(), &mut done, &mut problems);
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_relying_party_library_needs_nothing_of_the_broker() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let graph = imports(&root.join("src"));
    let allowed: BTreeSet<&str> = [
        "domain",
        "jose",
        "checkpoint",
        "cosignature",
        "merkle",
        "clock",
        "http_client",
    ]
    .into();
    let deps = &graph["relying_party"];
    assert!(
        deps.iter().all(|d| allowed.contains(d.as_str())),
        "relying_party imports {deps:?}"
    );
}
