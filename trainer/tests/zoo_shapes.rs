//! Every built-in open_clip model has open_clip 3.3's state_dict: the same names and shapes,
//! buffers included, and the same parameter count, against
//! tests/fixtures/open_clip_zoo_shapes.json (written by tests/fixtures/make_zoo_fixtures.py
//! from `open_clip.create_model(name)` on the meta device).

use std::collections::BTreeMap;
use std::path::PathBuf;

use oxclip_trainer::model::{zoo, Clip};

type Shapes = BTreeMap<String, Vec<i64>>;

struct Golden {
    num_params: i64,
    tensors: Shapes,
}

/// The fixture, its folded names (`resblocks.[0-11].ln_1.weight`) expanded.
fn golden() -> BTreeMap<String, Golden> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/open_clip_zoo_shapes.json");
    let json: BTreeMap<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("fixture"))
            .expect("fixture is JSON");
    json.into_iter()
        .map(|(model, entry)| {
            let mut tensors = Shapes::new();
            for t in entry["tensors"].as_array().expect("tensors") {
                let name = t[0].as_str().expect("name");
                let shape: Vec<i64> = serde_json::from_value(t[1].clone()).expect("shape");
                for name in unfold(name) {
                    assert!(
                        tensors.insert(name.clone(), shape.clone()).is_none(),
                        "{model}: {name} twice"
                    );
                }
            }
            (
                model,
                Golden { num_params: entry["num_params"].as_i64().expect("num_params"), tensors },
            )
        })
        .collect()
}

fn unfold(name: &str) -> Vec<String> {
    let Some(start) = name.find("[0-") else { return vec![name.to_owned()] };
    let end = start + name[start..].find(']').expect("closing ]");
    let last: usize = name[start + 3..end].parse().expect("range end");
    (0..=last).map(|i| format!("{}{i}{}", &name[..start], &name[end + 1..])).collect()
}

/// One line per model that differs, naming the first few differences.
fn difference(ours: &Shapes, theirs: &Shapes) -> Option<String> {
    let mut diffs = Vec::new();
    for (name, shape) in theirs {
        match ours.get(name) {
            None => diffs.push(format!("missing {name} {shape:?}")),
            Some(s) if s != shape => diffs.push(format!("{name}: {s:?}, open_clip {shape:?}")),
            Some(_) => {}
        }
    }
    diffs.extend(ours.keys().filter(|n| !theirs.contains_key(*n)).map(|n| format!("extra {n}")));
    let n = diffs.len();
    (n > 0).then(|| {
        format!("{n} differences: {}", diffs.into_iter().take(4).collect::<Vec<_>>().join("; "))
    })
}

#[test]
fn unfolding_expands_the_range() {
    assert_eq!(unfold("a.[0-2].b"), ["a.0.b", "a.1.b", "a.2.b"]);
    assert_eq!(unfold("visual.proj"), ["visual.proj"]);
}

/// Every built-in open_clip name, each checked; the failures are listed together.
#[test]
fn every_open_clip_model_has_open_clips_state_dict() {
    let golden = golden();
    let names: Vec<&str> = zoo::open_clip_names().collect();
    let total = names.len();
    assert_eq!(
        golden.keys().map(String::as_str).collect::<Vec<_>>(),
        names,
        "the fixture lists the built-in open_clip names"
    );
    assert_eq!(names.len(), 144);
    let mut failures = Vec::new();
    for name in names {
        let cfg = zoo::builtin(name).expect("built-in");
        let expected = &golden[name];
        let shapes = match Clip::shapes(&cfg) {
            Ok(shapes) => shapes.into_iter().collect::<Shapes>(),
            Err(e) => {
                failures.push(format!("{name}: {e}"));
                continue;
            }
        };
        if let Some(diff) = difference(&shapes, &expected.tensors) {
            failures.push(format!("{name}: {diff}"));
            continue;
        }
        match zoo::parameter_count(&cfg) {
            Ok(n) if n == expected.num_params => {}
            Ok(n) => {
                failures.push(format!("{name}: {n} parameters, open_clip {}", expected.num_params))
            }
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {total} models differ from open_clip:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
