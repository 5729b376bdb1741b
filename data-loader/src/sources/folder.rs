//! A folder of images with sidecar captions: every `NAME.jpg|jpeg|png|webp` below the folder
//! (recursively, sorted by relative path) is a sample whose caption is `NAME.txt` beside it.
//! An image without its `.txt` is dropped while reading and counted as `missing_caption`;
//! the caption file itself is read on `get`. Hidden files and folders (names starting with a
//! dot, such as macOS's `._NAME.jpg`) are not samples, and symbolic links to folders are not
//! followed (a link loop cannot hang the walk).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::files::{skip_record, Caption, Entry, FileDataset};
use crate::error::DataError;
use crate::formats::image::is_image_path;
use crate::skip::{SkipCounts, SkipReason};

/// Lists the images of `dir` and their captions into a [`FileDataset`].
pub fn load(dir: &Path) -> Result<FileDataset, DataError> {
    let mut files = BTreeSet::new();
    walk(dir, Path::new(""), &mut files)?;
    let mut entries = Vec::new();
    let mut skips = SkipCounts::new();
    for relative in &files {
        if !is_image_path(relative) {
            continue;
        }
        let caption = relative.with_extension("txt");
        let origin = relative.display().to_string();
        if !files.contains(&caption) {
            let reason = SkipReason::MissingCaption.as_str();
            let detail = format!("no {}", caption.display());
            skip_record(&mut skips, reason, dir, &origin, &detail);
            continue;
        }
        let key = relative
            .with_extension("")
            .components()
            .map(|c| c.as_os_str().to_string_lossy())
            .collect::<Vec<_>>()
            .join("/");
        entries.push(Entry {
            label: None,
            key,
            image: dir.join(relative),
            caption: Caption::File(dir.join(&caption)),
            origin,
        });
    }
    Ok(FileDataset::new(dir.to_owned(), entries, skips))
}

/// Adds the files below `root/relative` to `files`, as paths relative to `root`.
pub(crate) fn walk(
    root: &Path,
    relative: &Path,
    files: &mut BTreeSet<PathBuf>,
) -> Result<(), DataError> {
    let dir = root.join(relative);
    let entries =
        std::fs::read_dir(&dir).map_err(|source| DataError::Read { path: dir.clone(), source })?;
    for entry in entries {
        let entry = entry.map_err(|source| DataError::Read { path: dir.clone(), source })?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let path = relative.join(&name);
        let Ok(file_type) = entry.file_type() else {
            continue;
        };
        if file_type.is_dir() {
            walk(root, &path, files)?;
        } else if file_type.is_file() || (file_type.is_symlink() && entry.path().is_file()) {
            files.insert(path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::image::test_images::{jpeg, png, write};
    use crate::sources::spec::DataSpec;
    use crate::sources::Dataset;

    #[test]
    fn images_with_sidecar_captions_sorted_and_recursive() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(&d.join("b.jpg"), &jpeg(8, 8));
        write(&d.join("b.txt"), b"a picture of b\n");
        write(&d.join("a.PNG"), &png(4, 6));
        write(&d.join("a.txt"), b"a");
        write(&d.join("sub/c.jpeg"), &jpeg(5, 5));
        write(&d.join("sub/c.txt"), b"c in a folder");
        write(&d.join("sub/no_caption.webp"), b"RIFF");
        write(&d.join("sub/d.jpg"), b"not a jpeg");
        write(&d.join("sub/d.txt"), b"broken");
        write(&d.join("notes.md"), b"not a sample");
        write(&d.join("._b.jpg"), b"macOS resource fork");
        write(&d.join(".cache/x.jpg"), &jpeg(2, 2));

        // A plain directory of images (no .tar) is a folder source.
        let spec = DataSpec::parse(d.to_str().unwrap()).unwrap();
        assert_eq!(spec, DataSpec::Folder(d.to_owned()));
        let ds = load(d).unwrap();
        let keys: Vec<_> = ds.entries().iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["a", "b", "sub/c", "sub/d"]);
        assert_eq!(ds.load_skips().get("missing_caption"), Some(&1));
        assert_eq!(ds.load_skips().total(), 1);
        let a = ds.get(0).unwrap();
        assert_eq!((a.caption.as_str(), a.image.dimensions()), ("a", (4, 6)));
        assert_eq!(ds.get(1).unwrap().caption, "a picture of b");
        assert_eq!(ds.get(2).unwrap().image.dimensions(), (5, 5));
        assert_eq!(ds.get(3), Err(SkipReason::UndecodableImage));
        // A caption deleted after opening is a skip on get, not a panic.
        std::fs::remove_file(d.join("b.txt")).unwrap();
        assert_eq!(ds.get(1), Err(SkipReason::MissingCaption));
    }

    #[test]
    fn folder_prefix_and_missing_directory() {
        let dir = tempfile::tempdir().unwrap();
        let spec = format!("folder:{}", dir.path().display());
        assert_eq!(DataSpec::parse(&spec).unwrap(), DataSpec::Folder(dir.path().to_owned()));
        assert!(load(dir.path()).unwrap().is_empty());
        let missing = format!("folder:{}/nope", dir.path().display());
        let err = DataSpec::parse(&missing).unwrap_err().to_string();
        assert!(err.contains("nope"), "{err}");
        assert!(load(&dir.path().join("nope")).is_err());
    }
}
