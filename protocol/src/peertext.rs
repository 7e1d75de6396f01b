//! Text that came from a peer, made safe to log or show.
//!
//! A peer (the control plane, a node, an operator's payload) controls every string it sends. Put
//! raw into a log line, a newline forges a second line and an ANSI escape repaints the operator's
//! terminal; put raw into `runos status`, a megabyte of text buries everything else. Every
//! peer-supplied string that reaches a log, an error message or a status report goes through
//! [`PeerText`] (or [`clean`]), once, here:
//!
//! - control characters (C0, DEL, C1), line and paragraph separators and Unicode bidi overrides
//!   are written as `\u{…}` escapes, and a backslash as `\\`, so the text stays on one line and
//!   its original can be recovered;
//! - the result is cut at [`MAX_CHARS`] characters (or a smaller cap) and marked with `…(+N)`.
//!
//! ```
//! use runos_protocol::peertext::PeerText;
//! let s = format!("{}", PeerText::new("abc\n\x1b[31mforged INFO line"));
//! assert_eq!(s, "abc\\u{a}\\u{1b}[31mforged INFO line");
//! ```

use std::fmt::{self, Write as _};

/// Default cap, in characters, of a peer string shown in a log or a status report.
pub const MAX_CHARS: usize = 256;

/// A peer-supplied string, displayed escaped and capped. Cheap: it formats lazily.
#[derive(Debug, Clone, Copy)]
pub struct PeerText<'a> {
    text: &'a str,
    max_chars: usize,
}

impl<'a> PeerText<'a> {
    /// Wrap `text`, capped at [`MAX_CHARS`] characters.
    pub fn new(text: &'a str) -> Self {
        Self::capped(text, MAX_CHARS)
    }

    /// Wrap `text`, capped at `max_chars` characters (at least 1).
    pub fn capped(text: &'a str, max_chars: usize) -> Self {
        Self {
            text,
            max_chars: max_chars.max(1),
        }
    }
}

/// Whether `c` must be escaped: it could break a line, move the cursor, recolour a terminal or
/// reorder the text around it.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || c == '\\'
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}')
        || ('\u{202a}'..='\u{202e}').contains(&c)
        || ('\u{2066}'..='\u{2069}').contains(&c)
        || c == '\u{feff}'
}

impl fmt::Display for PeerText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut chars = self.text.chars();
        for (shown, c) in chars.by_ref().enumerate() {
            if shown == self.max_chars {
                // Count what is left without allocating.
                let rest = 1 + chars.count();
                return write!(f, "…(+{rest})");
            }
            if c == '\\' {
                f.write_str("\\\\")?;
            } else if needs_escape(c) {
                write!(f, "\\u{{{:x}}}", c as u32)?;
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

/// `text` escaped and capped at `max_chars` characters, as an owned string (for storing in a
/// status report).
pub fn clean(text: &str, max_chars: usize) -> String {
    PeerText::capped(text, max_chars).to_string()
}

/// Whether `text` would be shown unchanged: at most `max_chars` characters and nothing to
/// escape. Use it to decide whether a peer's field is acceptable as it is.
pub fn is_clean(text: &str, max_chars: usize) -> bool {
    text.chars().count() <= max_chars && !text.chars().any(needs_escape)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newlines_and_escapes_stay_on_one_line() {
        let s = clean("a\r\nb\x1b[2Jc\u{85}d\u{2028}e\u{202e}f", 100);
        assert!(!s.contains('\n') && !s.contains('\r') && !s.contains('\x1b'));
        assert_eq!(s, "a\\u{d}\\u{a}b\\u{1b}[2Jc\\u{85}d\\u{2028}e\\u{202e}f");
    }

    #[test]
    fn backslash_is_escaped_so_the_original_is_recoverable() {
        assert_eq!(clean("a\\u{a}", 100), "a\\\\u{a}");
    }

    #[test]
    fn long_text_is_capped_and_marked() {
        let s = clean(&"x".repeat(1000), 10);
        assert_eq!(s, format!("{}…(+990)", "x".repeat(10)));
        // Multibyte text is cut on a character boundary.
        let s = clean(&"é".repeat(20), 5);
        assert_eq!(s, format!("{}…(+15)", "é".repeat(5)));
    }

    #[test]
    fn clean_text_is_unchanged() {
        assert_eq!(clean("node-1 ünïcode ok", 100), "node-1 ünïcode ok");
        assert!(is_clean("v1.2.3", 32));
        assert!(!is_clean("v1\n", 32));
        assert!(!is_clean("abcd", 3));
    }
}
