//! Character classes as llama.cpp's tokenizers see them, and GPT-2's byte-to-unicode table.
//!
//! llama.cpp classifies every code point into exactly one general-category group (plus a
//! separate whitespace bit) and its pre-tokenizers work on those groups, not on full Unicode
//! properties. Matching its output means classifying the same way.

use std::sync::OnceLock;

use unicode_general_category::{GeneralCategory as Gc, get_general_category};

/// llama.cpp's `unicode_cpt_flags`: one category bit, plus `WHITESPACE`. Positions outside the
/// text being split have no bits at all (`Flags::NONE`), which the splitters rely on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Flags(u16);

impl Flags {
    pub const NONE: Flags = Flags(0);
    pub const UNDEFINED: u16 = 0x0001;
    pub const NUMBER: u16 = 0x0002;
    pub const LETTER: u16 = 0x0004;
    pub const SEPARATOR: u16 = 0x0008;
    pub const ACCENT_MARK: u16 = 0x0010;
    pub const PUNCTUATION: u16 = 0x0020;
    pub const SYMBOL: u16 = 0x0040;
    pub const CONTROL: u16 = 0x0080;
    pub const CATEGORIES: u16 = 0x00FF;
    pub const WHITESPACE: u16 = 0x0100;

    #[inline]
    pub fn is_letter(self) -> bool {
        self.0 & Self::LETTER != 0
    }
    #[inline]
    pub fn is_number(self) -> bool {
        self.0 & Self::NUMBER != 0
    }
    #[inline]
    pub fn is_whitespace(self) -> bool {
        self.0 & Self::WHITESPACE != 0
    }
    /// Any bit set: every code point inside the text has one (unassigned ones are `UNDEFINED`).
    #[inline]
    pub fn any(self) -> bool {
        self.0 != 0
    }
    #[inline]
    pub fn category(self) -> u16 {
        self.0 & Self::CATEGORIES
    }
}

fn compute_flags(c: char) -> Flags {
    let cat = match get_general_category(c) {
        Gc::UppercaseLetter
        | Gc::LowercaseLetter
        | Gc::TitlecaseLetter
        | Gc::ModifierLetter
        | Gc::OtherLetter => Flags::LETTER,
        Gc::NonspacingMark | Gc::SpacingMark | Gc::EnclosingMark => Flags::ACCENT_MARK,
        Gc::DecimalNumber | Gc::LetterNumber | Gc::OtherNumber => Flags::NUMBER,
        Gc::ConnectorPunctuation
        | Gc::DashPunctuation
        | Gc::OpenPunctuation
        | Gc::ClosePunctuation
        | Gc::InitialPunctuation
        | Gc::FinalPunctuation
        | Gc::OtherPunctuation => Flags::PUNCTUATION,
        Gc::MathSymbol | Gc::CurrencySymbol | Gc::ModifierSymbol | Gc::OtherSymbol => Flags::SYMBOL,
        Gc::SpaceSeparator | Gc::LineSeparator | Gc::ParagraphSeparator => Flags::SEPARATOR,
        Gc::Control | Gc::Format | Gc::Surrogate | Gc::PrivateUse => Flags::CONTROL,
        // Unassigned, and any category a later Unicode version adds.
        _ => Flags::UNDEFINED,
    };
    // `char::is_whitespace` is Unicode's White_Space property, the set llama.cpp uses.
    let ws = if c.is_whitespace() {
        Flags::WHITESPACE
    } else {
        0
    };
    Flags(cat | ws)
}

/// Flags of one code point. The Basic Multilingual Plane is tabulated once (128 KiB); the rest
/// is rare enough to look up each time.
#[inline]
pub(crate) fn flags(c: char) -> Flags {
    static BMP: OnceLock<Box<[u16]>> = OnceLock::new();
    let cp = c as u32;
    if cp < 0x10000 {
        let t = BMP.get_or_init(|| {
            (0u32..0x10000)
                .map(|cp| char::from_u32(cp).map_or(Flags::CONTROL, |c| compute_flags(c).0))
                .collect()
        });
        Flags(t[cp as usize])
    } else {
        compute_flags(c)
    }
}

/// Bytes GPT-2 leaves as themselves: printable Latin-1 except the soft hyphen.
fn printable(b: u32) -> bool {
    (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
}

struct ByteTables {
    to_char: [char; 256],
    /// Indexed by code point (0..=0x143): the byte it stands for, or -1.
    from_char: [i16; 0x144],
}

fn byte_tables() -> &'static ByteTables {
    static T: OnceLock<ByteTables> = OnceLock::new();
    T.get_or_init(|| {
        let mut to_char = ['\0'; 256];
        let mut from_char = [-1i16; 0x144];
        let mut n = 0u32;
        for b in 0u32..256 {
            let cp = if printable(b) {
                b
            } else {
                n += 1;
                255 + n
            };
            to_char[b as usize] = char::from_u32(cp).expect("Latin-1 range");
            from_char[cp as usize] = b as i16;
        }
        ByteTables { to_char, from_char }
    })
}

/// GPT-2's byte-to-unicode mapping: the printable character standing for one raw byte.
#[inline]
pub(crate) fn byte_to_char(b: u8) -> char {
    byte_tables().to_char[b as usize]
}

/// Inverse of [`byte_to_char`]; `None` for characters that stand for no byte.
#[inline]
pub(crate) fn char_to_byte(c: char) -> Option<u8> {
    let cp = c as usize;
    match byte_tables().from_char.get(cp) {
        Some(&b) if b >= 0 => Some(b as u8),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_round_trips() {
        assert_eq!(byte_to_char(b'A'), 'A');
        assert_eq!(byte_to_char(b' '), '\u{0120}'); // 'Ġ'
        assert_eq!(byte_to_char(b'\n'), '\u{010A}'); // 'Ċ'
        assert_eq!(byte_to_char(0), '\u{0100}');
        assert_eq!(byte_to_char(0xAD), '\u{0143}');
        for b in 0..=255u8 {
            assert_eq!(char_to_byte(byte_to_char(b)), Some(b));
        }
        assert_eq!(char_to_byte('\u{0144}'), None);
        assert_eq!(char_to_byte(' '), None);
    }

    #[test]
    fn classes() {
        assert!(flags('a').is_letter());
        assert!(flags('é').is_letter());
        assert!(flags('中').is_letter());
        assert!(flags('7').is_number());
        assert!(flags('½').is_number());
        assert!(flags('٣').is_number());
        assert!(flags(' ').is_whitespace());
        assert!(flags('\n').is_whitespace());
        assert!(flags('\u{3000}').is_whitespace());
        assert!(flags('\u{85}').is_whitespace());
        assert!(!flags('\u{200B}').is_whitespace());
        assert_eq!(flags('!').category(), Flags::PUNCTUATION);
        assert_eq!(flags('~').category(), Flags::SYMBOL);
        assert_eq!(flags('\u{301}').category(), Flags::ACCENT_MARK);
        assert_eq!(flags('\u{E000}').category(), Flags::CONTROL);
        assert!(flags('\u{10FFFD}').any());
        assert_eq!(flags('😀').category(), Flags::SYMBOL);
    }
}
