//! `docs/conformance.md` must list every DEV-* ID of the conformance
//! checklist, and every test it names must exist.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn rust_sources(dir: &Path, out: &mut String) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            if !p.ends_with("target") {
                rust_sources(&p, out);
            }
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push_str(&fs::read_to_string(&p).unwrap());
        }
    }
}

/// DEV IDs in the first column of the doc's tables, with the row text.
fn doc_rows(doc: &str) -> Vec<(String, String)> {
    doc.lines()
        .filter_map(|l| {
            let id = l.strip_prefix("| DEV-")?.split(' ').next()?;
            Some((format!("DEV-{id}"), l.to_string()))
        })
        .collect()
}

#[test]
fn docs_list_every_dev_id_with_an_existing_test_or_an_owner() {
    let root = workspace_root();
    let doc = fs::read_to_string(root.join("docs/conformance.md")).unwrap();
    let rows = doc_rows(&doc);
    assert!(rows.len() >= 92, "only {} DEV rows", rows.len());
    let mut sources = String::new();
    rust_sources(&root.join("crates"), &mut sources);
    for (id, row) in &rows {
        let covered = row.split('|').nth(2).unwrap_or("").trim().to_string();
        if covered == "daemon" {
            continue;
        }
        let names: Vec<&str> = covered.split('`').skip(1).step_by(2).collect();
        assert!(!names.is_empty(), "{id} names no test");
        for name in names {
            let bare = name.trim_end_matches('…');
            assert!(
                sources.contains(&format!("fn {bare}")),
                "{id}: test `{name}` does not exist"
            );
        }
    }
    // The checklist itself, when the shared folder is beside the checkout
    // (it is in CI): every one of its DEV IDs has a row.
    let spec = root.join("../shared/spec/virtio-iommu-conformance.md");
    if let Ok(spec) = fs::read_to_string(spec) {
        let ids: Vec<&str> = spec
            .lines()
            .filter_map(|l| l.strip_prefix("| DEV-"))
            .filter_map(|l| l.split(' ').next())
            .collect();
        assert!(ids.len() >= 92);
        for id in ids {
            let id = format!("DEV-{id}");
            assert!(
                rows.iter().any(|(r, _)| *r == id),
                "{id} missing from docs/conformance.md"
            );
        }
    }
}
