//! Keeps ARCHITECTURE.md's map true: every source file of the product
//! crates is named in its crate's section, and the modules of each crate
//! use each other without a cycle (a cycle is what makes a layer impossible
//! to change or replace on its own, e.g. the storage backend).
//!
//! Reads the sources as text: a `use crate::x` or a `crate::x::` path in
//! top-level module `m` is an edge m → x. `lib.rs`, `main.rs` and `bin/`
//! are roots, not layers, so they are left out of the graph.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// The crates the map covers, as (folder, section heading in
/// ARCHITECTURE.md).
const CRATES: [(&str, &str); 3] = [
    ("protocol/src", "### protocol/src"),
    ("server/src", "### server/src"),
    ("client-sdk/src", "### client-sdk/src"),
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every `.rs` file below `dir`, as paths relative to it with `/`.
fn sources(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display())) {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                walk(root, &path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path.strip_prefix(root).expect("below the root");
                out.push(rel.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// The text of ARCHITECTURE.md's section under `heading`, up to the next
/// heading of the same or a higher level.
fn section<'a>(doc: &'a str, heading: &str) -> &'a str {
    let start = doc
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("ARCHITECTURE.md has no section {heading:?}"))
        + heading.len()
        + 2;
    let rest = &doc[start..];
    let end = ["\n## ", "\n### "]
        .iter()
        .filter_map(|h| rest.find(h))
        .min()
        .unwrap_or(rest.len());
    &rest[..end]
}

#[test]
fn every_source_file_is_on_the_map() {
    let doc = fs::read_to_string(repo().join("ARCHITECTURE.md")).expect("read ARCHITECTURE.md");
    let mut missing = Vec::new();
    for (dir, heading) in CRATES {
        let text = section(&doc, heading);
        for file in sources(&repo().join(dir)) {
            if !text.contains(&format!("`{file}`")) {
                missing.push(format!("{dir}/{file}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md does not name these files in their crate's section \
         (add a line saying what each does and may touch): {missing:?}"
    );
}

/// The top-level module a source file belongs to, or None for a crate
/// root (`lib.rs`, `main.rs`, a binary).
fn module_of(file: &str) -> Option<&str> {
    if file == "lib.rs" || file == "main.rs" || file.starts_with("bin/") {
        return None;
    }
    Some(file.split('/').next()?.trim_end_matches(".rs"))
}

/// The top-level modules `src` names through `crate::`, comments left out.
fn uses(src: &str) -> BTreeSet<String> {
    let code: String = src
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a, b::{c, d}, e}`: the first name of each item at
            // depth 0 of the group.
            let mut depth = 0;
            let mut item_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && !c.is_whitespace() => {
                        out.insert(ident(&group[i..]));
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(ident(rest));
        }
    }
    out.retain(|m| !m.is_empty());
    out
}

/// A cycle in `graph`, as the modules along it, if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        marks: &mut BTreeMap<String, Mark>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        marks.insert(node.to_owned(), Mark::Open);
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            match marks.get(next.as_str()) {
                Some(Mark::Open) => {
                    let from = path.iter().position(|n| n == next).expect("on the path");
                    let mut cycle = path[from..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Some(Mark::Done) => {}
                None => {
                    if let Some(c) = visit(next, graph, marks, path) {
                        return Some(c);
                    }
                }
            }
        }
        path.pop();
        marks.insert(node.to_owned(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for node in graph.keys() {
        if !marks.contains_key(node.as_str()) {
            if let Some(c) = visit(node, graph, &mut marks, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn no_crate_has_a_module_cycle() {
    for (dir, _) in CRATES {
        let root = repo().join(dir);
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for file in sources(&root) {
            let Some(module) = module_of(&file) else {
                continue;
            };
            let src = fs::read_to_string(root.join(&file)).expect("read a source file");
            let edges = graph.entry(module.to_owned()).or_default();
            edges.extend(uses(&src).into_iter().filter(|m| m != module));
        }
        assert!(
            graph.len() > 3,
            "{dir}: found only {} modules; is the path right?",
            graph.len()
        );
        if let Some(cycle) = find_cycle(&graph) {
            panic!(
                "{dir}: modules use each other in a cycle: {}",
                cycle.join(" → ")
            );
        }
    }
}

#[test]
fn the_reader_of_uses_sees_groups_paths_and_no_comments() {
    let src = "use crate::a::X;\nuse crate::{b, c::{D, E}, d::F};\n\
               fn f() { crate::e::g(); } // crate::h\n";
    let got: Vec<String> = uses(src).into_iter().collect();
    assert_eq!(got, ["a", "b", "c", "d", "e"]);
    let mut g = BTreeMap::new();
    g.insert("a".to_owned(), BTreeSet::from(["b".to_owned()]));
    g.insert("b".to_owned(), BTreeSet::from(["c".to_owned()]));
    assert_eq!(find_cycle(&g), None);
    g.insert("c".to_owned(), BTreeSet::from(["a".to_owned()]));
    assert_eq!(
        find_cycle(&g),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
}
