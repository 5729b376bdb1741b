//! A folder per class, as torchvision's `ImageFolder` and most classification sets come:
//! `DIR/<class>/.../*.jpg`. Classes are the subfolders in sorted order (class i is the i-th
//! folder), every image below a class folder is a sample labelled with it, and its caption
//! is the folder's name. For zero-shot evaluation (`oxclip eval --zero-shot classes:DIR`).

use std::collections::BTreeSet;
use std::path::Path;

use super::files::{Caption, Entry, FileDataset};
use super::folder::walk;
use crate::error::DataError;
use crate::formats::image::is_image_path;
use crate::skip::SkipCounts;

/// The labelled images of `dir` and the class names (the folder names, in label order).
pub fn load(dir: &Path) -> Result<(FileDataset, Vec<String>), DataError> {
    let read = std::fs::read_dir(dir)
        .map_err(|source| DataError::Read { path: dir.to_owned(), source })?;
    let mut classes: Vec<String> = read
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    classes.sort();
    if classes.is_empty() {
        return Err(DataError::Spec {
            spec: format!("classes:{}", dir.display()),
            message: "no class folders (expected DIR/<class>/<image>)".into(),
        });
    }
    let mut entries = Vec::new();
    for (label, class) in classes.iter().enumerate() {
        let mut files = BTreeSet::new();
        walk(&dir.join(class), Path::new(""), &mut files)?;
        for relative in files.iter().filter(|f| is_image_path(f)) {
            let key = format!("{class}/{}", relative.with_extension("").display());
            entries.push(Entry {
                key: key.clone(),
                image: dir.join(class).join(relative),
                caption: Caption::Text(class.clone()),
                label: Some(label as i64),
                origin: key,
            });
        }
    }
    Ok((FileDataset::new(dir.to_owned(), entries, SkipCounts::new()), classes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::image::test_images::{jpeg, png, write};
    use crate::sources::Dataset;

    #[test]
    fn class_folders_label_their_images() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(&d.join("dog/1.jpg"), &jpeg(8, 8));
        write(&d.join("dog/sub/2.png"), &png(8, 8));
        write(&d.join("cat/a.jpg"), &jpeg(8, 8));
        write(&d.join("cat/notes.txt"), b"not an image");
        write(&d.join(".cache/x.jpg"), &jpeg(8, 8));
        let (dataset, classes) = load(d).unwrap();
        assert_eq!(classes, ["cat", "dog"]);
        assert_eq!(dataset.len(), 3);
        let labels: Vec<(String, Option<i64>)> =
            (0..3).map(|i| dataset.get(i).unwrap()).map(|s| (s.key, s.label)).collect();
        assert_eq!(
            labels,
            [("cat/a".into(), Some(0)), ("dog/1".into(), Some(1)), ("dog/sub/2".into(), Some(1))]
        );
        assert_eq!(dataset.get(0).unwrap().caption, "cat");
        assert!(load(&d.join("cat")).is_err());
    }
}
