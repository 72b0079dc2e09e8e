//! Vocabulary from GGUF metadata and detokenization. (Encoding text — SentencePiece and
//! byte-level BPE with llama.cpp's pre-tokenizers — belongs to the text-layer work and lands
//! here next.)

use crate::Error;
use crate::gguf::GgufFile;

/// llama.cpp's token attribute codes (`tokenizer.ggml.token_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    fn from_i64(v: i64) -> Self {
        match v {
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => TokenType::Normal,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VocabKind {
    /// SentencePiece-style (`llama`): '▁' stands for a space, `<0xNN>` tokens are raw bytes.
    SentencePiece,
    /// Byte-level BPE (`gpt2`): every byte is mapped to a printable code point.
    ByteLevel,
}

pub struct Vocab {
    pub kind: VocabKind,
    pub tokens: Vec<String>,
    pub types: Vec<TokenType>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: bool,
}

impl Vocab {
    pub fn from_gguf(f: &GgufFile) -> Result<Self, Error> {
        let kind = match f.get_str("tokenizer.ggml.model")? {
            "llama" => VocabKind::SentencePiece,
            "gpt2" => VocabKind::ByteLevel,
            other => {
                return Err(Error::BadModel(format!(
                    "unsupported tokenizer model {other:?} (supported: llama, gpt2)"
                )));
            }
        };
        let tokens: Vec<String> = f
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.as_array())
            .ok_or_else(|| Error::BadModel("tokenizer.ggml.tokens is missing".into()))?
            .iter()
            .map(|v| v.as_str().unwrap_or_default().to_string())
            .collect();
        let types = match f
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.as_array())
        {
            Some(t) if t.len() == tokens.len() => t
                .iter()
                .map(|v| TokenType::from_i64(v.as_i64().unwrap_or(1)))
                .collect(),
            _ => vec![TokenType::Normal; tokens.len()],
        };
        let id = |k: &str| -> Result<Option<u32>, Error> { Ok(f.opt_u64(k)?.map(|v| v as u32)) };
        Ok(Vocab {
            kind,
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            add_bos: f
                .opt_bool("tokenizer.ggml.add_bos_token")?
                .unwrap_or(kind == VocabKind::SentencePiece),
            tokens,
            types,
        })
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The bytes one token stands for when rendered as text (control tokens render as nothing).
    pub fn piece(&self, id: u32) -> Vec<u8> {
        let Some(tok) = self.tokens.get(id as usize) else {
            return Vec::new();
        };
        match self.types[id as usize] {
            TokenType::Control | TokenType::Unused => return Vec::new(),
            TokenType::Byte => {
                if let Some(b) = parse_byte_token(tok) {
                    return vec![b];
                }
            }
            _ => {}
        }
        match self.kind {
            VocabKind::SentencePiece => tok.replace('\u{2581}', " ").into_bytes(),
            VocabKind::ByteLevel => tok.chars().map(unicode_to_byte).collect(),
        }
    }

    /// Concatenated pieces, invalid UTF-8 replaced (for display).
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids.iter().flat_map(|&t| self.piece(t)).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

fn parse_byte_token(s: &str) -> Option<u8> {
    let hex = s.strip_prefix("<0x")?.strip_suffix('>')?;
    u8::from_str_radix(hex, 16).ok()
}

/// Inverse of GPT-2's byte-to-unicode table: printable Latin-1 bytes map to themselves, the rest
/// were shifted to U+0100 and up in byte order.
fn unicode_to_byte(c: char) -> u8 {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let cp = c as u32;
    if cp < 256 && printable(cp) {
        return cp as u8;
    }
    let mut n = 256u32;
    for b in 0u32..256 {
        if !printable(b) {
            if n == cp {
                return b as u8;
            }
            n += 1;
        }
    }
    b'?'
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_inverse_table() {
        assert_eq!(unicode_to_byte('A'), b'A');
        assert_eq!(unicode_to_byte('\u{0120}'), b' '); // 'Ġ'
        assert_eq!(unicode_to_byte('\u{010A}'), b'\n'); // 'Ċ'
        assert_eq!(unicode_to_byte('\u{0100}'), 0);
    }

    #[test]
    fn byte_tokens() {
        assert_eq!(parse_byte_token("<0x0A>"), Some(10));
        assert_eq!(parse_byte_token("<0xZZ>"), None);
    }
}
