//! What an evaluation set is made of, opened and checked before anything is embedded: the
//! data a spec names (class folders, a CSV or JSONL with a label column, shards carrying
//! `KEY.cls`, a Parquet or Arrow table with a label column, synthetic data) with its class
//! names ([`open_zero_shot`]), and the prompt
//! templates zero-shot classification fills with each class name ([`read_templates`],
//! OpenAI's 80 by default). The named benchmark layouts (ImageNet-1k, clip_benchmark) are
//! resolved and opened by [`super::benchmark`], through the checks here.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use oxclip_data_loader::formats::webdataset;
use oxclip_data_loader::sources::shards::{ShardSet, ShardSource};
use oxclip_data_loader::sources::spec::DEFAULT_LABEL_KEY;
use oxclip_data_loader::sources::Dataset;
use oxclip_data_loader::sources::{self, classes, FileDataset};
use oxclip_data_loader::{DataSource, DataSpec, SkipCounts};

use crate::error::{Result, TrainError};

/// The labelled images and the class names of a zero-shot evaluation, checked against each
/// other by [`open_zero_shot`].
pub struct ZeroShotSet {
    pub source: DataSource,
    /// Line i names class i.
    pub classnames: Vec<String>,
}

/// Opens `spec` for zero-shot evaluation with the class names of `classnames` (one per line,
/// line i names class i) and refuses, before anything is embedded, what cannot be scored
/// honestly: data without class labels, a class names file whose count differs from the
/// class folders', a CSV/JSONL label outside the class list, a set with no images. The one
/// check behind `oxclip eval --zero-shot` and training's `data.val` with `data.classnames`.
///
/// - `classes:DIR`: the folder names are the class names unless `classnames` is given, and
///   then it must name as many classes as there are folders;
/// - a CSV or JSONL file: its `label_key` column (`label` when the spec names none) holds
///   each row's class index, every one below the number of class names;
/// - shards and `synthetic:N`: labels (`.cls`) are read as the images are; one outside the
///   class list fails the evaluation (see [`evaluate`](super::pass::evaluate));
/// - a Parquet or Arrow table (`parquet:`, `arrow:`): its label column (`label`, or the
///   spec's `label_key`) holds class indices; a `ClassLabel`'s names in the file's metadata
///   are the class names unless `classnames` is given (which must then name as many); rows
///   whose label is outside the class list are skipped and counted (`bad_label`);
/// - a folder of captioned images has no labels and is refused.
pub fn open_zero_shot(
    spec: &DataSpec,
    classnames: Option<&Path>,
    seed: u64,
) -> Result<ZeroShotSet> {
    let listed =
        classnames.map(|file| Ok::<_, TrainError>((read_lines(file)?, file))).transpose()?;
    let needs_names = || {
        TrainError::Input(format!(
            "zero-shot evaluation of `{}` needs the class names: a file with one per line, line i \
             naming class i (--classnames FILE, or data.classnames in a run config)",
            describe_spec(spec)
        ))
    };
    match spec {
        DataSpec::Classes(dir) => {
            let (dataset, folders) = classes::load(dir)?;
            let classnames = match listed {
                Some((names, file)) if names.len() != folders.len() => {
                    return Err(TrainError::Input(format!(
                        "{} names {} classes but {} has {} class folders ({}); line i of the class \
                         names file names the i-th folder in sorted order, so the counts must \
                         match (or leave the file out to use the folder names)",
                        file.display(),
                        names.len(),
                        dir.display(),
                        folders.len(),
                        first_few(&folders)
                    )))
                }
                Some((names, _)) => names,
                None => folders,
            };
            labelled_files(dataset, classnames, &format!("{} has", dir.display()))
        }
        DataSpec::Csv(csv) => {
            let (names, file) = listed.ok_or_else(needs_names)?;
            let mut csv = csv.clone();
            csv.label_key.get_or_insert_with(|| DEFAULT_LABEL_KEY.to_owned());
            labelled_files(sources::csv::load(&csv)?, names, &format!("{} names", file.display()))
        }
        DataSpec::Jsonl(jsonl) => {
            let (names, file) = listed.ok_or_else(needs_names)?;
            let mut jsonl = jsonl.clone();
            jsonl.label_key.get_or_insert_with(|| DEFAULT_LABEL_KEY.to_owned());
            labelled_files(
                sources::jsonl::load(&jsonl)?,
                names,
                &format!("{} names", file.display()),
            )
        }
        DataSpec::Folder(dir) => Err(TrainError::Input(format!(
            "{} is a folder of captioned images: it has no class labels to score zero-shot \
             accuracy against. Give a folder per class (classes:DIR), a CSV or JSONL with a label \
             column (csv:FILE?label_key=COLUMN), or shards whose samples carry a class index \
             (KEY.cls)",
            dir.display()
        ))),
        DataSpec::Shards(parts) => {
            let (names, file) = listed.ok_or_else(needs_names)?;
            check_shard_labels(parts, &names, &file.display().to_string())?;
            let source = DataSource::open(spec, seed)?;
            Ok(ZeroShotSet { source, classnames: names })
        }
        DataSpec::Table(table) => {
            let count = listed.as_ref().map(|(names, _)| names.len());
            let (shards, labels) = sources::open_table(table, count)?;
            let Some(column) = labels.column else {
                return Err(TrainError::Input(format!(
                    "`{}` has no label column to score zero-shot accuracy against: name its \
                     column of class indices with ?label_key=COLUMN",
                    describe_spec(spec)
                )));
            };
            // A ClassLabel's names are the class names; a names file given beside it must
            // name as many (`open_table` checks), and wins, as for class folders.
            let classnames = match (listed, labels.class_names) {
                (Some((names, _)), _) => names,
                (None, Some(names)) => names,
                (None, None) => {
                    return Err(TrainError::Input(format!(
                        "zero-shot evaluation of `{}` needs the class names: its label column \
                         `{column}` is no ClassLabel with names in the file's metadata, so give \
                         a file with one per line, line i naming class i (--classnames FILE, or \
                         data.classnames in a run config)",
                        describe_spec(spec)
                    )))
                }
            };
            if shards.total_samples() == 0 {
                return Err(TrainError::Input(format!(
                    "`{}` holds no rows to evaluate",
                    describe_spec(spec)
                )));
            }
            Ok(ZeroShotSet { source: DataSource::Shards(shards), classnames })
        }
        DataSpec::Synthetic(_) => {
            let (names, _) = listed.ok_or_else(needs_names)?;
            let source = DataSource::open(spec, seed)?;
            if source.is_empty() {
                return Err(TrainError::Input(format!(
                    "`{}` holds no samples to evaluate",
                    describe_spec(spec)
                )));
            }
            Ok(ZeroShotSet { source, classnames: names })
        }
    }
}

/// Whether `spec` names its own classes, and so is scored zero-shot without a class names
/// file: a folder per class, or a Parquet/Arrow table whose label column is a `ClassLabel`
/// with names in its metadata.
pub fn names_its_classes(spec: &DataSpec) -> Result<bool> {
    Ok(match spec {
        DataSpec::Classes(_) => true,
        DataSpec::Table(table) => sources::open_table(table, None)?.1.class_names.is_some(),
        _ => false,
    })
}

/// Reads the class index (`KEY.cls`) of every sample of the shards, without decoding any
/// image, so that shards with no labels, or with a label beyond the class list, fail before
/// the model is loaded (and at the start of training for `data.val`), not at the first
/// evaluation.
/// `named_by` says where the class names came from (a file, the built-in list).
pub(super) fn check_shard_labels(
    parts: &[ShardSource],
    classnames: &[String],
    named_by: &str,
) -> Result<()> {
    let n = classnames.len() as i64;
    let (mut labelled, mut unlabelled) = (0u64, 0u64);
    let mut outside: Option<(PathBuf, String, i64)> = None;
    for shard in &ShardSet::resolve(parts)?.shards {
        let name = shard.location.name();
        let Ok(reader) = shard.location.open() else {
            // Unreadable shards are counted and reported by the loader itself.
            continue;
        };
        webdataset::for_each_sample_in(reader, &name, |item| {
            match item.map(|sample| (sample.label, sample.key)) {
                Ok((Some(label), key)) if !(0..n).contains(&label) => {
                    outside = Some((name.clone(), key, label));
                    return ControlFlow::Break(());
                }
                Ok((Some(_), _)) => labelled += 1,
                Ok((None, _)) => unlabelled += 1,
                // Samples the reader cannot use are skipped and counted by the loader.
                Err(_) => {}
            }
            ControlFlow::Continue(())
        });
        if outside.is_some() {
            break;
        }
    }
    if let Some((shard, key, label)) = outside {
        return Err(TrainError::Input(format!(
            "{}, sample {key}: label {label} is outside the class list: {named_by} names {n} \
             classes (labels 0 to {})",
            shard.display(),
            n - 1
        )));
    }
    if labelled == 0 {
        let spec: Vec<&str> = parts.iter().map(|p| p.spec.as_str()).collect();
        return Err(TrainError::Input(format!(
            "no sample of {} carries a class label ({} read): zero-shot evaluation needs each \
             image's class index as a KEY.cls member (0 for the first line of {named_by})",
            spec.join("::"),
            unlabelled,
        )));
    }
    if unlabelled > 0 {
        tracing::warn!(
            "{unlabelled} of {} samples carry no class label (KEY.cls) and are not scored",
            labelled + unlabelled
        );
    }
    Ok(())
}

/// A CSV/JSONL/class-folder dataset whose every entry is labelled, checked against the
/// class list.
/// `named_by` says where the class list came from: `names.txt names`, `DIR has`.
pub(super) fn labelled_files(
    dataset: FileDataset,
    classnames: Vec<String>,
    named_by: &str,
) -> Result<ZeroShotSet> {
    let source = dataset.source().to_owned();
    if dataset.entries().is_empty() {
        return Err(TrainError::Input(format!(
            "{} holds no image to evaluate{}",
            source.display(),
            skipped_note(&Dataset::load_skips(&dataset))
        )));
    }
    let n = classnames.len() as i64;
    if let Some(entry) = dataset.entries().iter().find(|e| e.label.is_none_or(|l| l >= n)) {
        let label = entry.label.map_or_else(|| "none".to_owned(), |l| l.to_string());
        return Err(TrainError::Input(format!(
            "{}, {}: label {label} is outside the class list: {named_by} {n} classes (labels 0 to \
             {})",
            source.display(),
            entry.origin,
            n - 1
        )));
    }
    Ok(ZeroShotSet { source: DataSource::Indexed(Arc::new(dataset)), classnames })
}

/// ` (skipped: missing_image 3, empty_caption 1)`, or nothing when nothing was skipped.
pub(super) fn skipped_note(skips: &SkipCounts) -> String {
    if skips.total() == 0 {
        return String::new();
    }
    let parts: Vec<String> = skips.iter().map(|(reason, n)| format!("{reason} {n}")).collect();
    format!(" (skipped: {})", parts.join(", "))
}

/// The first few names, then how many more.
fn first_few(names: &[String]) -> String {
    const SHOWN: usize = 5;
    let mut text =
        names.iter().take(SHOWN).map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
    if names.len() > SHOWN {
        text.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    text
}

pub(super) fn describe_spec(spec: &DataSpec) -> String {
    match spec {
        DataSpec::Csv(csv) => csv.path.display().to_string(),
        DataSpec::Jsonl(jsonl) => jsonl.path.display().to_string(),
        DataSpec::Folder(dir) | DataSpec::Classes(dir) => dir.display().to_string(),
        DataSpec::Synthetic(n) => format!("synthetic:{n}"),
        DataSpec::Shards(parts) => {
            parts.iter().map(|p| p.spec.clone()).collect::<Vec<_>>().join("::")
        }
        DataSpec::Table(table) => table.path.clone(),
    }
}

/// A templates file's prompts, or OpenAI's 80 ImageNet templates; each must hold `{}`.
pub fn read_templates(path: Option<&str>) -> Result<Vec<String>> {
    let templates = match path {
        Some(path) => read_lines(Path::new(path))?,
        None => OPENAI_IMAGENET_TEMPLATES.iter().map(|s| s.to_string()).collect(),
    };
    if let Some(bad) = templates.iter().find(|t| !t.contains("{}")) {
        return Err(TrainError::Config(format!(
            "template `{bad}` has no `{{}}` for the class name"
        )));
    }
    Ok(templates)
}

/// Non-empty, trimmed lines of a text file.
pub fn read_lines(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(crate::error::io_err(path))?;
    let lines: Vec<String> =
        text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
    if lines.is_empty() {
        return Err(TrainError::Config(format!("{} is empty", path.display())));
    }
    Ok(lines)
}

/// OpenAI's 80 ImageNet prompt templates (CLIP repo,
/// `notebooks/Prompt_Engineering_for_ImageNet.ipynb`),
/// as open_clip's `zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES`.
pub const OPENAI_IMAGENET_TEMPLATES: [&str; 80] = [
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
];
#[cfg(test)]
mod tests {
    use super::*;

    /// `open_zero_shot` refuses what it cannot score, naming files, counts and rows. Image
    /// files are only listed here, never decoded, so any bytes do.
    #[test]
    fn zero_shot_inputs_are_checked_before_any_work() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let write = |rel: &str, text: &str| {
            let path = d.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        };
        for class in ["ant", "bee", "cat", "dog"] {
            write(&format!("classes/{class}/1.jpg"), "x");
        }
        write("two.txt", "ant\nbee\n");
        write("four.txt", "ant\nbee\ncat\ndog\n");
        let classes = DataSpec::Classes(d.join("classes"));
        let err = open_zero_shot(&classes, Some(&d.join("two.txt")), 0).err().unwrap().to_string();
        assert!(
            err.contains("two.txt names 2 classes but")
                && err.contains("classes has 4 class folders")
                && err.contains("`ant`"),
            "{err}"
        );
        let set = open_zero_shot(&classes, Some(&d.join("four.txt")), 0).unwrap();
        assert_eq!((set.classnames.len(), set.source.len()), (4, 4));
        assert_eq!(
            open_zero_shot(&classes, None, 0).unwrap().classnames,
            ["ant", "bee", "cat", "dog"]
        );

        // A CSV without labels: the column looked for and how to name another.
        write("val.csv", "filepath,title\nclasses/ant/1.jpg,an ant\n");
        let csv = DataSpec::parse(d.join("val.csv").to_str().unwrap()).unwrap();
        let err = open_zero_shot(&csv, Some(&d.join("two.txt")), 0).err().unwrap().to_string();
        assert!(
            err.contains("val.csv")
                && err.contains("no label column `label`")
                && err.contains("label_key=COLUMN"),
            "{err}"
        );
        // Without class names at all.
        let err = open_zero_shot(&csv, None, 0).err().unwrap().to_string();
        assert!(err.contains("needs the class names") && err.contains("--classnames"), "{err}");
        // A label beyond the class list: the line and the label.
        write("val.csv", "filepath,label\nclasses/ant/1.jpg,1\nclasses/bee/1.jpg,3\n");
        let err = open_zero_shot(&csv, Some(&d.join("two.txt")), 0).err().unwrap().to_string();
        assert!(
            err.contains("val.csv, line 3: label 3 is outside the class list")
                && err.contains("two.txt names 2 classes"),
            "{err}"
        );
        assert_eq!(open_zero_shot(&csv, Some(&d.join("four.txt")), 0).unwrap().source.len(), 2);
        // JSONL the same way.
        write("val.jsonl", "{\"image\": \"classes/ant/1.jpg\", \"label\": 2}\n");
        let jsonl = DataSpec::parse(d.join("val.jsonl").to_str().unwrap()).unwrap();
        let err = open_zero_shot(&jsonl, Some(&d.join("two.txt")), 0).err().unwrap().to_string();
        assert!(err.contains("val.jsonl, line 1: label 2 is outside"), "{err}");
        // Nothing to score.
        write("empty.csv", "filepath,label\n,0\n");
        let empty = DataSpec::parse(d.join("empty.csv").to_str().unwrap()).unwrap();
        let err = open_zero_shot(&empty, Some(&d.join("two.txt")), 0).err().unwrap().to_string();
        assert!(
            err.contains("empty.csv holds no image to evaluate (skipped: missing_image 1)"),
            "{err}"
        );
        // Captioned images carry no labels.
        let folder = DataSpec::Folder(d.join("classes/ant"));
        let err = open_zero_shot(&folder, Some(&d.join("two.txt")), 0).err().unwrap().to_string();
        assert!(err.contains("no class labels") && err.contains("classes:DIR"), "{err}");
    }
}
