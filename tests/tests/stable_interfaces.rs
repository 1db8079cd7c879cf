//! What the documentation calls a stable interface, pinned so that a change to it fails here
//! first: the `mim-lb status --json` fields, the reason codes, and `mim-lb check`'s output.
//!
//! The expected values come from outside the code under test: golden files in
//! `tests/golden/` and the tables and examples in CONFIG.md and OPERATIONS.md. Changing a
//! golden file is a change of a released interface: keep the old spelling readable (a serde
//! alias on a renamed field) and never renumber a reason code.
//!
//! Nothing here needs root or the kernel.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use mim_lb::status::Status;
use mim_lb_common::reason;
use serde_json::Value;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is inside the repository").to_path_buf()
}

fn read(relative: &str) -> String {
    let path = repo_root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The lines of the first fenced block that opens (```` ```lang ````) after the line equal to
/// or starting with `after`.
fn fenced_block_after(doc: &str, after: &str, lang: &str) -> String {
    let mut lines = doc.lines().skip_while(|l| !l.starts_with(after));
    assert!(lines.next().is_some(), "no line starting with {after:?}");
    let opening = format!("```{lang}");
    let mut lines = lines.skip_while(|l| l.trim_end() != opening);
    assert!(lines.next().is_some(), "no {opening} block after {after:?}");
    let mut block = String::new();
    for line in lines.by_ref() {
        if line.starts_with("```") {
            return block;
        }
        block.push_str(line);
        block.push('\n');
    }
    panic!("the {opening} block after {after:?} is not closed");
}

/// The rows (cells, trimmed) of the first Markdown table after the heading `heading`.
fn table_after(doc: &str, heading: &str) -> Vec<Vec<String>> {
    let rows: Vec<Vec<String>> = doc
        .lines()
        .skip_while(|l| l.trim_end() != heading)
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        // Header and separator rows.
        .skip(2)
        .map(|l| {
            // `\|` inside a cell is a literal bar, not a separator.
            let l = l.replace("\\|", "\u{1}");
            let inner = l.trim().trim_start_matches('|').trim_end_matches('|');
            inner.split('|').map(|c| c.trim().replace('\u{1}', "|")).collect()
        })
        .collect();
    assert!(!rows.is_empty(), "no table after {heading:?}");
    rows
}

// ---- mim-lb status --json ----------------------------------------------------------------

/// Each field's path (`services[].backends[].mac`) and the JSON types it takes anywhere in
/// the document. Array elements have no row of their own: their fields do.
fn shape(value: &Value) -> BTreeMap<String, BTreeSet<&'static str>> {
    fn walk(value: &Value, path: &str, element: bool, out: &mut BTreeMap<String, BTreeSet<&'static str>>) {
        let kind = match value {
            Value::Null => "null",
            Value::Bool(_) => "bool",
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        };
        if !element && !path.is_empty() {
            out.entry(path.to_owned()).or_default().insert(kind);
        }
        match value {
            Value::Object(fields) => {
                for (name, v) in fields {
                    let child = if path.is_empty() { name.clone() } else { format!("{path}.{name}") };
                    walk(v, &child, false, out);
                }
            }
            Value::Array(items) => {
                for item in items {
                    walk(item, &format!("{path}[]"), true, out);
                }
            }
            _ => {}
        }
    }
    let mut out = BTreeMap::new();
    walk(value, "", false, &mut out);
    out
}

fn golden_status() -> Value {
    serde_json::from_str(&read("tests/golden/status.json")).expect("tests/golden/status.json is JSON")
}

/// The golden document reads into `Status` and comes out unchanged: every field it names
/// still exists under that name, with the same value, and `Status` writes no field the golden
/// file does not have. A renamed or removed field, a changed type, or a new field not yet in
/// the golden file (and so not in the docs) fails.
///
/// Renaming a field on purpose: copy status.json to `status-<last version with the old
/// names>.json`, then update status.json and OPERATIONS.md. Every `status*.json` must still
/// read as a Status, which it does only if the renamed field keeps an alias.
#[test]
fn status_json_round_trips_the_golden_file() {
    let golden = golden_status();
    let status: Status = serde_json::from_value(golden.clone())
        .unwrap_or_else(|e| panic!("tests/golden/status.json no longer reads as a Status: {e}"));
    let written = serde_json::to_value(&status).unwrap();
    let (have, want) = (shape(&written), shape(&golden));
    let new: Vec<&String> = have.keys().filter(|k| !want.contains_key(*k)).collect();
    let gone: Vec<&String> = want.keys().filter(|k| !have.contains_key(*k)).collect();
    assert!(
        new.is_empty() && gone.is_empty(),
        "`mim-lb status --json` writes {new:?}, not in tests/golden/status.json, and no longer writes {gone:?}"
    );
    assert_eq!(written, golden, "a field of tests/golden/status.json lost or changed its value on the way through Status");
}

/// Status documents of earlier versions (`tests/golden/status-*.json`, kept when a field is
/// renamed) still read: the CLI of one version reads the daemon's answer of another.
#[test]
fn status_json_of_earlier_versions_still_reads() {
    let dir = repo_root().join("tests/golden");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("status") && name.ends_with(".json") {
            let text = std::fs::read_to_string(&path).unwrap();
            if let Err(e) = serde_json::from_str::<Status>(&text) {
                panic!("tests/golden/{name} no longer reads as a Status (a renamed field needs #[serde(alias)]): {e}");
            }
        }
    }
}

/// The example in OPERATIONS.md is real output: it reads as a Status and loses nothing.
#[test]
fn status_json_example_in_operations_md_is_a_status() {
    let doc = read("OPERATIONS.md");
    let example: Value = serde_json::from_str(&fenced_block_after(&doc, "### `mim-lb status --json`", "json"))
        .expect("the status example in OPERATIONS.md is JSON");
    let status: Status = serde_json::from_value(example.clone())
        .unwrap_or_else(|e| panic!("the status example in OPERATIONS.md does not read as a Status: {e}"));
    assert_eq!(serde_json::to_value(&status).unwrap(), example, "the OPERATIONS.md example has fields Status does not write");
}

/// The field table under "`mim-lb status --json`" in OPERATIONS.md names every field Status
/// writes, no other, each with the JSON types it takes.
#[test]
fn status_json_field_table_in_operations_md_matches_status() {
    let doc = read("OPERATIONS.md");
    let rows = table_after(&doc, "### `mim-lb status --json`");
    // The rows nest by leading dots; a row's parent is the last row one dot shallower.
    let mut prefixes: Vec<String> = vec![String::new()];
    let mut documented: BTreeMap<String, BTreeSet<&'static str>> = BTreeMap::new();
    for row in &rows {
        let (fields, types) = (&row[0], &row[1]);
        let names: Vec<&str> = fields.split(',').map(|f| f.trim().trim_matches('`')).collect();
        let type_list: Vec<&str> = types.split(',').map(str::trim).collect();
        for (i, name) in names.iter().enumerate() {
            let depth = name.chars().take_while(|c| *c == '.').count();
            let bare = &name[depth..];
            let prefix = prefixes.get(depth).unwrap_or_else(|| panic!("row {fields}: no parent row for {name}")).clone();
            let (bare, is_array) = match bare.strip_suffix("[]") {
                Some(b) => (b, true),
                None => (bare, false),
            };
            let path = if prefix.is_empty() { bare.to_owned() } else { format!("{prefix}.{bare}") };
            let ty = if type_list.len() == names.len() { type_list[i] } else { types.as_str() };
            let kinds: BTreeSet<&'static str> = ty
                .split(" or ")
                .map(|t| match t.trim() {
                    "string" => "string",
                    "number" => "number",
                    "bool" => "bool",
                    "array" => "array",
                    "object" => "object",
                    "null" => "null",
                    other => panic!("row {fields}: unknown type {other:?}"),
                })
                .collect();
            assert!(documented.insert(path.clone(), kinds).is_none(), "{path} has two rows");
            prefixes.truncate(depth + 1);
            prefixes.push(if is_array { format!("{path}[]") } else { path });
        }
    }
    // What Status writes, from a document that has every field in each of its forms
    // (a MAC and none, a last check and none).
    let status: Status = serde_json::from_value(golden_status()).unwrap();
    let written = shape(&serde_json::to_value(&status).unwrap());
    let missing: Vec<&String> = written.keys().filter(|k| !documented.contains_key(*k)).collect();
    let extra: Vec<&String> = documented.keys().filter(|k| !written.contains_key(*k)).collect();
    assert!(missing.is_empty() && extra.is_empty(), "OPERATIONS.md's field table lacks {missing:?} and has {extra:?}, which Status does not write");
    for (path, kinds) in &written {
        assert_eq!(&documented[path], kinds, "{path}: OPERATIONS.md says {:?}, Status writes {kinds:?}", documented[path]);
    }
}

// ---- reason codes ------------------------------------------------------------------------

fn verdict_by_name(name: &str) -> u32 {
    match name {
        "XDP_TX" => reason::XDP_TX,
        "XDP_PASS" | "pass" => reason::XDP_PASS,
        "XDP_DROP" | "drop" => reason::XDP_DROP,
        other => panic!("unknown verdict {other:?}"),
    }
}

/// What the code says: every reason with its name and verdict, in the order `ALL` lists them.
fn reasons_in_code() -> Vec<(u32, String, u32)> {
    reason::ALL.iter().map(|(code, name)| (*code, name.to_string(), reason::verdict(*code))).collect()
}

/// The released codes: none renumbered, renamed, given another verdict or dropped. `ALL` is
/// in code order with no gap (status lists `reasons[]` "in code order"; the counters are an
/// array indexed by code).
#[test]
fn reason_codes_match_the_golden_table() {
    let golden: Vec<(u32, String, u32)> = read("tests/golden/reasons.txt")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let cells: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(cells.len(), 3, "tests/golden/reasons.txt: {l:?}");
            (cells[0].parse().expect("a code"), cells[1].to_owned(), verdict_by_name(cells[2]))
        })
        .collect();
    let code = reasons_in_code();
    assert!(code.len() >= golden.len(), "a released reason code was removed");
    assert_eq!(code[..golden.len()], golden[..], "a released reason code changed (code, name, verdict)");
    for (i, (c, name, _)) in code.iter().enumerate() {
        assert_eq!(*c, i as u32, "reason::ALL is not in code order at {name}");
        assert_eq!(reason::name(*c), name, "reason::name({c})");
    }
    assert_eq!(code.len(), golden.len(), "new reasons {:?}: add them to tests/golden/reasons.txt and OPERATIONS.md", &code[golden.len()..]);
}

/// The table under "## Reason codes" in OPERATIONS.md: one row per reason, its code, name and
/// verdict as the program decides them.
#[test]
fn reason_table_in_operations_md_matches_the_code() {
    let doc = read("OPERATIONS.md");
    let documented: Vec<(u32, String, u32)> = table_after(&doc, "## Reason codes")
        .iter()
        .map(|row| {
            let code = row[0].parse().unwrap_or_else(|_| panic!("reason row {row:?}: code"));
            (code, row[1].trim_matches('`').to_owned(), verdict_by_name(&row[2]))
        })
        .collect();
    assert_eq!(documented, reasons_in_code(), "OPERATIONS.md's reason table (code, name, verdict) differs from mim-lb-common/src/reason.rs");
}

// ---- mim-lb check ------------------------------------------------------------------------

/// `mim-lb check --config /dev/stdin` with `config` as its input: its output, having
/// asserted that it succeeded.
fn check(config: &str) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mim-lb-dut"))
        .args(["check", "--config", "/dev/stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting mim-lb check");
    child.stdin.take().unwrap().write_all(config.as_bytes()).unwrap();
    let out = mim_lb_tests::wait_within(child, mim_lb_tests::RUN_TIMEOUT).unwrap();
    assert!(out.status.success(), "mim-lb check failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// CONFIG.md's annotated example is accepted, and `mim-lb check` on it prints exactly what
/// CONFIG.md shows under it.
#[test]
fn check_of_the_annotated_example_prints_what_config_md_shows() {
    let doc = read("CONFIG.md");
    let config = fenced_block_after(&doc, "## A complete annotated example", "toml");
    let shown = fenced_block_after(&doc, "`mim-lb check` on it:", "");
    assert_eq!(check(&config), shown, "`mim-lb check` on CONFIG.md's annotated example differs from what CONFIG.md shows");
}

/// The shipped example (dist/mim-lb.toml, also `mim-lb example-config`) is accepted, and
/// `mim-lb check` on it prints tests/golden/check-dist.txt.
#[test]
fn check_of_the_shipped_example_matches_the_golden_output() {
    let out = check(&read("dist/mim-lb.toml"));
    assert_eq!(out, read("tests/golden/check-dist.txt"), "`mim-lb check` output on dist/mim-lb.toml changed");
}

/// `mim-lb simulate --json` is pinned the same way as status: the golden documents (one
/// forwarded flow with every field set, one passed with every optional field null) read into
/// `Simulation` and come out unchanged, and OPERATIONS.md's simulate section names every field.
#[test]
fn simulate_json_round_trips_the_golden_file_and_its_fields_are_documented() {
    let golden: Value = serde_json::from_str(&read("tests/golden/simulate.json")).expect("tests/golden/simulate.json is JSON");
    let sims: Vec<mim_lb::status::Simulation> = serde_json::from_value(golden.clone())
        .unwrap_or_else(|e| panic!("tests/golden/simulate.json no longer reads as simulations: {e}"));
    let written = serde_json::to_value(&sims).unwrap();
    assert_eq!(written, golden, "a field of tests/golden/simulate.json was renamed, removed, added or changed on the way through");
    let ops = read("OPERATIONS.md");
    let section = &ops[ops.find("## `mim-lb simulate`").expect("OPERATIONS.md has a simulate section")..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    for field in golden[0].as_object().unwrap().keys() {
        assert!(section.contains(&format!("\"{field}\"")) || section.contains(&format!("`{field}`")), "OPERATIONS.md's simulate section does not mention `{field}`");
    }
}
