//! [`BlockSet`]: a sorted set of block numbers of one relation fork, kept
//! small whatever its shape.
//!
//! Block numbers are cut in chunks of 65 536 (the high 16 bits name the
//! chunk, 512 MiB of an 8 KiB-block relation). Each chunk holds its low 16
//! bits in whichever of three forms is smallest for what it holds: a sorted
//! array (2 bytes a block, for scattered blocks), a bitmap (8 KiB, for dense
//! ones), or runs of consecutive blocks (4 bytes a run, for bulk loads, new
//! indexes, table rewrites). PostgreSQL's `blkreftable.c` chunks the same way
//! but has only arrays and bitmaps; a relation rewritten whole then costs 16
//! KiB per GiB instead of 4 bytes. Memory is what [`BlockSet::mem_bytes`]
//! says; union is linear in the chunks' sizes, never in their block counts.

/// Blocks a chunk covers.
const CHUNK_BLOCKS: u32 = 1 << 16;
/// u64 words of a chunk's bitmap.
const BITMAP_WORDS: usize = (CHUNK_BLOCKS / 64) as usize;
/// Bytes of a bitmap: an array of more entries than this / 2 is larger.
const BITMAP_BYTES: usize = BITMAP_WORDS * 8;

/// The low 16 bits of the blocks of one chunk.
#[derive(Clone)]
pub(crate) enum Container {
    /// Sorted, no duplicates, never empty.
    Array(Vec<u16>),
    /// Bit `b` of word `b / 64` set for block `b`.
    Bitmap(Box<[u64; BITMAP_WORDS]>),
    /// Sorted, disjoint, non-adjacent runs `(first, last)`, inclusive.
    Runs(Vec<(u16, u16)>),
}

impl Container {
    fn len(&self) -> u32 {
        match self {
            Container::Array(a) => a.len() as u32,
            Container::Bitmap(b) => b.iter().map(|w| w.count_ones()).sum(),
            Container::Runs(r) => r
                .iter()
                .map(|&(f, l)| u32::from(l) - u32::from(f) + 1)
                .sum(),
        }
    }

    fn contains(&self, low: u16) -> bool {
        match self {
            Container::Array(a) => a.binary_search(&low).is_ok(),
            Container::Bitmap(b) => b[usize::from(low / 64)] >> (low % 64) & 1 == 1,
            Container::Runs(r) => {
                let i = r.partition_point(|&(_, last)| last < low);
                i < r.len() && r[i].0 <= low
            }
        }
    }

    fn mem_bytes(&self) -> usize {
        match self {
            Container::Array(a) => a.capacity() * 2,
            Container::Bitmap(_) => BITMAP_BYTES,
            Container::Runs(r) => r.capacity() * 4,
        }
    }

    /// The runs of this container, in order.
    fn runs(&self) -> Vec<(u16, u16)> {
        match self {
            Container::Runs(r) => r.clone(),
            Container::Array(a) => {
                let mut out: Vec<(u16, u16)> = Vec::new();
                for &v in a {
                    match out.last_mut() {
                        Some(last) if u32::from(last.1) + 1 == u32::from(v) => last.1 = v,
                        _ => out.push((v, v)),
                    }
                }
                out
            }
            Container::Bitmap(b) => bitmap_runs(b),
        }
    }

    fn to_bitmap(&self) -> Box<[u64; BITMAP_WORDS]> {
        match self {
            Container::Bitmap(b) => b.clone(),
            Container::Array(a) => {
                let mut b = Box::new([0u64; BITMAP_WORDS]);
                for &v in a {
                    b[usize::from(v / 64)] |= 1 << (v % 64);
                }
                b
            }
            Container::Runs(r) => {
                let mut b = Box::new([0u64; BITMAP_WORDS]);
                for &(f, l) in r {
                    set_range(&mut b, f, l);
                }
                b
            }
        }
    }

    /// The smallest form of what `self` holds (never called on an empty
    /// container: callers drop those).
    fn normalize(self) -> Container {
        let n = self.len() as usize;
        let runs = self.runs();
        let array_bytes = n * 2;
        let run_bytes = runs.len() * 4;
        if run_bytes < array_bytes.min(BITMAP_BYTES) {
            return Container::Runs(runs);
        }
        if array_bytes <= BITMAP_BYTES {
            return match self {
                Container::Array(mut a) => {
                    a.shrink_to_fit();
                    Container::Array(a)
                }
                other => Container::Array(other.iter().collect()),
            };
        }
        match self {
            Container::Bitmap(b) => Container::Bitmap(b),
            other => Container::Bitmap(other.to_bitmap()),
        }
    }

    fn iter(&self) -> ContainerIter<'_> {
        match self {
            Container::Array(a) => ContainerIter::Array(a.iter()),
            Container::Bitmap(b) => ContainerIter::Bitmap {
                words: b,
                word: 0,
                bits: b[0],
            },
            Container::Runs(r) => ContainerIter::Runs {
                runs: r,
                i: 0,
                next: r.first().map(|&(f, _)| u32::from(f)).unwrap_or(0),
            },
        }
    }

    fn union(self, other: &Container) -> Container {
        match (&self, other) {
            (Container::Array(a), Container::Array(b)) => {
                let mut out = Vec::with_capacity(a.len() + b.len());
                let (mut i, mut j) = (0, 0);
                while i < a.len() && j < b.len() {
                    match a[i].cmp(&b[j]) {
                        std::cmp::Ordering::Less => {
                            out.push(a[i]);
                            i += 1;
                        }
                        std::cmp::Ordering::Greater => {
                            out.push(b[j]);
                            j += 1;
                        }
                        std::cmp::Ordering::Equal => {
                            out.push(a[i]);
                            i += 1;
                            j += 1;
                        }
                    }
                }
                out.extend_from_slice(&a[i..]);
                out.extend_from_slice(&b[j..]);
                Container::Array(out).normalize()
            }
            (Container::Bitmap(_), _) | (_, Container::Bitmap(_)) => {
                // Reuse our own bitmap when we have one: the accumulating
                // side of a long union is the dense one.
                let bits = match self {
                    Container::Bitmap(mut b) => {
                        or_into(&mut b, other);
                        b
                    }
                    mine => {
                        let mut b = other.to_bitmap();
                        or_into(&mut b, &mine);
                        b
                    }
                };
                Container::Bitmap(bits).normalize()
            }
            _ => {
                // At least one side is runs: merge as runs.
                let (a, b) = (self.runs(), other.runs());
                let mut all: Vec<(u16, u16)> = Vec::with_capacity(a.len() + b.len());
                let (mut i, mut j) = (0, 0);
                while i < a.len() || j < b.len() {
                    let next = if j >= b.len() || (i < a.len() && a[i].0 <= b[j].0) {
                        i += 1;
                        a[i - 1]
                    } else {
                        j += 1;
                        b[j - 1]
                    };
                    match all.last_mut() {
                        Some(last) if u32::from(next.0) <= u32::from(last.1) + 1 => {
                            last.1 = last.1.max(next.1)
                        }
                        _ => all.push(next),
                    }
                }
                Container::Runs(all).normalize()
            }
        }
    }

    /// Keeps only blocks below `low`; None when nothing is left.
    fn truncate(self, low: u16) -> Option<Container> {
        let out = match self {
            Container::Array(mut a) => {
                a.truncate(a.partition_point(|&v| v < low));
                Container::Array(a)
            }
            Container::Runs(mut r) => {
                r.retain(|&(f, _)| f < low);
                if let Some(last) = r.last_mut() {
                    last.1 = last.1.min(low - 1);
                }
                Container::Runs(r)
            }
            Container::Bitmap(mut b) => {
                let w = usize::from(low / 64);
                b[w] &= (1u64 << (low % 64)) - 1;
                for x in &mut b[w + 1..] {
                    *x = 0;
                }
                Container::Bitmap(b)
            }
        };
        (out.len() > 0).then(|| out.normalize())
    }
}

/// Equal when they hold the same blocks, whatever their forms.
impl PartialEq for Container {
    fn eq(&self, other: &Container) -> bool {
        match (self, other) {
            (Container::Array(a), Container::Array(b)) => a == b,
            (Container::Runs(a), Container::Runs(b)) => a == b,
            (Container::Bitmap(a), Container::Bitmap(b)) => a == b,
            _ => self.runs() == other.runs(),
        }
    }
}

impl Eq for Container {}

impl std::fmt::Debug for Container {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            Container::Array(_) => "array",
            Container::Bitmap(_) => "bitmap",
            Container::Runs(_) => "runs",
        };
        write!(f, "{kind}:{:?}", self.runs())
    }
}

fn or_into(bits: &mut [u64; BITMAP_WORDS], c: &Container) {
    match c {
        Container::Bitmap(o) => {
            for (w, o) in bits.iter_mut().zip(o.iter()) {
                *w |= o;
            }
        }
        Container::Array(a) => {
            for &v in a {
                bits[usize::from(v / 64)] |= 1 << (v % 64);
            }
        }
        Container::Runs(r) => {
            for &(f, l) in r {
                set_range(bits, f, l);
            }
        }
    }
}

fn set_range(b: &mut [u64; BITMAP_WORDS], first: u16, last: u16) {
    let (first, last) = (usize::from(first), usize::from(last));
    let (fw, lw) = (first / 64, last / 64);
    let head = !0u64 << (first % 64);
    let tail = !0u64 >> (63 - last % 64);
    if fw == lw {
        b[fw] |= head & tail;
        return;
    }
    b[fw] |= head;
    for w in &mut b[fw + 1..lw] {
        *w = !0;
    }
    b[lw] |= tail;
}

fn bitmap_runs(b: &[u64; BITMAP_WORDS]) -> Vec<(u16, u16)> {
    let mut out = Vec::new();
    let mut start: Option<u32> = None;
    for (wi, &w) in b.iter().enumerate() {
        let base = (wi * 64) as u32;
        if w == 0 || w == !0 {
            match (start, w == 0) {
                (Some(s), true) => {
                    out.push((s as u16, (base - 1) as u16));
                    start = None;
                }
                (None, false) => start = Some(base),
                _ => {}
            }
            continue;
        }
        for bit in 0..64 {
            let set = w >> bit & 1 == 1;
            match (start, set) {
                (None, true) => start = Some(base + bit),
                (Some(s), false) => {
                    out.push((s as u16, (base + bit - 1) as u16));
                    start = None;
                }
                _ => {}
            }
        }
    }
    if let Some(s) = start {
        out.push((s as u16, u16::MAX));
    }
    out
}

enum ContainerIter<'a> {
    Array(std::slice::Iter<'a, u16>),
    Bitmap {
        words: &'a [u64; BITMAP_WORDS],
        word: usize,
        bits: u64,
    },
    Runs {
        runs: &'a [(u16, u16)],
        i: usize,
        next: u32,
    },
}

impl Iterator for ContainerIter<'_> {
    type Item = u16;

    fn next(&mut self) -> Option<u16> {
        match self {
            ContainerIter::Array(it) => it.next().copied(),
            ContainerIter::Bitmap { words, word, bits } => loop {
                if *bits != 0 {
                    let b = bits.trailing_zeros();
                    *bits &= *bits - 1;
                    return Some((*word * 64) as u16 + b as u16);
                }
                *word += 1;
                if *word >= BITMAP_WORDS {
                    return None;
                }
                *bits = words[*word];
            },
            ContainerIter::Runs { runs, i, next } => {
                let &(_, last) = runs.get(*i)?;
                let v = *next as u16;
                if *next >= u32::from(last) {
                    *i += 1;
                    if let Some(&(f, _)) = runs.get(*i) {
                        *next = u32::from(f);
                    }
                } else {
                    *next += 1;
                }
                Some(v)
            }
        }
    }
}

/// A set of block numbers (`BlockNumber`, u32) of one relation fork.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct BlockSet {
    /// Sorted by chunk number (block >> 16), no empty containers.
    chunks: Vec<(u16, Container)>,
}

impl std::fmt::Debug for BlockSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.ranges()).finish()
    }
}

impl BlockSet {
    pub fn new() -> BlockSet {
        BlockSet::default()
    }

    /// From block numbers in any order, duplicates allowed.
    pub fn from_blocks(blocks: impl IntoIterator<Item = u32>) -> BlockSet {
        let mut v: Vec<u32> = blocks.into_iter().collect();
        v.sort_unstable();
        v.dedup();
        let mut s = BlockSet::new();
        s.extend_sorted(&v);
        s
    }

    /// Adds strictly increasing block numbers (what a sorted, deduplicated
    /// batch gives): one container built per chunk, then merged.
    pub fn extend_sorted(&mut self, blocks: &[u32]) {
        let mut i = 0;
        while i < blocks.len() {
            let hi = (blocks[i] >> 16) as u16;
            let n = blocks[i..].partition_point(|&b| (b >> 16) as u16 == hi);
            let lows: Vec<u16> = blocks[i..i + n].iter().map(|&b| b as u16).collect();
            self.merge_chunk(hi, Container::Array(lows).normalize());
            i += n;
        }
    }

    /// Adds one block: in place when its chunk is a bitmap or a short
    /// array (the form may then not be the smallest until the next union).
    pub fn insert(&mut self, block: u32) {
        let (hi, low) = ((block >> 16) as u16, block as u16);
        if let Ok(i) = self.chunks.binary_search_by_key(&hi, |(h, _)| *h) {
            match &mut self.chunks[i].1 {
                Container::Bitmap(b) => {
                    b[usize::from(low / 64)] |= 1 << (low % 64);
                    return;
                }
                Container::Array(a) if a.len() < BITMAP_BYTES / 2 => {
                    if let Err(at) = a.binary_search(&low) {
                        // Grow by an eighth, not double: memory stays near
                        // two bytes a block.
                        if a.len() == a.capacity() {
                            a.reserve_exact(a.len() / 8 + 1);
                        }
                        a.insert(at, low);
                    }
                    return;
                }
                _ => {}
            }
        }
        self.merge_chunk(hi, Container::Array(vec![low]));
    }

    /// Adds `first..=last`.
    pub fn insert_range(&mut self, first: u32, last: u32) {
        let mut at = first;
        while at <= last {
            let hi = (at >> 16) as u16;
            let chunk_last = (u32::from(hi) << 16) | 0xFFFF;
            let end = last.min(chunk_last);
            self.merge_chunk(hi, Container::Runs(vec![(at as u16, end as u16)]));
            if end == u32::MAX {
                break;
            }
            at = end + 1;
        }
    }

    fn merge_chunk(&mut self, hi: u16, c: Container) {
        match self.chunks.binary_search_by_key(&hi, |(h, _)| *h) {
            Ok(i) => {
                let mine = std::mem::replace(&mut self.chunks[i].1, Container::Array(Vec::new()));
                self.chunks[i].1 = mine.union(&c);
            }
            Err(i) => self.chunks.insert(i, (hi, c.normalize())),
        }
    }

    pub fn union_with(&mut self, other: &BlockSet) {
        if self.chunks.is_empty() {
            self.chunks = other.chunks.clone();
            return;
        }
        let mut out = Vec::with_capacity(self.chunks.len() + other.chunks.len());
        let mine = std::mem::take(&mut self.chunks);
        let mut theirs = other.chunks.iter().peekable();
        for (hi, c) in mine {
            while let Some((h, o)) = theirs.next_if(|(h, _)| *h < hi) {
                out.push((*h, o.clone()));
            }
            match theirs.next_if(|(h, _)| *h == hi) {
                Some((_, o)) => out.push((hi, c.union(o))),
                None => out.push((hi, c)),
            }
        }
        out.extend(theirs.cloned());
        self.chunks = out;
    }

    /// Drops every block at or beyond `limit`.
    pub fn truncate(&mut self, limit: u32) {
        let hi = limit >> 16;
        let low = limit as u16;
        let chunks = std::mem::take(&mut self.chunks);
        self.chunks = chunks
            .into_iter()
            .filter_map(|(h, c)| match u32::from(h).cmp(&hi) {
                std::cmp::Ordering::Less => Some((h, c)),
                std::cmp::Ordering::Equal if low > 0 => c.truncate(low).map(|c| (h, c)),
                _ => None,
            })
            .collect();
        // collect() reuses the old allocation: give back what is now unused.
        self.chunks.shrink_to_fit();
    }

    pub fn contains(&self, block: u32) -> bool {
        let hi = (block >> 16) as u16;
        match self.chunks.binary_search_by_key(&hi, |(h, _)| *h) {
            Ok(i) => self.chunks[i].1.contains(block as u16),
            Err(_) => false,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Number of blocks.
    pub fn len(&self) -> u64 {
        self.chunks.iter().map(|(_, c)| u64::from(c.len())).sum()
    }

    /// Bytes of memory held (containers and the chunk list).
    pub fn mem_bytes(&self) -> usize {
        self.chunks.capacity() * std::mem::size_of::<(u16, Container)>()
            + self
                .chunks
                .iter()
                .map(|(_, c)| c.mem_bytes())
                .sum::<usize>()
    }

    /// Every block, in order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.chunks.iter().flat_map(|(hi, c)| {
            let base = u32::from(*hi) << 16;
            c.iter().map(move |low| base | u32::from(low))
        })
    }

    /// Blocks in `from..to`, in order: those of one 1 GiB relation segment
    /// file are `segno * 131072 ..`.
    pub fn range(&self, from: u32, to: u32) -> impl Iterator<Item = u32> + '_ {
        let first_chunk = self
            .chunks
            .partition_point(|(h, _)| u32::from(*h) < from >> 16);
        self.chunks[first_chunk..]
            .iter()
            .take_while(move |(h, _)| u64::from(*h) << 16 < u64::from(to))
            .flat_map(|(hi, c)| {
                let base = u32::from(*hi) << 16;
                c.iter().map(move |low| base | u32::from(low))
            })
            .skip_while(move |&b| b < from)
            .take_while(move |&b| b < to)
    }

    /// The blocks as inclusive ranges `(first, last)`, in order, adjacent
    /// ranges across chunk borders joined.
    pub fn ranges(&self) -> Vec<(u32, u32)> {
        let mut out: Vec<(u32, u32)> = Vec::new();
        for (hi, c) in &self.chunks {
            let base = u32::from(*hi) << 16;
            for (f, l) in c.runs() {
                let (f, l) = (base | u32::from(f), base | u32::from(l));
                match out.last_mut() {
                    Some(last) if last.1.checked_add(1) == Some(f) => last.1 = l,
                    _ => out.push((f, l)),
                }
            }
        }
        out
    }

    pub(crate) fn chunks(&self) -> &[(u16, Container)] {
        &self.chunks
    }

    /// From containers read back (the codec checks their order and form).
    pub(crate) fn from_chunks(chunks: Vec<(u16, Container)>) -> BlockSet {
        BlockSet { chunks }
    }
}
