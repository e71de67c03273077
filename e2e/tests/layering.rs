//! The layering rule (docs/ARCHITECTURE.md): within each library crate no
//! two files import each other, directly or through others, and no product
//! file grows past the size limit.
//!
//! An edge A -> B is a reference from file A to an item of file B through a
//! `crate::` or `super::` path (in `use` or inline), outside `#[cfg(test)]`
//! code. A parent's `pub use child::Item` re-export is a facade, not an
//! edge; a reference through it counts as a reference to the child.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Longest product file (lines before its `#[cfg(test)]` module).
const MAX_LINES: usize = 600;

type ModPath = Vec<String>;

struct Crate {
    /// Module path -> file.
    files: BTreeMap<ModPath, PathBuf>,
    /// Module path -> code without its tests.
    code: BTreeMap<ModPath, String>,
    /// Module path -> (re-exported name -> module path of its origin).
    reexports: BTreeMap<ModPath, BTreeMap<String, ModPath>>,
}

fn strip_tests(text: &str) -> String {
    match text.find("#[cfg(test)]") {
        Some(i) => text[..i].to_string(),
        None => text.to_string(),
    }
}

fn strip_comments(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn module_path(src: &Path, file: &Path) -> Option<ModPath> {
    let rel = file.strip_prefix(src).ok()?;
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let last = parts.pop()?;
    let stem = last.strip_suffix(".rs")?.to_string();
    match stem.as_str() {
        "lib" if parts.is_empty() => {}
        "main" if parts.is_empty() => return None,
        "mod" => {}
        _ => parts.push(stem),
    }
    if parts.first().is_some_and(|p| p == "bin") {
        return None;
    }
    Some(parts)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Expands a use tree (`a::{b, c::d}`) into full paths.
fn expand(tree: &str, prefix: &[String], out: &mut Vec<ModPath>) {
    let tree = tree.trim();
    if let Some(open) = tree.find('{') {
        let head: Vec<String> = tree[..open]
            .split("::")
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        let mut base = prefix.to_vec();
        base.extend(head);
        let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
        let (mut depth, mut start) = (0, 0);
        for (i, ch) in inner.char_indices() {
            match ch {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    expand(&inner[start..i], &base, out);
                    start = i + 1;
                }
                _ => {}
            }
        }
        expand(&inner[start..], &base, out);
    } else if !tree.is_empty() {
        let mut p = prefix.to_vec();
        let tree = tree.split(" as ").next().unwrap_or(tree);
        p.extend(
            tree.split("::")
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from),
        );
        out.push(p);
    }
}

/// Makes a path relative to `crate::` or `super::` absolute (None: external).
fn absolute(from: &ModPath, path: &ModPath, is_mod_rs_or_root: bool) -> Option<ModPath> {
    let first = path.first()?;
    if first == "crate" {
        return Some(path[1..].to_vec());
    }
    if first == "super" || first == "self" {
        // The module a file's `super` names is its parent module.
        let mut base = from.clone();
        let mut rest = &path[..];
        while let Some(seg) = rest.first() {
            match seg.as_str() {
                "super" => {
                    base.pop()?;
                }
                "self" => {}
                _ => break,
            }
            rest = &rest[1..];
        }
        let _ = is_mod_rs_or_root;
        base.extend(rest.iter().cloned());
        return Some(base);
    }
    None
}

/// The `use` statements of `code` (with their `pub` flag).
fn uses(code: &str) -> Vec<(bool, String)> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("use ") {
        let before = &rest[..i];
        let at_statement = before
            .chars()
            .rev()
            .find(|c| !c.is_whitespace() && *c != ')' && *c != '(')
            .is_none_or(|c| matches!(c, ';' | '}' | '{' | ']') || before.ends_with("pub"));
        let is_pub = before.trim_end().ends_with("pub") || before.trim_end().ends_with(')');
        let Some(end) = rest[i..].find(';') else {
            break;
        };
        let stmt = &rest[i + 4..i + end];
        let word_start = i == 0
            || !rest[..i]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_alphanumeric() || c == '_');
        if at_statement && word_start {
            out.push((is_pub, stmt.to_string()));
        }
        rest = &rest[i + end..];
    }
    out
}

/// Inline `crate::a::b` / `super::a` paths outside `use` statements.
fn inline_paths(code: &str) -> Vec<ModPath> {
    let mut out = Vec::new();
    for anchor in ["crate::", "super::"] {
        let mut at = 0;
        while let Some(i) = code[at..].find(anchor) {
            let s = at + i;
            at = s + anchor.len();
            if s > 0
                && code[..s]
                    .chars()
                    .next_back()
                    .is_some_and(|c| c.is_alphanumeric() || c == '_')
            {
                continue;
            }
            let path: String = code[s..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            let segs: ModPath = path
                .split("::")
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect();
            out.push(segs);
        }
    }
    out
}

fn load(src: &Path) -> Crate {
    let mut paths = Vec::new();
    rust_files(src, &mut paths);
    let mut c = Crate {
        files: BTreeMap::new(),
        code: BTreeMap::new(),
        reexports: BTreeMap::new(),
    };
    for f in paths {
        let Some(m) = module_path(src, &f) else {
            continue;
        };
        let text = std::fs::read_to_string(&f).expect("read source");
        c.code
            .insert(m.clone(), strip_comments(&strip_tests(&text)));
        c.files.insert(m, f);
    }
    for (m, code) in &c.code {
        let mut map = BTreeMap::new();
        for (is_pub, stmt) in uses(code) {
            if !is_pub {
                continue;
            }
            let mut full = Vec::new();
            expand(&stmt, &[], &mut full);
            for p in full {
                let target = if p.first().is_some_and(|s| s == "crate" || s == "super") {
                    absolute(m, &p, true)
                } else {
                    // `pub use child::X` inside module m.
                    let mut abs = m.clone();
                    abs.extend(p.iter().cloned());
                    Some(abs)
                };
                if let (Some(name), Some(t)) = (p.last(), target) {
                    map.insert(name.clone(), t);
                }
            }
        }
        c.reexports.insert(m.clone(), map);
    }
    c
}

/// The file a path's item lives in: its longest module prefix, following
/// re-exports.
fn resolve(c: &Crate, path: &ModPath, depth: usize) -> Option<ModPath> {
    for n in (0..=path.len()).rev() {
        let prefix: ModPath = path[..n].to_vec();
        if !c.files.contains_key(&prefix) {
            continue;
        }
        if depth < 8
            && let Some(next) = path.get(n)
            && let Some(target) = c.reexports.get(&prefix).and_then(|r| r.get(next))
        {
            let mut t = target.clone();
            t.extend(path[n + 1..].iter().cloned());
            if t != *path {
                return resolve(c, &t, depth + 1).or(Some(prefix));
            }
        }
        return Some(prefix);
    }
    None
}

fn edges(c: &Crate) -> BTreeMap<ModPath, BTreeSet<ModPath>> {
    let mut g: BTreeMap<ModPath, BTreeSet<ModPath>> = BTreeMap::new();
    for (m, code) in &c.code {
        let mut refs = Vec::new();
        for (is_pub, stmt) in uses(code) {
            let mut full = Vec::new();
            expand(&stmt, &[], &mut full);
            for p in full {
                // A facade's re-export of its own child is not a dependency.
                let child_reexport = is_pub
                    && !p.first().is_some_and(|s| s == "crate" || s == "super")
                    && !p.is_empty();
                if child_reexport {
                    continue;
                }
                if let Some(abs) = absolute(m, &p, true) {
                    refs.push(abs);
                }
            }
        }
        for p in inline_paths(code) {
            if let Some(abs) = absolute(m, &p, true) {
                refs.push(abs);
            }
        }
        let out = g.entry(m.clone()).or_default();
        for r in refs {
            if let Some(target) = resolve(c, &r, 0)
                && target != *m
                // The crate root only declares modules and re-exports.
                && !target.is_empty()
            {
                out.insert(target);
            }
        }
    }
    g
}

fn find_cycle(g: &BTreeMap<ModPath, BTreeSet<ModPath>>) -> Option<Vec<ModPath>> {
    fn visit(
        n: &ModPath,
        g: &BTreeMap<ModPath, BTreeSet<ModPath>>,
        state: &mut BTreeMap<ModPath, u8>,
        stack: &mut Vec<ModPath>,
    ) -> Option<Vec<ModPath>> {
        state.insert(n.clone(), 1);
        stack.push(n.clone());
        for m in g.get(n).into_iter().flatten() {
            match state.get(m).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|x| x == m).unwrap_or(0);
                    let mut cyc = stack[at..].to_vec();
                    cyc.push(m.clone());
                    return Some(cyc);
                }
                0 => {
                    if let Some(c) = visit(m, g, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.clone(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in g.keys() {
        if state.get(n).copied().unwrap_or(0) == 0 {
            let mut stack = Vec::new();
            if let Some(c) = visit(n, g, &mut state, &mut stack) {
                return Some(c);
            }
        }
    }
    None
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn show(c: &Crate, cycle: &[ModPath]) -> String {
    cycle
        .iter()
        .map(|m| {
            c.files
                .get(m)
                .map(|f| f.display().to_string())
                .unwrap_or_else(|| m.join("::"))
        })
        .collect::<Vec<_>>()
        .join(" -> ")
}

#[test]
fn no_import_cycle_between_files_of_a_crate() {
    for krate in ["node", "client", "operator", "e2e"] {
        let c = load(&workspace().join(krate).join("src"));
        assert!(c.files.len() > 3, "{krate}: found too few files");
        let g = edges(&c);
        let total: usize = g.values().map(BTreeSet::len).sum();
        assert!(total > 0, "{krate}: found no imports");
        if let Some(cycle) = find_cycle(&g) {
            panic!("{krate}: import cycle {}", show(&c, &cycle));
        }
    }
}

#[test]
fn the_checker_finds_a_cycle_when_there_is_one() {
    let dir = std::env::temp_dir().join(format!("dc-layering-{}", std::process::id()));
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("a")).expect("dir");
    std::fs::write(src.join("lib.rs"), "mod a;\nmod b;\npub use b::Thing;\n").expect("write");
    std::fs::write(src.join("a/mod.rs"), "mod c;\nuse crate::Thing;\n").expect("write");
    std::fs::write(src.join("a/c.rs"), "pub struct C;\n").expect("write");
    std::fs::write(
        src.join("b.rs"),
        "use crate::a::c::C;\npub struct Thing;\n#[cfg(test)]\nmod t { use crate::a; }\n",
    )
    .expect("write");
    let c = load(&src);
    let g = edges(&c);
    assert!(find_cycle(&g).is_none(), "a -> b -> a/c is no cycle: {g:?}");
    std::fs::write(
        src.join("a/c.rs"),
        "pub struct C;\nfn f() { let _ = crate::b::Thing; }\n",
    )
    .expect("write");
    let c = load(&src);
    let cycle = find_cycle(&edges(&c)).expect("b -> a/c -> b is a cycle");
    assert!(cycle.len() >= 3, "{cycle:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn no_product_file_over_the_size_limit() {
    let mut over = Vec::new();
    for krate in ["node", "client", "operator"] {
        let mut files = Vec::new();
        rust_files(&workspace().join(krate).join("src"), &mut files);
        for f in files {
            let text = std::fs::read_to_string(&f).expect("read source");
            let lines = strip_tests(&text).lines().count();
            if lines > MAX_LINES {
                over.push(format!("{} ({lines} lines)", f.display()));
            }
        }
    }
    assert!(over.is_empty(), "files over {MAX_LINES} lines: {over:?}");
}
