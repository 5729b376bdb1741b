//! Modules depend one way. At every folder level of data-loader, trainer and launch, the
//! sibling modules (the files and folders under one parent, the parent's own `mod.rs` or
//! `lib.rs` not counted) must not import each other in a loop; a child may use its own
//! parent's items. References are read from the code, test sections left out: `crate::X`,
//! `super::X` and `use crate::{X, ...}`, in `use` lines and inline paths alike.
//!
//! A failure names the loop and, for each step of it, one file and line that makes it.
//!
//! Each crate's top-level modules also stand on floors, as its `lib.rs` (or `main.rs`) lists
//! them and docs/architecture.md draws them: a module uses only modules on floors below its
//! own, never one on its own floor or above. [`FLOORS`] is that list, checked against the
//! code here: a module missing from it, or an import up or sideways, fails naming the file
//! and line.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// One source file: its module path (`["sources", "csv"]`; empty for `lib.rs`/`main.rs`),
/// a name for messages, and its text.
struct SourceFile {
    module: Vec<String>,
    name: String,
    text: String,
}

/// `from -> to` between siblings under `parent`, with where one reference making it is.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Edge {
    parent: Vec<String>,
    from: String,
    to: String,
}

/// Every `.rs` file under `src`, with its module path.
fn crate_files(src: &Path) -> Vec<SourceFile> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut paths = Vec::new();
    walk(src, &mut paths);
    paths
        .into_iter()
        .map(|path| {
            let relative = path.strip_prefix(src).unwrap();
            let mut module: Vec<String> = relative
                .with_extension("")
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if module.len() == 1 && (module[0] == "lib" || module[0] == "main") {
                module.clear();
            } else if module.last().is_some_and(|m| m == "mod") {
                module.pop();
            }
            SourceFile {
                module,
                name: relative.display().to_string(),
                text: std::fs::read_to_string(&path).unwrap(),
            }
        })
        .collect()
}

/// The code of `text` with comments, string and character literals and `#[cfg(test)]` items
/// blanked out (newlines kept, so positions keep their line).
fn code_only(text: &str) -> Vec<char> {
    let src: Vec<char> = text.chars().collect();
    let mut out = src.clone();
    let blank = |out: &mut Vec<char>, from: usize, to: usize| {
        for c in &mut out[from..to.min(src.len())] {
            if *c != '\n' {
                *c = ' ';
            }
        }
    };
    let mut i = 0;
    while i < src.len() {
        let rest = &src[i..];
        let starts = |s: &str| rest.iter().take(s.chars().count()).copied().eq(s.chars());
        if starts("//") {
            let end = src[i..].iter().position(|&c| c == '\n').map_or(src.len(), |p| i + p);
            blank(&mut out, i, end);
            i = end;
        } else if starts("/*") {
            let (mut depth, mut j) = (1, i + 2);
            while j < src.len() && depth > 0 {
                if src[j] == '/' && src.get(j + 1) == Some(&'*') {
                    depth += 1;
                    j += 1;
                } else if src[j] == '*' && src.get(j + 1) == Some(&'/') {
                    depth -= 1;
                    j += 1;
                }
                j += 1;
            }
            blank(&mut out, i, j);
            i = j;
        } else if (starts("r\"") || starts("r#") || starts("br\"") || starts("br#"))
            && (i == 0 || !is_ident(src[i - 1]))
        {
            let mut j = i + if src[i] == 'b' { 2 } else { 1 };
            let hashes = src[j..].iter().take_while(|&&c| c == '#').count();
            j += hashes;
            if src.get(j) != Some(&'"') {
                i += 1;
                continue;
            }
            j += 1;
            loop {
                if j >= src.len() {
                    break;
                }
                if src[j] == '"'
                    && src[j + 1..].iter().take(hashes).filter(|&&c| c == '#').count() == hashes
                {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            blank(&mut out, i, j);
            i = j;
        } else if src[i] == '"' {
            let mut j = i + 1;
            while j < src.len() && src[j] != '"' {
                j += if src[j] == '\\' { 2 } else { 1 };
            }
            blank(&mut out, i, j + 1);
            i = j + 1;
        } else if src[i] == '\'' {
            // A character literal ('x', '\n', '{'), else a lifetime ('a).
            let end = if src.get(i + 1) == Some(&'\\') {
                src[i + 3..].iter().position(|&c| c == '\'').map(|p| i + 3 + p)
            } else if src.get(i + 2) == Some(&'\'') {
                Some(i + 2)
            } else {
                None
            };
            match end {
                Some(end) => {
                    blank(&mut out, i, end + 1);
                    i = end + 1;
                }
                None => i += 1,
            }
        } else {
            i += 1;
        }
    }
    // Test sections: the item after `#[cfg(test)]`, to its `;` or its closing brace.
    let attr: Vec<char> = "#[cfg(test)]".chars().collect();
    let mut i = 0;
    while i + attr.len() <= out.len() {
        if out[i..i + attr.len()] != attr[..] {
            i += 1;
            continue;
        }
        let mut j = i + attr.len();
        while j < out.len() && out[j] != '{' && out[j] != ';' {
            j += 1;
        }
        if j < out.len() && out[j] == '{' {
            let mut depth = 0;
            while j < out.len() {
                match out[j] {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
        }
        let end = (j + 1).min(out.len());
        for c in &mut out[i..end] {
            if *c != '\n' {
                *c = ' ';
            }
        }
        i = end;
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The paths a `use` tree or inline path starting at `code[i]` (just after `crate::` or a
/// `super::` chain) names, each as segments; the index after it.
fn parse_tree(code: &[char], mut i: usize) -> (Vec<Vec<String>>, usize) {
    let skip_ws = |i: &mut usize| {
        while *i < code.len() && code[*i].is_whitespace() {
            *i += 1;
        }
    };
    let mut prefix = Vec::new();
    loop {
        skip_ws(&mut i);
        if i < code.len() && code[i] == '{' {
            let mut paths = Vec::new();
            i += 1;
            loop {
                skip_ws(&mut i);
                if i >= code.len() {
                    return (paths, i);
                }
                if code[i] == '}' {
                    i += 1;
                    break;
                }
                if code[i] == ',' {
                    i += 1;
                    continue;
                }
                let (inner, next) = parse_tree(code, i);
                paths.extend(inner.into_iter().map(|p| [prefix.clone(), p].concat()));
                // `as name` and anything else up to the next separator.
                i = next;
                while i < code.len() && code[i] != ',' && code[i] != '}' {
                    i += 1;
                }
            }
            return (paths, i);
        }
        let start = i;
        while i < code.len() && is_ident(code[i]) {
            i += 1;
        }
        if i == start {
            // `*` or nothing: the path so far.
            return (vec![prefix], i);
        }
        let segment: String = code[start..i].iter().collect();
        if segment != "self" {
            prefix.push(segment);
        }
        let mut j = i;
        skip_ws(&mut j);
        if code.get(j) == Some(&':') && code.get(j + 1) == Some(&':') {
            i = j + 2;
        } else {
            return (vec![prefix], i);
        }
    }
}

/// Every sibling-level edge the file makes, with the line of each reference.
fn file_edges(file: &SourceFile, modules: &BTreeSet<Vec<String>>) -> Vec<(Edge, usize)> {
    let code = code_only(&file.text);
    let mut edges = Vec::new();
    let mut i = 0;
    while i < code.len() {
        if !is_ident(code[i]) || (i > 0 && (is_ident(code[i - 1]) || code[i - 1] == ':')) {
            i += 1;
            continue;
        }
        let start = i;
        let mut base: Option<Vec<String>> = None;
        let mut j = i;
        let word =
            |j: usize| -> String { code[j..].iter().take_while(|&&c| is_ident(c)).collect() };
        let first = word(j);
        if first == "crate" {
            base = Some(Vec::new());
            j += 5;
        } else if first == "super" {
            let mut module = file.module.clone();
            while word(j) == "super" {
                module.pop();
                j += 5;
                if code.get(j) == Some(&':')
                    && code.get(j + 1) == Some(&':')
                    && word(j + 2) == "super"
                {
                    j += 2;
                }
            }
            base = Some(module);
        }
        let Some(base) = base else {
            i += first.chars().count().max(1);
            continue;
        };
        if !(code.get(j) == Some(&':') && code.get(j + 1) == Some(&':')) {
            i = j;
            continue;
        }
        let (paths, next) = parse_tree(&code, j + 2);
        let line = code[..start].iter().filter(|&&c| c == '\n').count() + 1;
        for path in paths {
            let target = [base.clone(), path].concat();
            let p = file.module.iter().zip(&target).take_while(|(a, b)| a == b).count();
            if p >= file.module.len() || p >= target.len() {
                continue; // inside this module, or one of its ancestors itself
            }
            if !modules.contains(&target[..=p].to_vec()) {
                continue; // an item of the common parent
            }
            let edge = Edge {
                parent: file.module[..p].to_vec(),
                from: file.module[p].clone(),
                to: target[p].clone(),
            };
            edges.push((edge, line));
        }
        i = next.max(j + 2);
    }
    edges
}

/// Every loop between sibling modules of `files`, one line each:
/// `sources: a -> b (a.rs:3) -> a (b.rs:9)`.
fn loops(files: &[SourceFile]) -> Vec<String> {
    let modules: BTreeSet<Vec<String>> =
        files.iter().flat_map(|f| (1..=f.module.len()).map(|n| f.module[..n].to_vec())).collect();
    let mut graph: BTreeMap<Vec<String>, BTreeMap<String, BTreeMap<String, String>>> =
        BTreeMap::new();
    for file in files {
        for (edge, line) in file_edges(file, &modules) {
            graph
                .entry(edge.parent)
                .or_default()
                .entry(edge.from)
                .or_default()
                .entry(edge.to)
                .or_insert_with(|| format!("{}:{line}", file.name));
        }
    }
    let mut found = Vec::new();
    for (parent, edges) in &graph {
        let level = if parent.is_empty() { "crate root".to_owned() } else { parent.join("::") };
        let mut reported: BTreeSet<BTreeSet<String>> = BTreeSet::new();
        for start in edges.keys() {
            if let Some(cycle) = cycle_from(edges, start) {
                let members: BTreeSet<String> = cycle.iter().cloned().collect();
                if !reported.insert(members) {
                    continue;
                }
                let mut text = format!("{level}: {}", cycle[0]);
                for pair in cycle
                    .windows(2)
                    .chain(std::iter::once(&[cycle[cycle.len() - 1].clone(), cycle[0].clone()][..]))
                {
                    text += &format!(" -> {} ({})", pair[1], edges[&pair[0]][&pair[1]]);
                }
                found.push(text);
            }
        }
    }
    found
}

/// A loop through `start`, as its modules in order, if there is one.
fn cycle_from(
    edges: &BTreeMap<String, BTreeMap<String, String>>,
    start: &str,
) -> Option<Vec<String>> {
    fn dfs(
        edges: &BTreeMap<String, BTreeMap<String, String>>,
        node: &str,
        start: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for next in edges.get(node).into_iter().flat_map(|m| m.keys()) {
            if next == start {
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if dfs(edges, next, start, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.to_owned()];
    let mut seen = BTreeSet::from([start.to_owned()]);
    dfs(edges, start, start, &mut path, &mut seen).then_some(path)
}

fn assert_no_loops(crate_dir: &str) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(crate_dir).join("src");
    let files = crate_files(&src);
    assert!(files.len() > 3, "found only {} files under {}", files.len(), src.display());
    let found = loops(&files);
    assert!(
        found.is_empty(),
        "{crate_dir}/src has import loops between sibling modules (make one side stop using \
         the other, or move what both need below them):\n  {}",
        found.join("\n  ")
    );
}

/// Each crate's top-level modules, floor by floor, bottom up (as its `lib.rs`/`main.rs` and
/// docs/architecture.md list them). A module uses only modules on lower floors.
const FLOORS: &[(&str, &[&[&str]])] = &[
    (
        "data-loader",
        &[
            &["skip", "seed"],
            &["error"],
            &["parallel", "formats", "tokenizer", "augment"],
            &["transform"],
            &["sources"],
            &["plan"],
            &["pipeline"],
            &["loader"],
            &["tools"],
        ],
    ),
    (
        "trainer",
        &[
            &["error", "schedule", "fault", "json_keys"],
            &["bytes", "device", "generate", "metrics", "optim", "precision", "run_lock"],
            &["model"],
            &["interchange", "prepare"],
            &["config"],
            &["collectives", "loss", "checkpoint", "infer"],
            &["grad_sync", "preempt", "weights_path", "eval"],
            &["step"],
            &["train", "bench"],
        ],
    ),
    ("launch", &[&["dist", "progress"], &["commands"]]),
];

/// Every top-level import of `files` that does not point to a lower floor, one line each:
/// `transform -> augment (transform.rs:12): floor 2 uses floor 2`; and every top-level module
/// `floors` does not place.
fn floor_violations(files: &[SourceFile], floors: &[&[&str]]) -> Vec<String> {
    let floor_of = |m: &str| floors.iter().position(|f| f.contains(&m));
    let modules: BTreeSet<Vec<String>> =
        files.iter().flat_map(|f| (1..=f.module.len()).map(|n| f.module[..n].to_vec())).collect();
    let mut found = BTreeSet::new();
    for top in modules.iter().filter(|m| m.len() == 1) {
        if floor_of(&top[0]).is_none() {
            found.insert(format!("`{}` is on no floor: add it to FLOORS and the docs", top[0]));
        }
    }
    for file in files {
        for (edge, line) in file_edges(file, &modules) {
            if !edge.parent.is_empty() {
                continue;
            }
            let (Some(from), Some(to)) = (floor_of(&edge.from), floor_of(&edge.to)) else {
                continue;
            };
            if to >= from {
                found.insert(format!(
                    "{} -> {} ({}:{line}): floor {from} uses floor {to}",
                    edge.from, edge.to, file.name
                ));
            }
        }
    }
    found.into_iter().collect()
}

fn assert_floors(crate_dir: &str) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(crate_dir).join("src");
    let floors = FLOORS.iter().find(|(c, _)| *c == crate_dir).map(|(_, f)| *f).unwrap();
    let found = floor_violations(&crate_files(&src), floors);
    assert!(
        found.is_empty(),
        "{crate_dir}/src: imports that do not go down a floor (move the shared part below \
         both, or change the floors in FLOORS, lib.rs and docs/architecture.md):\n  {}",
        found.join("\n  ")
    );
}

#[test]
fn data_loader_modules_use_only_lower_floors() {
    assert_floors("data-loader");
}

#[test]
fn trainer_modules_use_only_lower_floors() {
    assert_floors("trainer");
}

#[test]
fn launch_modules_use_only_lower_floors() {
    assert_floors("launch");
}

#[test]
fn a_same_floor_import_and_an_unplaced_module_are_named() {
    let files = [
        file("", "pub mod a;\npub mod b;\npub mod c;\npub mod d;\n"),
        file("a", "pub struct A;\n"),
        file("b", "use crate::a::A;\n"),
        file("c", "\nuse crate::b::B;\n"),
        file("d", "pub struct D;\n"),
    ];
    let floors: &[&[&str]] = &[&["a"], &["b", "c"]];
    assert_eq!(
        floor_violations(&files, floors),
        [
            "`d` is on no floor: add it to FLOORS and the docs",
            "c -> b (c.rs:2): floor 1 uses floor 1"
        ]
    );
}

#[test]
fn data_loader_modules_have_no_import_loops() {
    assert_no_loops("data-loader");
}

#[test]
fn trainer_modules_have_no_import_loops() {
    assert_no_loops("trainer");
}

#[test]
fn launch_modules_have_no_import_loops() {
    assert_no_loops("launch");
}

fn file(module: &str, text: &str) -> SourceFile {
    SourceFile {
        module: if module.is_empty() {
            Vec::new()
        } else {
            module.split("::").map(str::to_owned).collect()
        },
        name: format!("{module}.rs"),
        text: text.to_owned(),
    }
}

#[test]
fn a_two_module_loop_is_found_and_named() {
    let files = [
        file("", "pub mod a;\npub mod b;\npub use a::Thing;\n"),
        file("a", "use crate::{b::{self, Other}, error::E};\npub struct Thing;\n"),
        file("b", "pub struct Other;\n\nfn f() {\n    let _ = crate::a::Thing;\n}\n"),
        file("error", "pub struct E;\n"),
    ];
    let found = loops(&files);
    assert_eq!(found, ["crate root: a -> b (a.rs:1) -> a (b.rs:4)"]);

    // Through `super::` inside a folder, too.
    let files = [
        file("", "pub mod p;\n"),
        file("p", "pub mod x;\npub mod y;\npub struct Shared;\n"),
        file("p::x", "use super::y::Y;\npub struct X;\n"),
        file("p::y", "pub struct Y(super::x::X);\n"),
    ];
    assert_eq!(loops(&files), ["p: x -> y (p::x.rs:1) -> x (p::y.rs:1)"]);
}

#[test]
fn parents_tests_comments_and_strings_are_not_loops() {
    let files = [
        file("", "pub mod a;\npub mod b;\npub struct Root;\n"),
        // a uses b; b uses only its parent's items, a comment, a string and a test of a.
        file("a", "use crate::b::B;\nuse super::Root;\n"),
        file(
            "b",
            "use crate::Root;\n/// See [`A`](crate::a::A).\n// crate::a::A\n\
             const S: &str = \"crate::a::A\";\nconst C: char = '{';\n\
             #[cfg(test)]\nmod tests {\n    use crate::a::A;\n    fn f() { let _ = '}'; }\n}\n",
        ),
    ];
    assert!(loops(&files).is_empty(), "{:?}", loops(&files));
}
