//! What data to train on, as the user writes it: `synthetic:N`, a brace pattern of shards
//! (`data/{00000..01243}.tar`, as webdataset and img2dataset write them), one `.tar`, or a
//! directory of `.tar` shards. Several shard specs can be joined with `::`.

use std::path::{Path, PathBuf};

use crate::error::DataError;

/// Most shard paths one spec may expand to; far above any real dataset, low enough that a
/// typo like `{0..99999999999}` fails at once instead of filling memory.
const MAX_EXPANSION: usize = 10_000_000;

/// A parsed data spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataSpec {
    /// `synthetic:N`: N procedurally drawn scenes (see `synth`), nothing read from disk.
    Synthetic(u64),
    /// WebDataset shards, in order; every one exists.
    Shards(Vec<PathBuf>),
}

impl DataSpec {
    /// Parses `spec` and checks that every shard it names exists (the error names the first
    /// missing path).
    pub fn parse(spec: &str) -> Result<DataSpec, DataError> {
        let spec_err = |message: String| DataError::Spec {
            spec: spec.to_owned(),
            message,
        };
        let trimmed = spec.trim();
        if trimmed.is_empty() {
            return Err(spec_err("empty".into()));
        }
        if let Some(n) = trimmed.strip_prefix("synthetic:") {
            let n: u64 = n
                .trim()
                .parse()
                .map_err(|_| spec_err(format!("`{n}` is not a sample count (synthetic:N)")))?;
            if n == 0 {
                return Err(spec_err("synthetic:N needs at least one sample".into()));
            }
            return Ok(DataSpec::Synthetic(n));
        }
        let mut shards = Vec::new();
        for part in trimmed.split("::") {
            let part = part.trim();
            if part.is_empty() {
                return Err(spec_err("empty source between `::`".into()));
            }
            if part.starts_with("synthetic:") {
                return Err(spec_err("synthetic:N cannot be joined with shards".into()));
            }
            shards.extend(shards_of(spec, part)?);
        }
        Ok(DataSpec::Shards(shards))
    }
}

/// The shards of one `::`-separated source.
fn shards_of(spec: &str, source: &str) -> Result<Vec<PathBuf>, DataError> {
    let spec_err = |message: String| DataError::Spec {
        spec: spec.to_owned(),
        message,
    };
    if source.contains('{') || source.contains('}') {
        let paths = expand_braces(source).map_err(spec_err)?;
        for p in &paths {
            if !Path::new(p).is_file() {
                return Err(DataError::MissingShard {
                    spec: spec.to_owned(),
                    path: PathBuf::from(p),
                });
            }
        }
        return Ok(paths.into_iter().map(PathBuf::from).collect());
    }
    let path = PathBuf::from(source);
    if path.is_dir() {
        let entries = std::fs::read_dir(&path).map_err(|source| DataError::Read {
            path: path.clone(),
            source,
        })?;
        let mut shards: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "tar"))
            .collect();
        shards.sort();
        if shards.is_empty() {
            return Err(spec_err(format!(
                "directory {} holds no .tar shards",
                path.display()
            )));
        }
        return Ok(shards);
    }
    if !path.exists() {
        return Err(DataError::MissingShard {
            spec: spec.to_owned(),
            path,
        });
    }
    if path.extension().is_some_and(|e| e == "tar") {
        return Ok(vec![path]);
    }
    Err(spec_err(format!(
        "{} is not a .tar shard, a directory of shards, a brace pattern or synthetic:N",
        path.display()
    )))
}

/// Bash-style brace expansion as the `braceexpand` package does it for webdataset:
/// `{00000..00012}` (zero-padded to the wider bound when either has a leading zero; an
/// optional `..step`; descending ranges count down) and `{a,b,c}` lists. Several groups
/// expand left to right, the first varying slowest. Nested braces are an error.
pub fn expand_braces(pattern: &str) -> Result<Vec<String>, String> {
    let Some(open) = pattern.find('{') else {
        if pattern.contains('}') {
            return Err("`}` without `{`".into());
        }
        return Ok(vec![pattern.to_owned()]);
    };
    if pattern[..open].contains('}') {
        return Err("`}` without `{`".into());
    }
    let close = pattern[open..]
        .find('}')
        .map(|i| i + open)
        .ok_or_else(|| "`{` without `}`".to_string())?;
    let body = &pattern[open + 1..close];
    if body.contains('{') {
        return Err("nested braces are not supported".into());
    }
    let alternatives = if body.contains(',') {
        body.split(',').map(str::to_owned).collect()
    } else if body.contains("..") {
        expand_range(body)?
    } else {
        return Err(format!(
            "`{{{body}}}` is neither a range `{{a..b}}` nor a list `{{a,b}}`"
        ));
    };
    let prefix = &pattern[..open];
    let rest = expand_braces(&pattern[close + 1..])?;
    if alternatives.len().saturating_mul(rest.len()) > MAX_EXPANSION {
        return Err(format!("expands to more than {MAX_EXPANSION} paths"));
    }
    let mut out = Vec::with_capacity(alternatives.len() * rest.len());
    for alt in &alternatives {
        for tail in &rest {
            out.push(format!("{prefix}{alt}{tail}"));
        }
    }
    Ok(out)
}

/// `a..b` or `a..b..step` over integers.
fn expand_range(body: &str) -> Result<Vec<String>, String> {
    let parts: Vec<&str> = body.split("..").collect();
    let bad = || format!("`{{{body}}}` is not an integer range `{{a..b}}`");
    let (lo_s, hi_s, step) = match parts.as_slice() {
        [a, b] => (*a, *b, 1u64),
        [a, b, s] => (
            *a,
            *b,
            s.trim_start_matches('-')
                .parse::<u64>()
                .map_err(|_| bad())?
                .max(1),
        ),
        _ => return Err(bad()),
    };
    let lo: i64 = lo_s.parse().map_err(|_| bad())?;
    let hi: i64 = hi_s.parse().map_err(|_| bad())?;
    let count = (lo.abs_diff(hi) / step) as usize + 1;
    if count > MAX_EXPANSION {
        return Err(format!(
            "`{{{body}}}` expands to more than {MAX_EXPANSION} paths"
        ));
    }
    let padded = |s: &str| {
        let digits = s.trim_start_matches('-');
        digits.len() > 1 && digits.starts_with('0')
    };
    let width = if padded(lo_s) || padded(hi_s) {
        lo_s.len().max(hi_s.len())
    } else {
        0
    };
    let step = step as i64;
    let mut out = Vec::with_capacity(count);
    let mut v = lo;
    for _ in 0..count {
        out.push(if v < 0 {
            format!("-{:0>w$}", v.unsigned_abs(), w = width.saturating_sub(1))
        } else {
            format!("{v:0>width$}")
        });
        v = if lo <= hi { v + step } else { v - step };
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn braces_expand_like_braceexpand() {
        assert_eq!(
            expand_braces("d/{00000..00003}.tar").unwrap(),
            ["d/00000.tar", "d/00001.tar", "d/00002.tar", "d/00003.tar"]
        );
        assert_eq!(expand_braces("{8..11}").unwrap(), ["8", "9", "10", "11"]);
        assert_eq!(expand_braces("{09..11}").unwrap(), ["09", "10", "11"]);
        assert_eq!(expand_braces("{3..1}").unwrap(), ["3", "2", "1"]);
        assert_eq!(expand_braces("{0..6..3}").unwrap(), ["0", "3", "6"]);
        assert_eq!(
            expand_braces("{a,b}/{0..1}.tar").unwrap(),
            ["a/0.tar", "a/1.tar", "b/0.tar", "b/1.tar"]
        );
        assert_eq!(expand_braces("x{,y}").unwrap(), ["x", "xy"]);
        assert_eq!(expand_braces("plain.tar").unwrap(), ["plain.tar"]);
        for bad in [
            "{0..",
            "0..1}",
            "{{0..1}}",
            "{x..y}",
            "{abc}",
            "{0..99999999999}",
        ] {
            assert!(expand_braces(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parse_specs() {
        assert_eq!(
            DataSpec::parse("synthetic:1000").unwrap(),
            DataSpec::Synthetic(1000)
        );
        for bad in ["synthetic:", "synthetic:x", "synthetic:0", ""] {
            assert!(DataSpec::parse(bad).is_err(), "{bad}");
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for name in ["00001.tar", "00000.tar", "00002.tar", "notes.txt"] {
            std::fs::write(d.join(name), b"").unwrap();
        }
        let all = DataSpec::Shards(vec![
            d.join("00000.tar"),
            d.join("00001.tar"),
            d.join("00002.tar"),
        ]);
        assert_eq!(DataSpec::parse(d.to_str().unwrap()).unwrap(), all);
        let pattern = format!("{}/{{00000..00002}}.tar", d.display());
        assert_eq!(DataSpec::parse(&pattern).unwrap(), all);
        let single = d.join("00001.tar");
        assert_eq!(
            DataSpec::parse(single.to_str().unwrap()).unwrap(),
            DataSpec::Shards(vec![single.clone()])
        );
        let joined = format!("{}::{}", single.display(), d.join("00000.tar").display());
        assert_eq!(
            DataSpec::parse(&joined).unwrap(),
            DataSpec::Shards(vec![single, d.join("00000.tar")])
        );

        // Missing shards are named.
        let missing = format!("{}/{{00000..00003}}.tar", d.display());
        let err = DataSpec::parse(&missing).unwrap_err().to_string();
        assert!(err.contains("00003.tar"), "{err}");
        let err = DataSpec::parse(d.join("nope.tar").to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope.tar"), "{err}");
        let err = DataSpec::parse(d.join("notes.txt").to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("notes.txt"), "{err}");
        let empty = d.join("empty");
        std::fs::create_dir(&empty).unwrap();
        assert!(DataSpec::parse(empty.to_str().unwrap()).is_err());
    }
}
