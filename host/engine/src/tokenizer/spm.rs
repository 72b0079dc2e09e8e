//! SentencePiece-style BPE as llama.cpp runs it: start from single characters, repeatedly merge
//! the adjacent pair whose concatenation is the highest-scoring vocabulary token (ties go to the
//! leftmost pair), then map leftover characters that are not tokens to byte tokens.
//!
//! Every merged symbol is a vocabulary token, so symbols never grow past the longest token and the
//! whole text costs O(n log n), however long it is and whether or not it has spaces.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::{EncodeError, Meter, Tokenizer};

#[derive(Clone, Copy)]
struct Sym {
    prev: i32,
    next: i32,
    start: u32,
    len: u32,
}

struct Bigram {
    score: f32,
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
    /// The heap pops the greatest: the highest score, then the leftmost pair.
    fn cmp(&self, o: &Self) -> Ordering {
        if self.score > o.score {
            Ordering::Greater
        } else if self.score < o.score {
            Ordering::Less
        } else {
            o.left.cmp(&self.left)
        }
    }
}

/// Tokenizes one fragment (already space-escaped) and appends the ids to `out`.
pub(crate) fn tokenize(
    tok: &Tokenizer,
    text: &str,
    out: &mut Vec<u32>,
    meter: &mut Meter<'_>,
) -> Result<(), EncodeError> {
    if text.is_empty() {
        return Ok(());
    }
    let mut syms: Vec<Sym> = Vec::with_capacity(text.len());
    let n_chars = text.chars().count();
    for (i, (at, ch)) in text.char_indices().enumerate() {
        syms.push(Sym {
            prev: i as i32 - 1,
            next: if i + 1 == n_chars { -1 } else { i as i32 + 1 },
            start: at as u32,
            len: ch.len_utf8() as u32,
        });
    }
    let mut heap = BinaryHeap::with_capacity(syms.len());
    let try_add = |syms: &[Sym], heap: &mut BinaryHeap<Bigram>, l: i32, r: i32| {
        if l < 0 || r < 0 {
            return;
        }
        let (ls, rs) = (syms[l as usize], syms[r as usize]);
        let size = ls.len + rs.len;
        let s = &text[ls.start as usize..(ls.start + size) as usize];
        if let Some(id) = tok.lookup(s) {
            heap.push(Bigram {
                score: tok.scores[id as usize],
                left: l as u32,
                right: r as u32,
                size,
            });
        }
    };
    for i in 1..syms.len() {
        try_add(&syms, &mut heap, i as i32 - 1, i as i32);
        meter.tick(1)?;
    }
    while let Some(b) = heap.pop() {
        meter.tick(1)?;
        let (l, r) = (b.left as usize, b.right as usize);
        let (ll, rl) = (syms[l].len, syms[r].len);
        // A pair is stale once either side has merged with something else.
        if ll == 0 || rl == 0 || ll + rl != b.size {
            continue;
        }
        syms[l].len += rl;
        syms[r].len = 0;
        let rn = syms[r].next;
        syms[l].next = rn;
        if rn >= 0 {
            syms[rn as usize].prev = l as i32;
        }
        let lp = syms[l].prev;
        try_add(&syms, &mut heap, lp, l as i32);
        try_add(&syms, &mut heap, l as i32, rn);
    }
    let mut i = 0i32;
    while i >= 0 {
        let s = syms[i as usize];
        let piece = &text[s.start as usize..(s.start + s.len) as usize];
        match tok.lookup(piece) {
            Some(id) => out.push(id),
            None => {
                for &b in piece.as_bytes() {
                    if let Some(id) = tok.byte_token(b) {
                        out.push(id);
                    }
                }
            }
        }
        i = s.next;
    }
    Ok(())
}
