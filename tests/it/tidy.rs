//! Repository rules, as plain tests that read the tree: which lockstep
//! crate may use which (and that the simulator and its dependencies stay
//! out of the facade's build), where SQLite and the binaries' dependencies may
//! appear, and a `//!` header at the top of every Rust file.
//!
//! The manifests are read by a line parser, not a TOML library: section
//! headers and the key before `=` (or before `.workspace`) are all it needs.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// The allowed direction of dependencies between the crates in `crates/`:
/// each package and the lockstep packages it may use (`None`: any).
const GRAPH: &[(&str, Option<&[&str]>)] = &[
    (
        "lockstep",
        Some(&[
            "lockstep-manager",
            "lockstep-dispatcher",
            "lockstep-actions",
            "lockstep-wallet",
            "lockstep-filter",
            "lockstep-chain",
            "lockstep-store",
        ]),
    ),
    ("lockstep-cli", None),
    (
        "lockstep-testkit",
        Some(&[
            "lockstep-sim",
            "lockstep-chain",
            "lockstep-store",
            "lockstep-wallet",
            "lockstep-manager",
            "lockstep-filter",
        ]),
    ),
    (
        "lockstep-actions",
        Some(&[
            "lockstep-dispatcher",
            "lockstep-wallet",
            "lockstep-chain",
            "lockstep-store",
        ]),
    ),
    (
        "lockstep-manager",
        Some(&[
            "lockstep-wallet",
            "lockstep-filter",
            "lockstep-chain",
            "lockstep-store",
            "lockstep-error",
        ]),
    ),
    ("lockstep-dispatcher", Some(&[])),
    ("lockstep-wallet", Some(&["lockstep-store"])),
    ("lockstep-filter", Some(&[])),
    ("lockstep-sim", Some(&["lockstep-chain"])),
    ("lockstep-chain", Some(&["lockstep-error"])),
    ("lockstep-store", Some(&["lockstep-error"])),
    ("lockstep-error", Some(&[])),
];

/// The repository's root (this package is `tests/`).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Which table of a manifest a dependency is listed in.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// `[dependencies]`, `[build-dependencies]` and their `target.…` forms.
    Normal,
    /// `[dev-dependencies]` and its `target.…` form.
    Dev,
}

impl Kind {
    fn table(self) -> &'static str {
        match self {
            Kind::Normal => "[dependencies]",
            Kind::Dev => "[dev-dependencies]",
        }
    }
}

/// One package's manifest: its name and the dependencies it lists.
struct Manifest {
    /// The manifest's path, relative to the root.
    path: String,
    name: String,
    deps: Vec<(Kind, String)>,
    /// The dependencies listed with `optional = true` (behind a feature).
    optional: BTreeSet<String>,
}

/// The dependency table a section header opens, and the dependency it names
/// if it is of the `[dependencies.NAME]` form.
fn section(header: &str) -> Option<(Kind, Option<String>)> {
    let header = header.trim_matches(|c| c == '[' || c == ']').trim();
    for (table, kind) in [
        ("dev-dependencies", Kind::Dev),
        ("build-dependencies", Kind::Normal),
        ("dependencies", Kind::Normal),
    ] {
        if header == table || header.ends_with(&format!(".{table}")) {
            return Some((kind, None));
        }
        if let Some(name) = header.strip_prefix(&format!("{table}.")) {
            return Some((kind, Some(name.trim_matches('"').to_string())));
        }
        if let Some((_, name)) = header.split_once(&format!(".{table}.")) {
            return Some((kind, Some(name.trim_matches('"').to_string())));
        }
    }
    None
}

/// Reads a package manifest with a line parser.
fn manifest(path: &Path) -> Manifest {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut name = None;
    let mut deps = Vec::new();
    let mut optional = BTreeSet::new();
    let mut in_package = false;
    let mut table = None;
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.starts_with('[') {
            in_package = line == "[package]";
            table = match section(line) {
                Some((kind, Some(named))) => {
                    deps.push((kind, named));
                    // The keys of a [dependencies.NAME] table are not deps.
                    None
                }
                Some((kind, None)) => Some(kind),
                None => None,
            };
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim();
        if in_package && key == "name" {
            name = Some(value.trim().trim_matches('"').to_string());
        }
        if let Some(kind) = table {
            let dep = key.split('.').next().unwrap_or(key).trim_matches('"');
            if !dep.is_empty() {
                deps.push((kind, dep.to_string()));
                if value.replace(' ', "").contains("optional=true") {
                    optional.insert(dep.to_string());
                }
            }
        }
    }
    Manifest {
        path: relative(path),
        name: name.unwrap_or_else(|| panic!("{}: no [package] name", path.display())),
        deps,
        optional,
    }
}

/// A path relative to the root, with `/` separators.
fn relative(path: &Path) -> String {
    path.strip_prefix(root())
        .unwrap_or(path)
        .to_string_lossy()
        .replace('\\', "/")
}

/// The manifests of the packages in `crates/`, by directory name.
fn crate_manifests() -> BTreeMap<String, Manifest> {
    let mut out = BTreeMap::new();
    for entry in fs::read_dir(root().join("crates")).expect("crates/ is readable") {
        let dir = entry.expect("a crates/ entry").path();
        let path = dir.join("Cargo.toml");
        if path.is_file() {
            let dir = dir.file_name().unwrap().to_string_lossy().into_owned();
            out.insert(dir, manifest(&path));
        }
    }
    assert!(!out.is_empty(), "no crates found under crates/");
    out
}

/// The manifests of the packages in `crates/`, by package name (what the
/// dependency lists name).
fn crate_manifests_by_package() -> BTreeMap<String, Manifest> {
    crate_manifests()
        .into_values()
        .map(|manifest| (manifest.name.clone(), manifest))
        .collect()
}

/// Every package manifest of the workspace: `crates/*`, `tests`, `benches`
/// and `xtask`.
fn all_manifests() -> Vec<Manifest> {
    let mut out: Vec<Manifest> = crate_manifests().into_values().collect();
    for dir in ["tests", "benches", "xtask"] {
        out.push(manifest(&root().join(dir).join("Cargo.toml")));
    }
    out
}

/// Is `dir` the root of a workspace of its own (say, a cargo-fuzz crate)?
fn own_workspace(dir: &Path) -> bool {
    fs::read_to_string(dir.join("Cargo.toml"))
        .is_ok_and(|text| text.lines().any(|line| line.trim() == "[workspace]"))
}

/// The `.rs` files below `dir`, skipping `target/` and nested workspaces.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        let name = path.file_name().unwrap().to_string_lossy();
        if path.is_dir() {
            if name != "target" && !name.starts_with('.') && !own_workspace(&path) {
                rust_files(&path, out);
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

/// Every Rust file of the workspace's packages, with its text.
fn sources() -> Vec<(String, String)> {
    let mut files = Vec::new();
    for dir in ["crates", "tests", "benches", "xtask"] {
        rust_files(&root().join(dir), &mut files);
    }
    assert!(!files.is_empty(), "no Rust files found");
    files
        .into_iter()
        .map(|path| {
            let text =
                fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            (relative(&path), text)
        })
        .collect()
}

/// Fails with every broken rule, one a line.
fn assert_none(rule: &str, broken: Vec<String>) {
    assert!(broken.is_empty(), "{rule}:\n  {}", broken.join("\n  "));
}

/// The lockstep packages `name` may use, or `None` for any.
fn allowed(name: &str) -> Option<Option<&'static [&'static str]>> {
    GRAPH
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, uses)| *uses)
}

/// The packages `name` uses, directly or not, in the allowed graph.
fn uses_transitively(name: &str) -> BTreeSet<&'static str> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![name.to_string()];
    while let Some(next) = todo.pop() {
        let uses: Vec<&'static str> = match allowed(&next) {
            Some(Some(uses)) => uses.to_vec(),
            Some(None) => GRAPH.iter().map(|(n, _)| *n).collect(),
            None => Vec::new(),
        };
        for used in uses {
            if seen.insert(used) {
                todo.push(used.to_string());
            }
        }
    }
    seen
}

/// Each crate in `crates/` uses only the lockstep crates the graph lets it:
/// in `[dependencies]`, the graph's arrows; in `[dev-dependencies]`, any
/// lockstep crate that does not itself use this one (a test may build on a
/// lower crate, such as the simulated chain, but never on a crate above it,
/// the facade, the CLI or the test kit that wrap it).
#[test]
fn crates_depend_only_in_the_allowed_direction() {
    let mut broken = Vec::new();
    for manifest in crate_manifests().values() {
        let name = manifest.name.as_str();
        let Some(uses) = allowed(name) else {
            broken.push(format!(
                "{}: the package {name} is not in the dependency graph (add it to GRAPH in tests/it/tidy.rs)",
                manifest.path
            ));
            continue;
        };
        for (kind, dep) in &manifest.deps {
            if dep != "lockstep" && !dep.starts_with("lockstep-") {
                continue;
            }
            let ok = match (kind, uses) {
                (_, None) => true,
                (Kind::Normal, Some(uses)) => uses.contains(&dep.as_str()),
                (Kind::Dev, Some(_)) => {
                    allowed(dep).is_some() && dep != name && !uses_transitively(dep).contains(name)
                }
            };
            if !ok {
                broken.push(format!(
                    "{name} -> {dep} in {} of {} is a forbidden edge ({name} may use: {})",
                    kind.table(),
                    manifest.path,
                    match kind {
                        Kind::Normal => uses.map_or("any".into(), |u| u.join(", ")),
                        Kind::Dev => "lockstep crates that do not use it".into(),
                    }
                ));
            }
        }
    }
    assert_none("dependencies against the allowed direction", broken);
}

/// The lockstep packages `manifest` lists in `[dependencies]`.
fn normal_lockstep_deps(manifest: &Manifest) -> BTreeSet<&str> {
    manifest
        .deps
        .iter()
        .filter(|(kind, dep)| {
            *kind == Kind::Normal && (dep == "lockstep" || dep.starts_with("lockstep-"))
        })
        .map(|(_, dep)| dep.as_str())
        .collect()
}

/// The crate arrows that keep production code apart from the simulator,
/// read from the manifests themselves (not from [`GRAPH`], so that loosening
/// the graph cannot loosen them): the chain contract, the filter matcher
/// and the store depend on no lockstep crate; the simulator only on the
/// chain contract (and the filter matcher); and nothing the facade pulls
/// in, directly or through another lockstep crate, is the simulator.
#[test]
fn the_simulator_stays_out_of_production_crates() {
    let manifests = crate_manifests_by_package();
    let mut broken = Vec::new();
    for (name, may_use) in [
        ("lockstep-chain", &["lockstep-error"][..]),
        ("lockstep-filter", &[][..]),
        ("lockstep-store", &["lockstep-error"][..]),
        ("lockstep-sim", &["lockstep-chain", "lockstep-filter"][..]),
    ] {
        let Some(manifest) = manifests.get(name) else {
            broken.push(format!("no package {name} in crates/"));
            continue;
        };
        for dep in normal_lockstep_deps(manifest) {
            if !may_use.contains(&dep) {
                broken.push(format!(
                    "{} lists {dep} in [dependencies] ({name} may use: {})",
                    manifest.path,
                    if may_use.is_empty() {
                        "no lockstep crate".to_owned()
                    } else {
                        may_use.join(", ")
                    }
                ));
            }
        }
    }
    // The facade's normal closure, through the manifests.
    let mut seen = BTreeSet::from(["lockstep"]);
    let mut todo = vec!["lockstep"];
    while let Some(next) = todo.pop() {
        let Some(manifest) = manifests.get(next) else {
            continue;
        };
        for dep in normal_lockstep_deps(manifest) {
            if dep == "lockstep-sim" {
                broken.push(format!(
                    "{} lists lockstep-sim in [dependencies], and the facade depends on {next}",
                    manifest.path
                ));
            }
            if seen.insert(dep) {
                todo.push(dep);
            }
        }
    }
    assert_none("arrows from production crates to the simulator", broken);
}

/// The dependencies of the simulator (its RNG, HTTP server and script
/// interpreter) appear in no crate the facade pulls in, and `zeromq` only
/// behind a feature: an embedder builds none of them by default.
#[test]
fn the_facade_pulls_no_simulator_dependency() {
    let manifests = crate_manifests_by_package();
    let mut closure = BTreeSet::from(["lockstep"]);
    let mut todo = vec!["lockstep"];
    while let Some(next) = todo.pop() {
        if let Some(manifest) = manifests.get(next) {
            for dep in normal_lockstep_deps(manifest) {
                if closure.insert(dep) {
                    todo.push(dep);
                }
            }
        }
    }
    let forbidden = [
        "rand",
        "rand_chacha",
        "hyper",
        "hyper-util",
        "http-body-util",
        "bitcoinconsensus",
    ];
    let mut broken = Vec::new();
    for name in &closure {
        let Some(manifest) = manifests.get(*name) else {
            continue;
        };
        for (kind, dep) in &manifest.deps {
            if *kind != Kind::Normal {
                continue;
            }
            if forbidden.contains(&dep.as_str()) {
                broken.push(format!(
                    "{} lists {dep} in [dependencies] (the facade depends on {name})",
                    manifest.path
                ));
            }
            if dep == "zeromq" && !manifest.optional.contains(dep) {
                broken.push(format!(
                    "{} lists zeromq without `optional = true` (the facade depends on {name})",
                    manifest.path
                ));
            }
        }
    }
    assert_none("simulator dependencies in the facade's build", broken);
}

/// The packages (by manifest path prefix) outside which a dependency must
/// not be listed, and the crates in question.
fn dependency_only_in(deps: &[&str], places: &[&str]) -> Vec<String> {
    let mut broken = Vec::new();
    for manifest in all_manifests() {
        if places.iter().any(|place| manifest.path.starts_with(place)) {
            continue;
        }
        for (kind, dep) in &manifest.deps {
            if deps.contains(&dep.as_str()) {
                broken.push(format!(
                    "{} lists {dep} in {} (allowed only in {})",
                    manifest.path,
                    kind.table(),
                    places.join(", ")
                ));
            }
        }
    }
    broken
}

/// The Rust files outside `places` whose text contains one of `needles`.
fn source_only_in(needles: &[String], places: &[&str]) -> Vec<String> {
    let mut broken = Vec::new();
    for (path, text) in sources() {
        if places.iter().any(|place| path.starts_with(place)) {
            continue;
        }
        for (n, line) in text.lines().enumerate() {
            if let Some(needle) = needles.iter().find(|needle| line.contains(needle.as_str())) {
                broken.push(format!(
                    "{path}:{}: `{needle}` (allowed only in {})",
                    n + 1,
                    places.join(", ")
                ));
            }
        }
    }
    broken
}

/// The ways a source file names a crate: `use NAME` and `NAME::`.
fn paths_of(name: &str) -> Vec<String> {
    vec![format!("use {name}"), format!("{name}::")]
}

/// SQLite belongs to the store: no other package lists it, and no other
/// source names it.
#[test]
fn rusqlite_only_in_the_store() {
    let mut broken = dependency_only_in(&["rusqlite"], &["crates/store/"]);
    broken.extend(source_only_in(&paths_of("rusqlite"), &["crates/store/"]));
    assert_none("rusqlite outside crates/store", broken);
}

/// `anyhow` and `clap` are for binaries: the CLI and xtask.
#[test]
fn anyhow_and_clap_only_in_the_binaries() {
    let places = ["crates/cli/", "xtask/"];
    let mut broken = dependency_only_in(&["anyhow", "clap"], &places);
    let mut needles = paths_of("anyhow");
    needles.extend(paths_of("clap"));
    broken.extend(source_only_in(&needles, &places));
    assert_none("anyhow or clap outside the binaries", broken);
}

/// Logging set-up and progress bars are the binaries' and the harnesses'
/// business, never a library's: no crate in `crates/` but the CLI lists or
/// names `tracing-subscriber` or `indicatif`.
#[test]
fn tracing_subscriber_and_indicatif_in_no_library() {
    let places = ["crates/cli/", "xtask/", "benches/", "tests/"];
    let mut broken = dependency_only_in(&["tracing-subscriber", "indicatif"], &places);
    let needles = ["tracing_subscriber".to_string(), "indicatif".to_string()];
    broken.extend(source_only_in(&needles, &places));
    assert_none("tracing-subscriber or indicatif in a library crate", broken);
}

/// Every Rust file says what it holds, in a `//!` comment on its first line
/// (inner attributes such as `#![allow(...)]` go after it).
#[test]
fn every_rust_file_begins_with_a_header() {
    let broken = sources()
        .into_iter()
        .filter(|(_, text)| !text.starts_with("//!"))
        .map(|(path, text)| {
            let first = text.lines().next().unwrap_or("(empty)");
            format!("{path}: begins with `{first}`")
        })
        .collect();
    assert_none(
        "Rust files without a `//!` header on the first line",
        broken,
    );
}

/// CI runs the README's test command itself, word for word: the command a
/// newcomer is told to run is the one that decides whether work lands.
#[test]
fn ci_runs_the_readme_s_test_command() {
    let readme = fs::read_to_string(root().join("README.md")).expect("README.md");
    let ci = fs::read_to_string(root().join(".ci/run")).expect(".ci/run");
    let test_command = readme
        .lines()
        .filter(|line| line.starts_with("cargo test") || line.starts_with("cargo nextest"))
        .map(|line| line.split('#').next().unwrap_or(line).trim())
        .collect::<Vec<_>>();
    assert_eq!(
        test_command.len(),
        1,
        "README.md must give exactly one test command, found {test_command:?}"
    );
    let command = test_command[0];
    assert!(
        ci.lines().any(|line| line.trim() == command),
        ".ci/run does not run the README's test command `{command}` as a line of its own"
    );
}

/// The fault switches are for tests: only the test package turns on the
/// store's `faults` feature, so that a build of the binaries or the
/// library alone holds none of them.
#[test]
fn only_the_tests_enable_the_fault_switches() {
    let broken = all_manifests()
        .into_iter()
        .filter(|manifest| manifest.path != "tests/Cargo.toml")
        .filter_map(|manifest| {
            let text = fs::read_to_string(root().join(&manifest.path)).expect("a manifest");
            text.lines()
                .any(|line| line.contains("features") && line.contains("\"faults\""))
                .then(|| format!("{} enables the faults feature", manifest.path))
        })
        .collect();
    assert_none("the faults feature outside tests/", broken);
}
