//! How a value from a request is shown in an error message. Here, in the
//! lowest crate of the workspace, so that selector errors and the agent's
//! own use one rule: a refusal copies the offending value into the gRPC
//! status message, which travels as an HTTP/2 header, and past the
//! client's header limit (16 KiB for hyper and grpc-python) the client
//! sees a protocol error instead of the refusal. A shortened value still
//! tells the caller which one was wrong.

use std::fmt;

/// The most characters of a value an error message shows: enough for a
/// selector of a digest or a SPIFFE ID of ordinary depth, a hundredth of
/// the header size clients accept.
pub const EXCERPT_CHARS: usize = 128;

/// A value as an error message shows it: whole when it has at most
/// [`EXCERPT_CHARS`] characters, else its first ones followed by
/// `… (N bytes)`. `{}` shows the characters as they are but for control
/// characters, escaped (`\u{1b}`) so that a message cannot rewrite the
/// reader's terminal; `{:?}` quotes and escapes, as `{:?}` of the value
/// itself would.
#[derive(Clone, Copy)]
pub struct Excerpt<'a>(&'a str);

/// `value` as an error message shows it (see [`Excerpt`]).
pub fn excerpt(value: &str) -> Excerpt<'_> {
    Excerpt(value)
}

impl<'a> Excerpt<'a> {
    /// The part shown, and whether anything was left out.
    fn head(&self) -> (&'a str, bool) {
        match self.0.char_indices().nth(EXCERPT_CHARS) {
            Some((cut, _)) => (&self.0[..cut], true),
            None => (self.0, false),
        }
    }
}

impl fmt::Display for Excerpt<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (head, cut) = self.head();
        for c in head.chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_debug())?;
            } else {
                write!(f, "{c}")?;
            }
        }
        if cut {
            write!(f, "… ({} bytes)", self.0.len())?;
        }
        Ok(())
    }
}

impl fmt::Debug for Excerpt<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.head() {
            (all, false) => write!(f, "{all:?}"),
            (head, true) => write!(f, "{head:?}… ({} bytes)", self.0.len()),
        }
    }
}

/// A character in request text that would forge or hide what a reader of
/// it is shown, and where it stands: a control character (an escape
/// sequence, a carriage return), or a Unicode formatting character that
/// shows nothing itself but changes what is shown (zero-width characters,
/// so that `read\u{200b}_only` reads as `read_only` to a person but not to
/// policy; bidirectional overrides, which reorder the text around them;
/// the soft hyphen; the byte order mark).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unshowable {
    pub at: usize,
    pub char: char,
}

/// The first unshowable character of `text`, but for the control
/// characters in `allowed` (free text may keep line feeds and tabs).
pub fn find_unshowable(text: &str, allowed: &[char]) -> Option<Unshowable> {
    text.char_indices()
        .find(|(_, c)| (c.is_control() && !allowed.contains(c)) || is_hidden_format(*c))
        .map(|(at, char)| Unshowable { at, char })
}

/// Unicode's default-ignorable code points (shown as nothing when not
/// supported: tag characters, variation selectors, fillers, joiners), the
/// other format characters (Cf: Arabic and Egyptian number and annotation
/// marks), and the line and paragraph separators, which break a line where
/// a reader expects none. Unicode 16, DerivedCoreProperties.txt and
/// UnicodeData.txt.
fn is_hidden_format(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{034F}'
            | '\u{0600}'..='\u{0605}'
            | '\u{061C}'
            | '\u{06DD}'
            | '\u{070F}'
            | '\u{0890}'..='\u{0891}'
            | '\u{08E2}'
            | '\u{115F}'..='\u{1160}'
            | '\u{17B4}'..='\u{17B5}'
            | '\u{180B}'..='\u{180F}'
            | '\u{200B}'..='\u{200F}'
            | '\u{2028}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{3164}'
            | '\u{FE00}'..='\u{FE0F}'
            | '\u{FEFF}'
            | '\u{FFA0}'
            | '\u{FFF0}'..='\u{FFFB}'
            | '\u{110BD}'
            | '\u{110CD}'
            | '\u{13430}'..='\u{1343F}'
            | '\u{1BCA0}'..='\u{1BCA3}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0000}'..='\u{E0FFF}'
    )
}

impl fmt::Display for Unshowable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.char.is_control() {
            "control"
        } else {
            "invisible formatting"
        };
        write!(
            f,
            "the {kind} character U+{:04X} at byte {}",
            u32::from(self.char),
            self.at
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_and_hidden_formatting_characters_are_found_unless_allowed() {
        assert_eq!(find_unshowable("plain é ✓", &[]), None);
        let found = find_unshowable("ab\u{1b}[2J", &[]).map(|u| u.to_string());
        assert_eq!(
            found.as_deref(),
            Some("the control character U+001B at byte 2")
        );
        let found = find_unshowable("read\u{200b}_only", &[]).map(|u| u.to_string());
        assert_eq!(
            found.as_deref(),
            Some("the invisible formatting character U+200B at byte 4")
        );
        // Tag characters (hidden text in prompts), line separators,
        // variation selectors, fillers and joiners read as nothing, or as a
        // line break a reader does not expect.
        for hidden in [
            '\u{E0020}',
            '\u{E0061}',
            '\u{E007F}',
            '\u{2028}',
            '\u{2029}',
            '\u{FE0F}',
            '\u{E0100}',
            '\u{3164}',
            '\u{FFA0}',
            '\u{115F}',
            '\u{034F}',
            '\u{17B4}',
            '\u{180B}',
            '\u{FFF9}',
            '\u{206A}',
            '\u{1D173}',
        ] {
            let text = format!("jira{hidden}prod");
            assert_eq!(
                find_unshowable(&text, &['\n', '\t']).map(|u| (u.at, u.char)),
                Some((4, hidden)),
                "U+{:04X}",
                u32::from(hidden)
            );
        }
        // Visible text of any script passes.
        assert_eq!(find_unshowable("ticket №42 — 東京 ü ß 🙂 ☕", &[]), None);
        assert_eq!(find_unshowable("a\n\tb", &['\n', '\t']), None);
        assert!(find_unshowable("a\n\tb", &[]).is_some());
    }

    #[test]
    fn a_short_value_is_shown_whole_and_a_long_one_cut_with_its_length() {
        assert_eq!(excerpt("abc").to_string(), "abc");
        assert_eq!(excerpt("a\u{1b}[2Jb\n").to_string(), "a\\u{1b}[2Jb\\n");
        assert_eq!(format!("{:?}", excerpt("a\"b")), r#""a\"b""#);
        let exact = "x".repeat(EXCERPT_CHARS);
        assert_eq!(excerpt(&exact).to_string(), exact);

        let long = "q".repeat(20_000);
        let shown = excerpt(&long).to_string();
        assert_eq!(
            shown,
            format!("{}… (20000 bytes)", "q".repeat(EXCERPT_CHARS))
        );
        let quoted = format!("{:?}", excerpt(&long));
        assert_eq!(
            quoted,
            format!("\"{}\"… (20000 bytes)", "q".repeat(EXCERPT_CHARS))
        );
        // Cut at a character, never inside one.
        let wide = "é".repeat(200);
        assert_eq!(
            excerpt(&wide).to_string(),
            format!("{}… (400 bytes)", "é".repeat(EXCERPT_CHARS))
        );
    }
}
