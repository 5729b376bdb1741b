//! Why a sample was skipped, and how many were. A bad sample is never fatal and never lost
//! from the counts: readers and workers turn it into a [`SkipReason`],
//! the batcher adds it to the batch's [`SkipCounts`], the trainer logs and sums them.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Why one sample could not be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum SkipReason {
    /// The image bytes are not an image the decoder can read (corrupt, cut short, or not an
    /// image at all).
    UndecodableImage,
    /// The sample has no image member.
    MissingImage,
    /// The sample has no caption member.
    MissingCaption,
    /// The caption is empty or only whitespace.
    EmptyCaption,
    /// The caption is not valid UTF-8.
    NonUtf8Caption,
    /// The header announces more pixels than the limit (decompression-bomb guard).
    TooManyPixels,
    /// The shard ends in the middle of a member; the sample being read is lost.
    TruncatedShard,
    /// The shard could not be opened or is not a tar file.
    UnreadableShard,
    /// A `.cls` member that is not a decimal integer.
    BadLabel,
    /// Two members of one sample share an extension.
    DuplicateMember,
    /// A CSV row or JSONL line that cannot be parsed.
    BadRecord,
    /// A well-formed image in a format oxclip does not read (GIF, BMP, TIFF, ...): only JPEG,
    /// PNG and WebP are decoded.
    UnsupportedImage,
    /// The shard's reads stalled: no byte for `data.read_timeout_s` (a `pipe:` command that
    /// hangs, a stalled object store or NFS server). The sample being read and the rest of
    /// the shard are lost.
    StalledShard,
}

impl SkipReason {
    /// Every reason, in declaration order.
    pub const ALL: [SkipReason; 13] = [
        SkipReason::UndecodableImage,
        SkipReason::MissingImage,
        SkipReason::MissingCaption,
        SkipReason::EmptyCaption,
        SkipReason::NonUtf8Caption,
        SkipReason::TooManyPixels,
        SkipReason::TruncatedShard,
        SkipReason::UnreadableShard,
        SkipReason::BadLabel,
        SkipReason::DuplicateMember,
        SkipReason::BadRecord,
        SkipReason::UnsupportedImage,
        SkipReason::StalledShard,
    ];

    /// Stable snake_case name, used as the key in [`SkipCounts`] and in logs/metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::UndecodableImage => "undecodable_image",
            SkipReason::MissingImage => "missing_image",
            SkipReason::MissingCaption => "missing_caption",
            SkipReason::EmptyCaption => "empty_caption",
            SkipReason::NonUtf8Caption => "non_utf8_caption",
            SkipReason::TooManyPixels => "too_many_pixels",
            SkipReason::TruncatedShard => "truncated_shard",
            SkipReason::UnreadableShard => "unreadable_shard",
            SkipReason::BadLabel => "bad_label",
            SkipReason::DuplicateMember => "duplicate_member",
            SkipReason::BadRecord => "bad_record",
            SkipReason::UnsupportedImage => "unsupported_image",
            SkipReason::StalledShard => "stalled_shard",
        }
    }

    /// The reason for `n` samples in words, for people: `undecodable image`, `3 missing
    /// captions` reads as `n` followed by this.
    pub fn words(self, n: u64) -> &'static str {
        let (one, many) = match self {
            SkipReason::UndecodableImage => ("undecodable image", "undecodable images"),
            SkipReason::MissingImage => ("missing image", "missing images"),
            SkipReason::MissingCaption => ("missing caption", "missing captions"),
            SkipReason::EmptyCaption => ("empty caption", "empty captions"),
            SkipReason::NonUtf8Caption => ("caption not in UTF-8", "captions not in UTF-8"),
            SkipReason::TooManyPixels => {
                ("image above the pixel limit", "images above the pixel limit")
            }
            SkipReason::TruncatedShard => ("truncated shard", "truncated shards"),
            SkipReason::UnreadableShard => ("unreadable shard", "unreadable shards"),
            SkipReason::BadLabel => ("bad class label", "bad class labels"),
            SkipReason::DuplicateMember => {
                ("sample with a duplicate member", "samples with a duplicate member")
            }
            SkipReason::BadRecord => ("unreadable record", "unreadable records"),
            SkipReason::UnsupportedImage => (
                "image in an unsupported format (only JPEG, PNG and WebP are read)",
                "images in an unsupported format (only JPEG, PNG and WebP are read)",
            ),
            SkipReason::StalledShard => ("stalled shard", "stalled shards"),
        };
        if n == 1 {
            one
        } else {
            many
        }
    }

    /// The reason named `name` ([`as_str`](Self::as_str)).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == name)
    }
}

/// The reason in words (`undecodable image`); [`as_str`](Self::as_str) is the stable key.
impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.words(1))
    }
}

/// Skipped-sample counts by [`SkipReason::as_str`]. A map with a few helpers; it serialises
/// as a plain JSON object (`{"undecodable_image": 3}`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SkipCounts(pub BTreeMap<String, u64>);

impl SkipCounts {
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one sample skipped for `reason`.
    pub fn add(&mut self, reason: SkipReason) {
        *self.0.entry(reason.as_str().to_owned()).or_insert(0) += 1;
    }

    /// Adds every count of `other` to `self`.
    pub fn merge(&mut self, other: &SkipCounts) {
        for (reason, n) in &other.0 {
            *self.0.entry(reason.clone()).or_insert(0) += n;
        }
    }

    /// Samples skipped for any reason.
    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }
}

/// The counts in words, largest first: `3 undecodable images, 1 missing caption`; `none`
/// when empty.
impl fmt::Display for SkipCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut counts: Vec<(&String, &u64)> = self.0.iter().filter(|(_, n)| **n > 0).collect();
        if counts.is_empty() {
            return f.write_str("none");
        }
        counts.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
        for (i, (name, n)) in counts.into_iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            match SkipReason::from_name(name) {
                Some(reason) => write!(f, "{n} {}", reason.words(*n))?,
                None => write!(f, "{n} {}", name.replace('_', " "))?,
            }
        }
        Ok(())
    }
}

impl Deref for SkipCounts {
    type Target = BTreeMap<String, u64>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl DerefMut for SkipCounts {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl<'a> IntoIterator for &'a SkipCounts {
    type Item = (&'a String, &'a u64);
    type IntoIter = std::collections::btree_map::Iter<'a, String, u64>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// A sample that a shard reader had to give up on: the reason plus where it was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SampleError {
    pub reason: SkipReason,
    pub shard: PathBuf,
    /// The sample key, when the reader got far enough to know it.
    pub key: Option<String>,
    /// Details for the log (the underlying I/O or parse error).
    pub message: String,
}

impl fmt::Display for SampleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "shard {}", self.shard.display())?;
        if let Some(key) = &self.key {
            write!(f, ", sample {key}")?;
        }
        write!(f, ": {}", self.reason)?;
        if !self.message.is_empty() {
            write!(f, " ({})", self.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for SampleError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_merge_and_serialise_as_a_map() {
        let mut a = SkipCounts::new();
        a.add(SkipReason::UndecodableImage);
        a.add(SkipReason::UndecodableImage);
        let mut b = SkipCounts::new();
        b.add(SkipReason::EmptyCaption);
        b.merge(&a);
        assert_eq!(b.total(), 3);
        assert_eq!(b.get("undecodable_image"), Some(&2));
        let json = serde_json::to_string(&b).unwrap();
        assert_eq!(json, r#"{"empty_caption":1,"undecodable_image":2}"#);
        let back: SkipCounts = serde_json::from_str(&json).unwrap();
        assert_eq!(back, b);
    }

    #[test]
    fn counts_read_as_words_largest_first() {
        let mut c = SkipCounts::new();
        assert_eq!(c.to_string(), "none");
        c.add(SkipReason::MissingCaption);
        for _ in 0..3 {
            c.add(SkipReason::UndecodableImage);
        }
        c.add(SkipReason::UnsupportedImage);
        assert_eq!(
            c.to_string(),
            "3 undecodable images, 1 missing caption, \
             1 image in an unsupported format (only JPEG, PNG and WebP are read)"
        );
        assert!(!c.to_string().contains("SkipCounts") && !c.to_string().contains('{'));
        assert_eq!(SkipReason::TruncatedShard.to_string(), "truncated shard");
        assert_eq!(SkipReason::from_name("bad_record"), Some(SkipReason::BadRecord));
    }

    #[test]
    fn reason_names_are_unique() {
        let names: std::collections::BTreeSet<_> =
            SkipReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), SkipReason::ALL.len());
    }
}
