//! Python's `html.unescape`, ported exactly: its reference pattern, its table (all 2,231 of
//! `html.entities.html5`, generated into `html_entities.rs`), its longest-prefix rule for
//! names without `;`, and its handling of invalid numeric references.
//!
//! Not a WHATWG crate: Python departs from the HTML5 tokenizer where a caption can show it
//! (it drops control-code references such as `&#1;` that the spec keeps, and matches at most
//! 32 name characters), and token ids must be open_clip's.

use super::html_entities::ENTITIES;

/// The value of a named reference, the name as Python's table has it (with its `;` if any).
fn entity(name: &str) -> Option<&'static str> {
    let i = ENTITIES.binary_search_by(|(n, _)| (*n).cmp(name)).ok()?;
    Some(ENTITIES[i].1)
}

/// Python's `html.unescape`.
pub fn html_unescape(s: &str) -> String {
    html_unescape_with(s, false)
}

/// `require_semicolon` gives ftfy's stricter entity pattern (`&...;` only).
pub(super) fn html_unescape_with(s: &str, require_semicolon: bool) -> String {
    if !s.contains('&') {
        return s.to_owned();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let after = &rest[amp + 1..];
        match unescape_one(after, require_semicolon) {
            Some((text, consumed)) => {
                out.push_str(&text);
                rest = &after[consumed..];
            }
            None => {
                out.push('&');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Decodes the reference starting right after a `&`: Python's `_charref` pattern
/// `#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?` and `_replace_charref`. Returns the
/// replacement and the number of bytes of `s` the match took, or `None` where the pattern
/// does not match (the `&` stays).
fn unescape_one(s: &str, require_semicolon: bool) -> Option<(String, usize)> {
    if let Some(num) = s.strip_prefix('#') {
        let (hex, digits_start) = match num.as_bytes().first() {
            Some(b'x') | Some(b'X') => (true, 1),
            _ => (false, 0),
        };
        let digits = &num[digits_start..];
        let len = digits
            .bytes()
            .take_while(|b| if hex { b.is_ascii_hexdigit() } else { b.is_ascii_digit() })
            .count();
        if len == 0 {
            return None;
        }
        let semicolon = digits.as_bytes().get(len) == Some(&b';');
        if require_semicolon && !semicolon {
            return None;
        }
        // Python's int has no bound: anything past u64 is past U+10FFFF all the same.
        let value =
            u64::from_str_radix(&digits[..len], if hex { 16 } else { 10 }).unwrap_or(u64::MAX);
        let consumed = 1 + digits_start + len + usize::from(semicolon);
        return Some((numeric_reference(value), consumed));
    }
    let name_len: usize = s
        .char_indices()
        .take_while(|&(_, c)| !matches!(c, '\t' | '\n' | '\x0c' | ' ' | '<' | '&' | '#' | ';'))
        .take(32)
        .last()
        .map(|(i, c)| i + c.len_utf8())?;
    let semicolon = s.as_bytes().get(name_len) == Some(&b';');
    if require_semicolon && !semicolon {
        return None;
    }
    let matched = &s[..name_len + usize::from(semicolon)];
    if let Some(value) = entity(matched) {
        return Some((value.to_owned(), matched.len()));
    }
    if require_semicolon {
        return None;
    }
    // The longest name in the table that prefixes the match, at least two characters and
    // shorter than the match; what follows it is kept as text. Only the legacy names lack a
    // `;`, so only they can match here.
    let ends: Vec<usize> = matched.char_indices().map(|(i, _)| i).skip(2).collect();
    for &end in ends.iter().rev() {
        if let Some(value) = entity(&matched[..end]) {
            return Some((format!("{value}{}", &matched[end..]), matched.len()));
        }
    }
    None
}

/// Python's `html._replace_charref` for `&#N;`: `_invalid_charrefs` (NUL, CR and the C1
/// range read as Windows-1252), then surrogates and values past U+10FFFF as U+FFFD, then
/// `_invalid_codepoints` dropped.
fn numeric_reference(value: u64) -> String {
    match value {
        0x00 => "\u{fffd}".into(),
        0x0d => "\r".into(),
        0x80..=0x9f => cp1252(value as u32).to_string(),
        0xd800..=0xdfff => "\u{fffd}".into(),
        v if v > 0x10ffff => "\u{fffd}".into(),
        0x01..=0x08 | 0x0b | 0x0e..=0x1f | 0x7f | 0xfdd0..=0xfdef => String::new(),
        v if v & 0xfffe == 0xfffe => String::new(),
        v => char::from_u32(v as u32).map(String::from).unwrap_or_default(),
    }
}

/// Windows-1252 reading of a C1 control character, as ftfy's `fix_c1_controls` and
/// Python's `html.unescape` for `&#128;`..`&#159;` do. Undefined positions stay themselves.
pub(super) fn cp1252(cp: u32) -> char {
    let mapped = match cp {
        0x80 => 0x20ac,
        0x82 => 0x201a,
        0x83 => 0x0192,
        0x84 => 0x201e,
        0x85 => 0x2026,
        0x86 => 0x2020,
        0x87 => 0x2021,
        0x88 => 0x02c6,
        0x89 => 0x2030,
        0x8a => 0x0160,
        0x8b => 0x2039,
        0x8c => 0x0152,
        0x8e => 0x017d,
        0x91 => 0x2018,
        0x92 => 0x2019,
        0x93 => 0x201c,
        0x94 => 0x201d,
        0x95 => 0x2022,
        0x96 => 0x2013,
        0x97 => 0x2014,
        0x98 => 0x02dc,
        0x99 => 0x2122,
        0x9a => 0x0161,
        0x9b => 0x203a,
        0x9c => 0x0153,
        0x9e => 0x017e,
        0x9f => 0x0178,
        other => other,
    };
    char::from_u32(mapped).unwrap_or('\u{fffd}')
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use serde_json::Value;

    use super::*;

    #[test]
    fn html_unescape_like_python() {
        assert_eq!(html_unescape("&lt;&gt;&amp;&quot;&#39;&#x41;&#66"), "<>&\"'AB");
        assert_eq!(
            html_unescape("&ampx &notanentity; & &#0; &#150; &hellip; &hellip"),
            "&x \u{ac}anentity; & \u{fffd} \u{2013} \u{2026} &hellip"
        );
        assert_eq!(html_unescape("&#99999999999999999999;"), "\u{fffd}");
        assert_eq!(html_unescape("AT&T"), "AT&T");
    }

    #[test]
    fn the_table_is_python_html5_sorted() {
        assert_eq!(ENTITIES.len(), 2231);
        assert!(ENTITIES.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(entity("NotEqualTilde;"), Some("\u{2242}\u{338}"));
        assert_eq!(entity("copy"), Some("\u{a9}"));
        assert_eq!(entity("hellip"), None);
    }

    /// Every entity name, numeric references over the invalid ranges, and random mixtures:
    /// what Python's `html.unescape` gives (tests/fixtures/make_html_entities.py).
    #[test]
    fn golden_corpus_matches_python() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/tokenizers/html_unescape.json");
        let golden: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let cases = golden["cases"].as_array().unwrap();
        assert!(cases.len() > 5000);
        let bad: Vec<String> = cases
            .iter()
            .map(|c| (c[0].as_str().unwrap(), c[1].as_str().unwrap()))
            .filter(|(text, want)| html_unescape(text) != *want)
            .map(|(text, want)| {
                format!("{text:?}\n  python {want:?}\n  rust   {:?}", html_unescape(text))
            })
            .collect();
        assert!(
            bad.is_empty(),
            "{} of {} differ:\n{}",
            bad.len(),
            cases.len(),
            bad.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
        );
    }
}
