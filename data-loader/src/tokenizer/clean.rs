//! open_clip's text cleaning: `basic_clean` (the part of ftfy we reproduce, HTML
//! unescaping), `whitespace_clean`, and the `clean` modes of its `HFTokenizer`.

use super::html::{cp1252, html_unescape, html_unescape_with};

/// open_clip's `HFTokenizer` text cleaning (`tokenizer_kwargs.clean`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Clean {
    /// `whitespace_clean(basic_clean(text))`: open_clip's default for these tokenizers.
    Whitespace,
    /// The same, lower-cased.
    Lower,
    /// `canonicalize_text(basic_clean(text))`: `_` to space, ASCII punctuation removed,
    /// lower-cased, whitespace collapsed (big_vision's, for SigLIP).
    Canonicalize,
}

impl Clean {
    /// `whitespace`, `lower` or `canonicalize`, as open_clip names them.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "whitespace" => Some(Self::Whitespace),
            "lower" => Some(Self::Lower),
            "canonicalize" => Some(Self::Canonicalize),
            _ => None,
        }
    }

    /// The cleaned text.
    pub fn apply(self, text: &str) -> String {
        let basic = basic_clean(text);
        match self {
            Self::Whitespace => whitespace_join(&basic),
            Self::Lower => whitespace_join(&basic).to_lowercase(),
            Self::Canonicalize => {
                let kept: String =
                    basic.replace('_', " ").chars().filter(|c| !c.is_ascii_punctuation()).collect();
                whitespace_join(&kept.to_lowercase())
            }
        }
    }
}

/// open_clip's `_clean_lower`: `whitespace_clean(basic_clean(text)).lower()`, where
/// `basic_clean` is `ftfy.fix_text`, `html.unescape` twice and `strip`.
///
/// Of ftfy 6's `fix_text` we reproduce: HTML unescaping when the text has no `<`
/// (`unescape_html="auto"`), C1 control characters read as Windows-1252, Latin ligatures,
/// full-width characters (the ASCII range, U+3000 and U+FF5F..U+FFEE), curly quotes,
/// terminal escapes, control characters, and NFC. Skipped: mojibake repair (`fix_encoding`,
/// e.g. `cafÃ©` stays as is), half-width katakana/hangul, surrogate repair (Rust strings
/// cannot hold surrogates), and ftfy's repeat-until-stable loop.
pub fn clip_clean(text: &str) -> String {
    whitespace_join(&basic_clean(text)).to_lowercase()
}

/// open_clip's `basic_clean`: `ftfy.fix_text` (what [`clip_clean`] reproduces of it),
/// `html.unescape` twice, `strip`.
pub fn basic_clean(text: &str) -> String {
    let s = html_unescape(&html_unescape(&ftfy_basic(text)));
    s.trim_matches(is_py_space).to_owned()
}

/// Python's `str.isspace`: Unicode White_Space plus the information separators
/// U+001C..U+001F.
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// `" ".join(text.split())`.
fn whitespace_join(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for word in s.split(is_py_space).filter(|w| !w.is_empty()) {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    out
}

/// The subset of `ftfy.fix_text` described on [`clip_clean`].
fn ftfy_basic(text: &str) -> String {
    let mut s = if text.contains('<') { text.to_owned() } else { html_unescape_with(text, true) };
    s = remove_terminal_escapes(&s);
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        let cp = c as u32;
        match cp {
            0x80..=0x9f => out.push(cp1252(cp)),
            // Latin ligatures (ftfy LIGATURES: NFKC of each).
            0x132 => out.push_str("IJ"),
            0x133 => out.push_str("ij"),
            0x149 => out.push_str("'n"), // ŉ -> ʼn, whose ʼ is then uncurled
            0x1c7 => out.push_str("LJ"),
            0x1c8 => out.push_str("Lj"),
            0x1c9 => out.push_str("lj"),
            0x1ca => out.push_str("NJ"),
            0x1cb => out.push_str("Nj"),
            0x1cc => out.push_str("nj"),
            0x1f1 => out.push_str("DZ"),
            0x1f2 => out.push_str("Dz"),
            0x1f3 => out.push_str("dz"),
            0xfb00 => out.push_str("ff"),
            0xfb01 => out.push_str("fi"),
            0xfb02 => out.push_str("fl"),
            0xfb03 => out.push_str("ffi"),
            0xfb04 => out.push_str("ffl"),
            0xfb05 | 0xfb06 => out.push_str("st"),
            // Character width (ftfy WIDTH_MAP, the parts we keep).
            0x3000 => out.push(' '),
            0xff01..=0xff5e => out.extend(char::from_u32(cp - 0xfee0)),
            0xff5f => out.push('\u{2985}'),
            0xff60 => out.push('\u{2986}'),
            0xffe0 => out.push('\u{a2}'),
            0xffe1 => out.push('\u{a3}'),
            0xffe2 => out.push('\u{ac}'),
            0xffe3 => out.push_str(" \u{304}"),
            0xffe4 => out.push('\u{a6}'),
            0xffe5 => out.push('\u{a5}'),
            0xffe6 => out.push('\u{20a9}'),
            0xffe8 => out.push('\u{2502}'),
            0xffe9 => out.push('\u{2190}'),
            0xffea => out.push('\u{2191}'),
            0xffeb => out.push('\u{2192}'),
            0xffec => out.push('\u{2193}'),
            0xffed => out.push('\u{25a0}'),
            0xffee => out.push('\u{25cb}'),
            // Curly quotes.
            0x2bc | 0x2018..=0x201b => out.push('\''),
            0x201c..=0x201f => out.push('"'),
            // Line breaks become '\n' in ftfy; whitespace_clean folds them anyway.
            // Control characters ftfy removes.
            0x00..=0x08
            | 0x0b
            | 0x0e..=0x1f
            | 0x7f
            | 0x206a..=0x206f
            | 0xfeff
            | 0xfff9..=0xfffc => {}
            _ => out.push(c),
        }
    }
    let mut normalized = tokenizers::NormalizedString::from(out.as_str());
    normalized.nfc();
    normalized.get().to_owned()
}

/// Removes ANSI terminal escapes `ESC [ (digits|;)* letter` (ftfy `remove_terminal_escapes`).
fn remove_terminal_escapes(s: &str) -> String {
    if !s.contains('\u{1b}') {
        return s.to_owned();
    }
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '\u{1b}' && chars.get(i + 1) == Some(&'[') {
            let mut j = i + 2;
            while j < chars.len() && (chars[j].is_ascii_digit() || chars[j] == ';') {
                j += 1;
            }
            if j < chars.len() && chars[j].is_ascii_alphabetic() {
                i = j + 1;
                continue;
            }
        }
        out.push(chars[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_follows_open_clip() {
        assert_eq!(clip_clean("  Hello\t\nWORLD  "), "hello world");
        assert_eq!(clip_clean("&amp;lt;b&amp;gt;"), "<b>");
        assert_eq!(clip_clean("caf\u{e9} \u{fb01}sh"), "caf\u{e9} fish");
        assert_eq!(clip_clean("\u{ff21}\u{ff42}\u{ff43}"), "abc");
        assert_eq!(clip_clean("\u{201c}quoted\u{201d}"), "\"quoted\"");
        assert_eq!(clip_clean("e\u{301}"), "\u{e9}");
        assert_eq!(clip_clean("\u{1b}[31mred\u{1b}[0m"), "red");
    }

    #[test]
    fn clean_modes_follow_open_clip() {
        assert_eq!(
            Clean::Canonicalize.apply("  A_Photo, of  the CAT!! &amp; "),
            "a photo of the cat"
        );
        assert_eq!(Clean::Whitespace.apply("  A  Photo\tof &amp;amp; "), "A Photo of &");
        assert_eq!(Clean::Lower.apply(" A  Photo "), "a photo");
        assert_eq!(Clean::parse("canonicalize"), Some(Clean::Canonicalize));
        assert_eq!(Clean::parse("upper"), None);
    }
}
