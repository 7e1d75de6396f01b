//! The `checksums.txt` manifest: parser, lookups and canonical writer.

use std::collections::HashMap;
use std::fmt;

use crate::Digest;

/// Largest manifest [`Manifest::parse`] accepts: 1 MiB.
pub const MAX_MANIFEST_BYTES: usize = 1024 * 1024;

/// Most entries (lines) a manifest may hold: 10 000.
pub const MAX_ENTRIES: usize = 10_000;

/// Longest file name, in bytes: 255 (the usual file-system limit).
pub const MAX_NAME_BYTES: usize = 255;

/// Longest excerpt of an offending line that an error carries, in characters.
const EXCERPT_CHARS: usize = 24;

/// One line of a manifest: a file name and its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    name: String,
    digest: Digest,
}

impl Entry {
    /// The file name (validated by [`validate_name`]).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file's SHA-256.
    pub fn digest(&self) -> Digest {
        self.digest
    }
}

/// A parsed sha256sum manifest: entries in file order, names unique.
///
/// Its `Display` is the canonical form: one `<lowercase hex>  <name>\n` line per entry, in
/// order, which [`Manifest::parse`] turns back into an equal manifest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Manifest {
    entries: Vec<Entry>,
    index: HashMap<String, usize>,
}

/// Why a file name is not acceptable in a manifest (see [`validate_name`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is empty.
    #[error("the file name is empty")]
    Empty,
    /// The name is longer than [`MAX_NAME_BYTES`].
    #[error("the file name is longer than {MAX_NAME_BYTES} bytes")]
    TooLong,
    /// The name is `.` or `..`.
    #[error("the file name is . or ..")]
    Dots,
    /// The name contains `/` or `\`.
    #[error("the file name contains a path separator (/ or \\)")]
    PathSeparator,
    /// The name contains whitespace, a control character (NUL included) or a non-ASCII
    /// character.
    #[error("the file name contains whitespace, a control character or a non-ASCII character")]
    Character,
}

/// Checks a file name as a manifest entry name: 1 to [`MAX_NAME_BYTES`] bytes of printable
/// ASCII other than space, `/` and `\`, and not `.` or `..`.
///
/// This is deliberately narrower than what `sha256sum` can print: release asset names never
/// need more, and a name that can only be a plain file in one directory cannot be turned into
/// a path elsewhere or be confused with another name.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(NameError::TooLong);
    }
    if name == "." || name == ".." {
        return Err(NameError::Dots);
    }
    for b in name.bytes() {
        if b == b'/' || b == b'\\' {
            return Err(NameError::PathSeparator);
        }
        if !b.is_ascii_graphic() {
            return Err(NameError::Character);
        }
    }
    Ok(())
}

/// Why a manifest was rejected. Every variant about content names the 1-based line; none
/// carries more than a short excerpt of the input, with control characters escaped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// The manifest is larger than [`MAX_MANIFEST_BYTES`].
    #[error("checksum manifest is {size} bytes, more than the {max} allowed")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The bound.
        max: usize,
    },
    /// The manifest has more than [`MAX_ENTRIES`] lines.
    #[error("checksum manifest has more than {max} lines")]
    TooManyLines {
        /// The bound.
        max: usize,
    },
    /// The line is not valid UTF-8.
    #[error("checksum manifest line {line}: not valid UTF-8")]
    NotUtf8 {
        /// 1-based line number.
        line: usize,
    },
    /// The line ends with a carriage return (CR-LF line endings are not accepted) or holds one.
    #[error("checksum manifest line {line}: carriage return (only LF line endings are accepted)")]
    CarriageReturn {
        /// 1-based line number.
        line: usize,
    },
    /// An empty line before the end of the manifest.
    #[error("checksum manifest line {line}: empty line")]
    EmptyLine {
        /// 1-based line number.
        line: usize,
    },
    /// The line is not `<digest>  <name>` or `<digest> *<name>`.
    #[error(
        "checksum manifest line {line}: expected \"<sha256>  <name>\" or \"<sha256> *<name>\", found \"{excerpt}\""
    )]
    Malformed {
        /// 1-based line number.
        line: usize,
        /// The start of the line, control characters escaped.
        excerpt: String,
    },
    /// The digest field is not 64 characters long.
    #[error("checksum manifest line {line}: the sha256 is {len} characters long, expected 64")]
    DigestLength {
        /// 1-based line number.
        line: usize,
        /// Characters found before the first space.
        len: usize,
    },
    /// The digest field has a character that is not a hex digit.
    #[error("checksum manifest line {line}: the sha256 has a character that is not a hex digit")]
    DigestNotHex {
        /// 1-based line number.
        line: usize,
    },
    /// The file name is not acceptable.
    #[error("checksum manifest line {line}: {reason}")]
    InvalidName {
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: NameError,
    },
    /// The file name already appeared on an earlier line.
    #[error("checksum manifest line {line}: {name} is listed twice (first on line {first_line})")]
    DuplicateName {
        /// 1-based line number of the second occurrence.
        line: usize,
        /// 1-based line number of the first.
        first_line: usize,
        /// The name (validated, so printable; shortened past 64 characters).
        name: String,
    },
}

/// At most [`EXCERPT_CHARS`] characters of `text`, control and non-ASCII characters escaped.
fn excerpt(text: &str) -> String {
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i == EXCERPT_CHARS {
            out.push('…');
            break;
        }
        if c.is_ascii_graphic() || c == ' ' {
            out.push(c);
        } else {
            out.extend(c.escape_default());
        }
    }
    out
}

fn shorten(name: &str) -> String {
    match name.get(..64) {
        Some(head) if head.len() < name.len() => format!("{head}…"),
        _ => name.to_string(),
    }
}

impl Manifest {
    /// An empty manifest.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses a sha256sum manifest, strictly.
    ///
    /// Accepted: lines `<64 hex>  <name>` (text mode, two spaces) and `<64 hex> *<name>`
    /// (binary mode), separated by `\n`. The digest may be upper or lower case and is stored
    /// as bytes. The last line may or may not end with `\n`. An empty input is an empty
    /// manifest.
    ///
    /// Rejected, with the line number: a manifest over [`MAX_MANIFEST_BYTES`] or
    /// [`MAX_ENTRIES`] lines; invalid UTF-8; any `\r` (CR-LF files are refused rather than
    /// guessed at: a trailing `\r` would otherwise end up in a name or be silently dropped);
    /// empty lines (also a second `\n` at the end); a digest that is not 64 hex digits; any
    /// other separator (one space, a tab, a BSD-style `SHA256 (name) = …` line, comments); a
    /// name that [`validate_name`] refuses; a name listed twice, even with the same digest.
    /// `sha256sum`'s backslash-escaped lines (names with `\` or a newline) are refused as
    /// malformed.
    pub fn parse(input: &[u8]) -> Result<Self, ManifestError> {
        if input.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge {
                size: input.len(),
                max: MAX_MANIFEST_BYTES,
            });
        }
        let body = input.strip_suffix(b"\n").unwrap_or(input);
        let mut manifest = Self::new();
        if input.is_empty() {
            return Ok(manifest);
        }
        for (i, raw) in body.split(|b| *b == b'\n').enumerate() {
            let line = i + 1;
            if line > MAX_ENTRIES {
                return Err(ManifestError::TooManyLines { max: MAX_ENTRIES });
            }
            let text = std::str::from_utf8(raw).map_err(|_| ManifestError::NotUtf8 { line })?;
            let (digest, name) = parse_line(line, text)?;
            manifest.insert_at(name, digest).map_err(|e| match e {
                InsertError::Name(reason) => ManifestError::InvalidName { line, reason },
                InsertError::Duplicate { first } => ManifestError::DuplicateName {
                    line,
                    first_line: first,
                    name: shorten(name),
                },
            })?;
        }
        Ok(manifest)
    }

    /// Builds a manifest from names and digests, in order, with the same name rules and
    /// uniqueness as [`Manifest::parse`].
    pub fn from_entries<'a>(
        entries: impl IntoIterator<Item = (&'a str, Digest)>,
    ) -> Result<Self, ManifestError> {
        let mut manifest = Self::new();
        for (name, digest) in entries {
            manifest.insert(name, digest)?;
        }
        Ok(manifest)
    }

    /// Appends an entry. The error names the line the entry would have had.
    pub fn insert(&mut self, name: &str, digest: Digest) -> Result<(), ManifestError> {
        let line = self.entries.len() + 1;
        if line > MAX_ENTRIES {
            return Err(ManifestError::TooManyLines { max: MAX_ENTRIES });
        }
        self.insert_at(name, digest).map_err(|e| match e {
            InsertError::Name(reason) => ManifestError::InvalidName { line, reason },
            InsertError::Duplicate { first } => ManifestError::DuplicateName {
                line,
                first_line: first,
                name: shorten(name),
            },
        })
    }

    fn insert_at(&mut self, name: &str, digest: Digest) -> Result<(), InsertError> {
        validate_name(name).map_err(InsertError::Name)?;
        if let Some(&first) = self.index.get(name) {
            return Err(InsertError::Duplicate { first: first + 1 });
        }
        self.index.insert(name.to_string(), self.entries.len());
        self.entries.push(Entry {
            name: name.to_string(),
            digest,
        });
        Ok(())
    }

    /// The digest listed for `name`, if any. Names are compared exactly (case-sensitive).
    pub fn get(&self, name: &str) -> Option<Digest> {
        self.index
            .get(name)
            .and_then(|&i| self.entries.get(i))
            .map(|e| e.digest)
    }

    /// The entries, in file order.
    pub fn iter(&self) -> std::slice::Iter<'_, Entry> {
        self.entries.iter()
    }

    /// How many entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl<'a> IntoIterator for &'a Manifest {
    type Item = &'a Entry;
    type IntoIter = std::slice::Iter<'a, Entry>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl fmt::Display for Manifest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for entry in &self.entries {
            writeln!(f, "{}  {}", entry.digest, entry.name)?;
        }
        Ok(())
    }
}

enum InsertError {
    Name(NameError),
    Duplicate { first: usize },
}

/// Splits one line (without its `\n`) into digest and name.
fn parse_line(line: usize, text: &str) -> Result<(Digest, &str), ManifestError> {
    if text.contains('\r') {
        return Err(ManifestError::CarriageReturn { line });
    }
    if text.is_empty() {
        return Err(ManifestError::EmptyLine { line });
    }
    let Some((field, rest)) = text.split_once(' ') else {
        return Err(ManifestError::Malformed {
            line,
            excerpt: excerpt(text),
        });
    };
    if field.len() != Digest::HEX_LEN {
        // A field of the right length in characters but not in bytes has non-ASCII in it.
        let len = field.chars().count();
        return Err(if len == Digest::HEX_LEN {
            ManifestError::DigestNotHex { line }
        } else {
            ManifestError::DigestLength { line, len }
        });
    }
    let digest: Digest = field
        .parse()
        .map_err(|_| ManifestError::DigestNotHex { line })?;
    let name = rest
        .strip_prefix(' ')
        .or_else(|| rest.strip_prefix('*'))
        .ok_or_else(|| ManifestError::Malformed {
            line,
            excerpt: excerpt(text),
        })?;
    Ok((digest, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    const B: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn d(hex: &str) -> Digest {
        hex.parse().unwrap()
    }

    fn err(input: &str) -> ManifestError {
        Manifest::parse(input.as_bytes()).unwrap_err()
    }

    #[test]
    fn text_and_binary_modes() {
        let input = format!(
            "{A}  runos_linux_amd64.tar.gz\n{} *runos_linux_arm64.tar.gz\n",
            B.to_uppercase()
        );
        let m = Manifest::parse(input.as_bytes()).unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m.get("runos_linux_amd64.tar.gz"), Some(d(A)));
        assert_eq!(m.get("runos_linux_arm64.tar.gz"), Some(d(B)));
        assert_eq!(m.get("RUNOS_linux_amd64.tar.gz"), None);
        assert_eq!(m.get("missing"), None);
        let names: Vec<_> = m.iter().map(Entry::name).collect();
        assert_eq!(
            names,
            ["runos_linux_amd64.tar.gz", "runos_linux_arm64.tar.gz"]
        );
        // Canonical form: lowercase, text mode.
        assert_eq!(
            m.to_string(),
            format!("{A}  runos_linux_amd64.tar.gz\n{B}  runos_linux_arm64.tar.gz\n")
        );
        assert_eq!(Manifest::parse(m.to_string().as_bytes()).unwrap(), m);
    }

    #[test]
    fn final_newline_is_optional_and_empty_is_empty() {
        let m = Manifest::parse(format!("{A}  a").as_bytes()).unwrap();
        assert_eq!(m.get("a"), Some(d(A)));
        assert!(Manifest::parse(b"").unwrap().is_empty());
        assert_eq!(err("\n"), ManifestError::EmptyLine { line: 1 });
    }

    #[test]
    fn empty_lines_are_rejected() {
        assert_eq!(
            err(&format!("{A}  a\n\n")),
            ManifestError::EmptyLine { line: 2 }
        );
        assert_eq!(
            err(&format!("{A}  a\n\n{B}  b\n")),
            ManifestError::EmptyLine { line: 2 }
        );
    }

    #[test]
    fn carriage_returns_are_rejected() {
        assert_eq!(
            err(&format!("{A}  a\r\n")),
            ManifestError::CarriageReturn { line: 1 }
        );
        assert_eq!(
            err(&format!("{A}  a\n{B}  b\r\n")),
            ManifestError::CarriageReturn { line: 2 }
        );
        assert_eq!(
            err(&format!("{A}  a\rb\n")),
            ManifestError::CarriageReturn { line: 1 }
        );
    }

    #[test]
    fn malformed_lines() {
        assert!(matches!(
            err("no-separator"),
            ManifestError::Malformed { line: 1, .. }
        ));
        assert_eq!(
            err(&format!("{A} a\n")),
            ManifestError::Malformed {
                line: 1,
                excerpt: format!("{}…", &A[..24])
            }
        );
        assert!(matches!(
            err(&format!("{A}\ta\n")),
            ManifestError::Malformed { line: 1, .. }
        ));
        assert!(matches!(
            err(&format!("{A}   a\n")),
            ManifestError::InvalidName {
                line: 1,
                reason: NameError::Character
            }
        ));
        assert!(matches!(
            err(&format!("SHA256 (a) = {A}\n")),
            ManifestError::DigestLength { line: 1, len: 6 }
        ));
        assert!(matches!(
            err(&format!("# comment\n{A}  a\n")),
            ManifestError::DigestLength { line: 1, len: 1 }
        ));
        assert!(matches!(
            err(&format!("\\{A}  a\\\\b\n")),
            ManifestError::DigestLength { line: 1, len: 65 }
        ));
        assert!(matches!(
            err(&format!(" {A}  a\n")),
            ManifestError::DigestLength { line: 1, len: 0 }
        ));
    }

    #[test]
    fn digest_errors() {
        assert_eq!(
            err(&format!("{}  a\n", &A[..63])),
            ManifestError::DigestLength { line: 1, len: 63 }
        );
        let mut bad = A.to_string();
        bad.replace_range(0..1, "z");
        assert_eq!(
            err(&format!("{B}  b\n{bad}  a\n")),
            ManifestError::DigestNotHex { line: 2 }
        );
        let wide = format!("é{}", &A[2..]);
        assert_eq!(
            err(&format!("{wide}  a\n")),
            ManifestError::DigestNotHex { line: 1 }
        );
    }

    #[test]
    fn name_rules() {
        let cases: &[(&str, NameError)] = &[
            ("", NameError::Empty),
            (".", NameError::Dots),
            ("..", NameError::Dots),
            ("a/b", NameError::PathSeparator),
            ("../etc/passwd", NameError::PathSeparator),
            ("/abs", NameError::PathSeparator),
            ("a\\b", NameError::PathSeparator),
            ("a\0b", NameError::Character),
            ("a\tb", NameError::Character),
            ("a\u{7f}", NameError::Character),
            ("a\u{1b}[31m", NameError::Character),
            ("a b", NameError::Character),
            ("é", NameError::Character),
            ("a\u{200b}", NameError::Character),
        ];
        for (name, reason) in cases {
            assert_eq!(validate_name(name), Err(*reason), "{name:?}");
            assert_eq!(
                err(&format!("{A}  {name}\n")),
                ManifestError::InvalidName {
                    line: 1,
                    reason: *reason
                },
                "{name:?}"
            );
        }
        let long = "x".repeat(MAX_NAME_BYTES + 1);
        assert_eq!(validate_name(&long), Err(NameError::TooLong));
        assert!(validate_name(&long[1..]).is_ok());
        for ok in [
            "...",
            ".hidden",
            "a..b",
            "runos_0.24.0_linux_amd64.tar.gz",
            "checksums.txt",
            "*star",
        ] {
            assert_eq!(validate_name(ok), Ok(()), "{ok:?}");
        }
    }

    #[test]
    fn binary_mode_name_starting_with_star() {
        // "<hex> **x" is binary mode for "*x".
        let m = Manifest::parse(format!("{A} **x\n").as_bytes()).unwrap();
        assert_eq!(m.get("*x"), Some(d(A)));
        // "<hex>  *x" is text mode for "*x" too.
        let m = Manifest::parse(format!("{A}  *x\n").as_bytes()).unwrap();
        assert_eq!(m.get("*x"), Some(d(A)));
    }

    #[test]
    fn duplicates_are_rejected() {
        let e = err(&format!("{A}  a\n{B}  b\n{A} *a\n"));
        assert_eq!(
            e,
            ManifestError::DuplicateName {
                line: 3,
                first_line: 1,
                name: "a".into()
            }
        );
        assert_eq!(
            e.to_string(),
            "checksum manifest line 3: a is listed twice (first on line 1)"
        );
        // Names differing in case are different names.
        assert!(Manifest::parse(format!("{A}  a\n{A}  A\n").as_bytes()).is_ok());
    }

    #[test]
    fn not_utf8() {
        let mut input = format!("{A}  a\n{B}  ").into_bytes();
        input.extend_from_slice(&[0xff, 0xfe, b'\n']);
        assert_eq!(
            Manifest::parse(&input).unwrap_err(),
            ManifestError::NotUtf8 { line: 2 }
        );
    }

    #[test]
    fn size_and_line_bounds() {
        let big = vec![b'a'; MAX_MANIFEST_BYTES + 1];
        assert_eq!(
            Manifest::parse(&big).unwrap_err(),
            ManifestError::TooLarge {
                size: MAX_MANIFEST_BYTES + 1,
                max: MAX_MANIFEST_BYTES
            }
        );
        // MAX_ENTRIES lines fit in the size bound (66 + name + 1 bytes each).
        let mut input = String::new();
        for i in 0..MAX_ENTRIES {
            input.push_str(&format!("{A}  {i}\n"));
        }
        assert!(input.len() <= MAX_MANIFEST_BYTES);
        assert_eq!(
            Manifest::parse(input.as_bytes()).unwrap().len(),
            MAX_ENTRIES
        );
        input.push_str(&format!("{A}  more\n"));
        assert_eq!(
            Manifest::parse(input.as_bytes()).unwrap_err(),
            ManifestError::TooManyLines { max: MAX_ENTRIES }
        );
        // Many empty lines are rejected at the first one, not counted.
        let newlines = vec![b'\n'; MAX_MANIFEST_BYTES];
        assert_eq!(
            Manifest::parse(&newlines).unwrap_err(),
            ManifestError::EmptyLine { line: 1 }
        );
    }

    #[test]
    fn excerpts_are_short_and_escaped() {
        let e = err("\u{1b}]0;pwned\u{7}xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx");
        let ManifestError::Malformed { excerpt, .. } = &e else {
            panic!("{e:?}");
        };
        assert!(!excerpt.chars().any(char::is_control), "{excerpt:?}");
        assert!(excerpt.starts_with("\\u{1b}]0;pwned\\u{7}"), "{excerpt:?}");
        assert!(excerpt.ends_with('…'));
        assert!(e.to_string().len() < 200);
    }

    #[test]
    fn builder_validates_like_the_parser() {
        let m = Manifest::from_entries([("a", d(A)), ("b", d(B))]).unwrap();
        assert_eq!(Manifest::parse(m.to_string().as_bytes()).unwrap(), m);
        assert_eq!(
            Manifest::from_entries([("a", d(A)), ("a", d(B))]).unwrap_err(),
            ManifestError::DuplicateName {
                line: 2,
                first_line: 1,
                name: "a".into()
            }
        );
        assert_eq!(
            Manifest::from_entries([("a/b", d(A))]).unwrap_err(),
            ManifestError::InvalidName {
                line: 1,
                reason: NameError::PathSeparator
            }
        );
        let long = "y".repeat(MAX_NAME_BYTES);
        let mut m = Manifest::new();
        m.insert(&long, d(A)).unwrap();
        let ManifestError::DuplicateName { name, .. } = m.insert(&long, d(A)).unwrap_err() else {
            panic!()
        };
        assert_eq!(name.chars().count(), 65);
    }
}
