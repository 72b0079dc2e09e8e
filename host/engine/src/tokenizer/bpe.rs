//! Byte-level BPE as llama.cpp runs it: the pre-tokenizer splits text into words, each word's
//! bytes are mapped to GPT-2's printable characters, and within a word the adjacent pair with the
//! lowest merge rank is merged first (ties go to the leftmost pair).

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use super::unicode::byte_to_char;
use super::{EncodeError, Meter, Tokenizer};

/// Merge ranks from `tokenizer.ggml.merges`. Merges whose two sides are vocabulary tokens (all of
/// them, in any sane vocabulary) are keyed by token ids; the rest by their text.
#[derive(Default)]
pub(crate) struct Merges {
    by_id: HashMap<(u32, u32), u32>,
    by_text: HashMap<(Box<str>, Box<str>), u32>,
}

impl Merges {
    /// llama.cpp splits each merge at the first space after its first character and keeps the
    /// first rank of a duplicated pair.
    pub fn build(merges: &[&str], lookup: impl Fn(&str) -> Option<u32>) -> Self {
        let mut m = Merges::default();
        for (rank, line) in merges.iter().enumerate() {
            let rank = rank as u32;
            let (a, b) = match line
                .char_indices()
                .skip(1)
                .find(|&(_, c)| c == ' ')
                .map(|(i, _)| i)
            {
                Some(i) => (&line[..i], &line[i + 1..]),
                None => ("", ""),
            };
            match (lookup(a), lookup(b)) {
                (Some(x), Some(y)) => {
                    m.by_id.entry((x, y)).or_insert(rank);
                }
                _ => {
                    m.by_text.entry((a.into(), b.into())).or_insert(rank);
                }
            }
        }
        m
    }

    pub fn len(&self) -> usize {
        self.by_id.len() + self.by_text.len()
    }

    /// Whether merging never yields a symbol that is no token (merges kept by text have at least
    /// one side that is no token, so they count as yielding one when their result is unknown).
    pub fn all_results_are_tokens(&self, tokens: &Tokenizer) -> bool {
        let text = |id: u32| tokens.token_text(id);
        self.by_id
            .keys()
            .all(|&(a, b)| tokens.lookup(&format!("{}{}", text(a), text(b))).is_some())
            && self
                .by_text
                .keys()
                .all(|(a, b)| tokens.lookup(&format!("{a}{b}")).is_some())
    }

    fn rank(&self, a: (Option<u32>, &str), b: (Option<u32>, &str)) -> Option<u32> {
        if let (Some(x), Some(y)) = (a.0, b.0)
            && let Some(&r) = self.by_id.get(&(x, y))
        {
            return Some(r);
        }
        if self.by_text.is_empty() {
            return None;
        }
        self.by_text
            .get(&(Box::<str>::from(a.1), Box::<str>::from(b.1)))
            .copied()
    }
}

#[derive(Clone, Copy)]
struct Sym {
    prev: i32,
    next: i32,
    start: u32,
    len: u32,
    id: Option<u32>,
}

struct Bigram {
    rank: u32,
    left: u32,
    right: u32,
    size: u32,
}

impl PartialEq for Bigram {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Bigram {
    /// The heap pops the greatest: the lowest rank, then the leftmost pair.
    fn cmp(&self, o: &Self) -> Ordering {
        o.rank.cmp(&self.rank).then(o.left.cmp(&self.left))
    }
}

/// Reusable buffers for tokenizing many words.
#[derive(Default)]
pub(crate) struct Session {
    word: String,
    syms: Vec<Sym>,
    heap: BinaryHeap<Bigram>,
}

impl Session {
    /// Byte-encodes `word` (raw text of one pre-tokenized word) and appends its tokens.
    pub fn word(
        &mut self,
        tok: &Tokenizer,
        merges: &Merges,
        raw: &str,
        out: &mut Vec<u32>,
        meter: &mut Meter<'_>,
    ) -> Result<(), EncodeError> {
        meter.tick(raw.len())?;
        self.word.clear();
        for &b in raw.as_bytes() {
            self.word.push(byte_to_char(b));
        }
        let word = std::mem::take(&mut self.word);
        let r = self.merge_word(tok, merges, &word, out, meter);
        self.word = word;
        r
    }

    fn merge_word(
        &mut self,
        tok: &Tokenizer,
        merges: &Merges,
        word: &str,
        out: &mut Vec<u32>,
        meter: &mut Meter<'_>,
    ) -> Result<(), EncodeError> {
        if word.is_empty() {
            return Ok(());
        }
        if tok.ignore_merges
            && let Some(id) = tok.lookup(word)
        {
            out.push(id);
            return Ok(());
        }
        let syms = &mut self.syms;
        let heap = &mut self.heap;
        syms.clear();
        heap.clear();
        let n_chars = word.chars().count();
        for (i, (at, ch)) in word.char_indices().enumerate() {
            let len = ch.len_utf8();
            syms.push(Sym {
                prev: i as i32 - 1,
                next: if i + 1 == n_chars { -1 } else { i as i32 + 1 },
                start: at as u32,
                len: len as u32,
                id: tok.lookup(&word[at..at + len]),
            });
        }
        let text = |s: &Sym| &word[s.start as usize..(s.start + s.len) as usize];
        let try_add = |syms: &[Sym], heap: &mut BinaryHeap<Bigram>, l: i32, r: i32| {
            if l < 0 || r < 0 {
                return;
            }
            let (ls, rs) = (&syms[l as usize], &syms[r as usize]);
            if let Some(rank) = merges.rank((ls.id, text(ls)), (rs.id, text(rs))) {
                heap.push(Bigram {
                    rank,
                    left: l as u32,
                    right: r as u32,
                    size: ls.len + rs.len,
                });
            }
        };
        for i in 1..syms.len() {
            try_add(syms, heap, i as i32 - 1, i as i32);
            meter.tick(1)?;
        }
        while let Some(b) = heap.pop() {
            meter.tick(1)?;
            let (l, r) = (b.left as usize, b.right as usize);
            let (ll, rl) = (syms[l].len, syms[r].len);
            // Both sides unmerged since the pair was queued means the pair's text is unchanged.
            if ll == 0 || rl == 0 || ll + rl != b.size {
                continue;
            }
            syms[l].len += rl;
            syms[r].len = 0;
            syms[l].id = tok.lookup(text(&syms[l]));
            let rn = syms[r].next;
            syms[l].next = rn;
            if rn >= 0 {
                syms[rn as usize].prev = l as i32;
            }
            let lp = syms[l].prev;
            try_add(syms, heap, lp, l as i32);
            try_add(syms, heap, l as i32, rn);
        }
        for s in syms.iter().filter(|s| s.len > 0) {
            match s.id {
                Some(id) => out.push(id),
                None => {
                    // llama.cpp's fallback: each byte of the (encoded) text as a one-byte token.
                    for &b in text(s).as_bytes() {
                        if b < 0x80
                            && let Some(id) = tok.lookup(std::str::from_utf8(&[b]).expect("ASCII"))
                        {
                            out.push(id);
                        }
                    }
                }
            }
        }
        Ok(())
    }
}
