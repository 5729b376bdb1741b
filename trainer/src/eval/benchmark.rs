//! Evaluation sets as the field shares them, read as they are on disk:
//!
//! - `imagenet1k:DIR`: ImageNet-1k's validation set, a folder per WordNet id (`DIR/val/`
//!   or `DIR` itself), or shards whose samples carry the class index (`KEY.cls`), scored
//!   with the 1,000 class names CLIP and open_clip publish, built in;
//! - clip_benchmark's webdataset layout (`wds:DIR`, or any directory holding
//!   `classnames.txt` or `test/` shards), as `clip_benchmark.datasets.builder.build_wds_dataset`
//!   reads it:
//!
//!   ```text
//!   DIR/classnames.txt                            line i names class i
//!   DIR/zeroshot_classification_templates.txt     prompts, `{c}` for the class name
//!   DIR/dataset_type.txt                          `retrieval` for image-text sets
//!   DIR/test/nshards.txt                          n: the shards are test/{0..n-1}.tar
//!   DIR/test/0.tar ...                            KEY.webp|png|jpg + KEY.cls, or KEY.txt
//!   ```
//!
//!   A retrieval sample's `txt` holds its captions one per line (clip_benchmark splits it
//!   with `str.splitlines`).
//!
//! [`resolve`] turns what the user wrote into a data spec and a [`Task`] (class names and
//! templates, or retrieval) from the files alone; [`open_benchmark`] then opens the set with
//! the checks of [`super::sets`] (labels against the class names, samples present).

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use oxclip_data_loader::formats::webdataset;
use oxclip_data_loader::sources::classes;
use oxclip_data_loader::sources::shards::ShardSet;
use oxclip_data_loader::{DataSource, DataSpec};

use super::sets::{check_shard_labels, describe_spec, labelled_files, OPENAI_IMAGENET_TEMPLATES};
use crate::error::{Result, TrainError};

/// ImageNet-1k's class names, line i naming the i-th WordNet id in sorted order: open_clip's
/// `zero_shot_metadata.IMAGENET_CLASSNAMES` (checked against it by
/// tests/fixtures/imagenet1k_classnames.txt).
const IMAGENET1K_CLASSNAMES: &str = include_str!("imagenet1k_classnames.txt");

/// The 1,000 ImageNet-1k class names.
pub fn imagenet1k_classnames() -> Vec<String> {
    IMAGENET1K_CLASSNAMES.lines().map(str::to_owned).collect()
}

/// What a benchmark set is scored on.
#[derive(Debug, Clone, PartialEq)]
pub enum Task {
    /// Zero-shot classification: class names, and prompt templates with `{}` for the name.
    Classification { classnames: Vec<String>, templates: Vec<String> },
    /// Image-text retrieval, each image with one or more captions (lines of its `txt`).
    Retrieval,
}

/// A set resolved from `imagenet1k:DIR`, `wds:DIR` or a clip_benchmark directory.
#[derive(Debug, Clone)]
pub struct Benchmark {
    pub spec: DataSpec,
    pub task: Task,
}

/// The benchmark `text` names, or `None` when it is a plain data spec (shards, CSV, a
/// folder per class, ...) to be read the usual way. `templates` overrides the set's own.
pub fn resolve(text: &str, templates: Option<Vec<String>>) -> Result<Option<Benchmark>> {
    let text = text.trim();
    if let Some(dir) = text.strip_prefix("imagenet1k:") {
        return imagenet1k(Path::new(dir.trim()), templates).map(Some);
    }
    if let Some(dir) = text.strip_prefix("wds:") {
        return clip_benchmark(Path::new(dir.trim()), templates).map(Some);
    }
    let dir = Path::new(text);
    if is_dataset_dir(dir) {
        return clip_benchmark(dir, templates).map(Some);
    }
    Ok(None)
}

/// Whether `dir` looks like a clip_benchmark dataset: it holds `classnames.txt`, or a `test/`
/// folder with `nshards.txt` or `.tar` shards (a folder-per-class set may well have a class
/// named `test`, of images).
pub fn is_dataset_dir(dir: &Path) -> bool {
    let test = dir.join("test");
    let has_shards = || {
        std::fs::read_dir(&test)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .any(|e| e.path().extension().is_some_and(|x| x == "tar"))
            })
            .unwrap_or(false)
    };
    dir.join("classnames.txt").is_file() || test.join("nshards.txt").is_file() || has_shards()
}

/// Opens a set resolved by [`resolve`] and checks it as
/// [`open_zero_shot`](super::sets::open_zero_shot) does:
/// a classification set's labels against its class names (a folder count, every shard's
/// `cls`), a retrieval set for having samples.
pub fn open_benchmark(set: &Benchmark, seed: u64) -> Result<DataSource> {
    match (&set.task, &set.spec) {
        (Task::Retrieval, spec) => {
            let source = DataSource::open(spec, seed)?;
            if source.is_empty() {
                return Err(TrainError::Input(format!(
                    "`{}` holds no image-caption samples to evaluate",
                    describe_spec(spec)
                )));
            }
            Ok(source)
        }
        (Task::Classification { classnames, .. }, DataSpec::Classes(dir)) => {
            let (dataset, _) = classes::load(dir)?;
            Ok(labelled_files(dataset, classnames.clone(), &format!("{} has", dir.display()))?
                .source)
        }
        (Task::Classification { classnames, .. }, DataSpec::Shards(parts)) => {
            let named_by = match parts
                .first()
                .and_then(|p| Path::new(&p.spec).parent())
                .and_then(Path::parent)
            {
                Some(dir) if dir.join("classnames.txt").is_file() => {
                    dir.join("classnames.txt").display().to_string()
                }
                _ => "the class list".to_owned(),
            };
            check_shard_labels(parts, classnames, &named_by)?;
            Ok(DataSource::open(&set.spec, seed)?)
        }
        (Task::Classification { .. }, spec) => Err(TrainError::Input(format!(
            "`{}` is neither a folder per class nor shards with class labels",
            describe_spec(spec)
        ))),
    }
}

fn openai_templates() -> Vec<String> {
    OPENAI_IMAGENET_TEMPLATES.iter().map(|t| (*t).to_owned()).collect()
}

fn imagenet1k(dir: &Path, templates: Option<Vec<String>>) -> Result<Benchmark> {
    let classnames = imagenet1k_classnames();
    let task =
        Task::Classification { classnames, templates: templates.unwrap_or_else(openai_templates) };
    if !dir.is_dir() {
        // Shards (a brace pattern, a `.tar`, `pipe:`) whose samples carry `KEY.cls`.
        return Ok(Benchmark { spec: DataSpec::parse(&dir.to_string_lossy())?, task });
    }
    let root = if dir.join("val").is_dir() { dir.join("val") } else { dir.to_owned() };
    let folders = subfolders(&root)?;
    if folders.is_empty() {
        // A directory of `.tar` shards.
        return Ok(Benchmark { spec: DataSpec::parse(&root.to_string_lossy())?, task });
    }
    if folders.len() != 1000 {
        return Err(TrainError::Input(format!(
            "{} has {} class folders; ImageNet-1k's validation set has 1000, one per WordNet id \
             (n01440764 ...), and the built-in class names are matched to them in sorted order. \
             Give the `val/` folder of the full set (or the folder holding it); for a subset use \
             classes:DIR with --classnames",
            root.display(),
            folders.len()
        )));
    }
    Ok(Benchmark { spec: DataSpec::Classes(root), task })
}

/// Sorted names of the folders in `dir`.
fn subfolders(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(crate::error::io_err(dir))? {
        let entry = entry.map_err(crate::error::io_err(dir))?;
        if entry.path().is_dir() {
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// clip_benchmark's `read_txt(...).splitlines()`, each line stripped; `None` when the file
/// is not there.
fn lines_of(path: &Path) -> Result<Option<Vec<String>>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text.lines().map(|l| l.trim().to_owned()).collect())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(TrainError::Io { path: path.to_owned(), source: e }),
    }
}

/// The shards of `DIR/test`: `{0..n-1}.tar` when `nshards.txt` says n (clip_benchmark's
/// reading), else every `.tar` there.
fn test_shards(dir: &Path) -> Result<DataSpec> {
    let test = dir.join("test");
    if !test.is_dir() {
        return Err(TrainError::Input(format!(
            "{} is not a clip_benchmark dataset: it has no test/ folder of shards (test/0.tar ..., \
             with test/nshards.txt)",
            dir.display()
        )));
    }
    let nshards = test.join("nshards.txt");
    match lines_of(&nshards)? {
        Some(lines) => {
            let first = lines.first().map(String::as_str).unwrap_or("");
            let n: u64 = first.parse().ok().filter(|&n| n > 0).ok_or_else(|| {
                TrainError::Input(format!(
                    "{}: `{first}` is not a shard count (a positive integer)",
                    nshards.display()
                ))
            })?;
            let pattern = if n == 1 {
                test.join("0.tar")
            } else {
                test.join(format!("{{0..{}}}.tar", n - 1))
            };
            Ok(DataSpec::parse(&pattern.to_string_lossy())?)
        }
        None => Ok(DataSpec::parse(&test.to_string_lossy())?),
    }
}

/// Whether the first readable sample of the shards has a class label (`cls`) and whether it
/// has a caption (`txt`); `None` when no sample could be read.
fn first_sample_members(spec: &DataSpec) -> Result<Option<(bool, bool)>> {
    let DataSpec::Shards(parts) = spec else { return Ok(None) };
    for shard in &ShardSet::resolve(parts)?.shards {
        let Ok(reader) = shard.location.open() else { continue };
        let mut found = None;
        webdataset::for_each_sample_in(reader, &shard.location.name(), |item| match item {
            Ok(sample) => {
                found = Some((sample.label.is_some(), sample.caption.is_some()));
                ControlFlow::Break(())
            }
            Err(_) => ControlFlow::Continue(()),
        });
        if found.is_some() {
            return Ok(found);
        }
    }
    Ok(None)
}

fn clip_benchmark(dir: &Path, templates: Option<Vec<String>>) -> Result<Benchmark> {
    let spec = test_shards(dir)?;
    let type_file = dir.join("dataset_type.txt");
    let declared = lines_of(&type_file)?.map(|lines| lines.concat().trim().to_lowercase());
    let classnames_file = dir.join("classnames.txt");
    let classnames = lines_of(&classnames_file)?;
    let retrieval = match declared.as_deref() {
        Some("retrieval") => true,
        Some("classification") | Some("") => false,
        Some(other) => {
            return Err(TrainError::Input(format!(
                "{}: dataset type `{other}` is not evaluated by oxclip (`classification` or \
                 `retrieval`)",
                type_file.display()
            )))
        }
        // No type file: clip_benchmark assumes classification; a set of captions without
        // class names or labels is taken for the retrieval set it is.
        None if classnames.is_none() => matches!(first_sample_members(&spec)?, Some((false, true))),
        None => false,
    };
    if retrieval {
        return Ok(Benchmark { spec, task: Task::Retrieval });
    }
    let classnames = classnames.ok_or_else(|| {
        TrainError::Input(format!(
            "{} is missing: the clip_benchmark dataset {} is a classification set (its samples \
             carry a class index, `cls`) and zero-shot classification needs its class names, one \
             per line (line i names class i); for an image-text retrieval set write `retrieval` to \
             {}",
            classnames_file.display(),
            dir.display(),
            type_file.display()
        ))
    })?;
    let templates = match templates {
        Some(templates) => templates,
        None => {
            let file = dir.join("zeroshot_classification_templates.txt");
            match lines_of(&file)? {
                // clip_benchmark fills `{c}` with the class name.
                Some(lines) => lines
                    .into_iter()
                    .filter(|l| !l.is_empty())
                    .map(|l| l.replace("{c}", "{}"))
                    .collect(),
                None => {
                    tracing::warn!(
                        "{} is missing: using OpenAI's 80 ImageNet templates",
                        file.display()
                    );
                    openai_templates()
                }
            }
        }
    };
    if let Some(bad) = templates.iter().find(|t| !t.contains("{}")) {
        return Err(TrainError::Input(format!(
            "template `{bad}` of {} has no `{{c}}` (or `{{}}`) for the class name",
            dir.display()
        )));
    }
    Ok(Benchmark { spec, task: Task::Classification { classnames, templates } })
}

/// A name for a benchmark directory or spec, for tables and TensorBoard tags: the last
/// path component (`imagenet1k` for `imagenet1k:DIR`).
pub fn short_name(text: &str) -> String {
    if text.trim().starts_with("imagenet1k:") {
        return "imagenet1k".to_owned();
    }
    let path = PathBuf::from(text.trim().trim_start_matches("wds:"));
    path.file_name().map_or_else(|| text.to_owned(), |n| n.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The built-in list is open_clip's (tests/fixtures/make_imagenet_classnames.py wrote the
    /// golden file from `open_clip.zero_shot_metadata.IMAGENET_CLASSNAMES`).
    #[test]
    fn imagenet1k_classnames_equal_open_clips() {
        let golden = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../tests/fixtures/imagenet1k_classnames.txt"),
        )
        .unwrap();
        let golden: Vec<&str> = golden.lines().collect();
        let names = imagenet1k_classnames();
        assert_eq!(names.len(), 1000);
        assert_eq!(names, golden);
        assert_eq!((names[0].as_str(), names[999].as_str()), ("tench", "toilet paper"));
    }

    #[test]
    fn imagenet1k_folders_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..3 {
            std::fs::create_dir_all(dir.path().join(format!("val/n{i:08}"))).unwrap();
        }
        let err =
            resolve(&format!("imagenet1k:{}", dir.path().display()), None).unwrap_err().to_string();
        assert!(err.contains("val has 3 class folders") && err.contains("has 1000"), "{err}");
        for i in 3..1000 {
            std::fs::create_dir_all(dir.path().join(format!("val/n{i:08}"))).unwrap();
        }
        let set = resolve(&format!("imagenet1k:{}", dir.path().display()), None).unwrap().unwrap();
        assert_eq!(set.spec, DataSpec::Classes(dir.path().join("val")));
        let Task::Classification { classnames, templates } = set.task else {
            panic!("classification")
        };
        assert_eq!((classnames.len(), templates.len()), (1000, 80));
    }

    #[test]
    fn clip_benchmark_layout_is_read_as_is() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("test")).unwrap();
        let mut w = webdataset::ShardWriter::create(&d.join("test/0.tar")).unwrap();
        w.write_sample("s0", &[("webp", b"x".as_slice()), ("cls", b"1".as_slice())]).unwrap();
        w.finish().unwrap();
        std::fs::write(d.join("test/nshards.txt"), "1\n").unwrap();
        // Classification without class names: the missing file is named.
        let err = resolve(d.to_str().unwrap(), None).unwrap_err().to_string();
        assert!(err.contains("classnames.txt is missing") && err.contains("`cls`"), "{err}");
        std::fs::write(d.join("classnames.txt"), "cat\ndog\n").unwrap();
        std::fs::write(
            d.join("zeroshot_classification_templates.txt"),
            "a photo of a {c}.\nart of the {c}.\n",
        )
        .unwrap();
        let set = resolve(&format!("wds:{}", d.display()), None).unwrap().unwrap();
        assert_eq!(
            set.task,
            Task::Classification {
                classnames: vec!["cat".into(), "dog".into()],
                templates: vec!["a photo of a {}.".into(), "art of the {}.".into()]
            }
        );
        std::fs::write(d.join("dataset_type.txt"), "retrieval\n").unwrap();
        assert_eq!(resolve(d.to_str().unwrap(), None).unwrap().unwrap().task, Task::Retrieval);
        // nshards.txt names shards that are not there.
        std::fs::write(d.join("test/nshards.txt"), "3\n").unwrap();
        let err = resolve(d.to_str().unwrap(), None).unwrap_err().to_string();
        assert!(err.contains("1.tar"), "{err}");
        // A plain spec is not a benchmark, nor a folder per class with a class named `test`.
        assert!(resolve("synthetic:4", None).unwrap().is_none());
        std::fs::create_dir_all(d.join("classes/test")).unwrap();
        std::fs::write(d.join("classes/test/0.png"), b"x").unwrap();
        assert!(!is_dataset_dir(&d.join("classes")));
        assert!(resolve(d.join("classes").to_str().unwrap(), None).unwrap().is_none());
    }
}
