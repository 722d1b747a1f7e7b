//! Power-cut images for the crash-atomicity tests of the structures updated in place.
//!
//! The simulator's power cut (`sim::media`) resolves every NVRAM line that was written and
//! not persisted independently: lost (old), landed (new) or torn (each 8-byte word old,
//! new or garbage); and every disk block written and not flushed: lost, landed, or torn
//! with its first sectors new and the rest old. These helpers enumerate those images for
//! one update, so a test can open the structure in every one of them.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::nvram::Nvram;

pub const LINE: usize = 64;
const WORD: usize = 8;
pub const SECTOR: usize = 512;
pub const BLOCK: usize = 4096;
/// The word a torn line holds where it is neither old nor new.
const GARBAGE: [u8; WORD] = [0xa5, 0x5a, 0xc3, 0x3c, 0x0f, 0xf0, 0x99, 0x66];

/// An NVRAM region whose power is cut at persist number `admit + 1`: it and every later
/// persist do not happen, and no store made after it lands. The test keeps `durable`
/// (what survives before the cut's unpersisted lines are resolved) and `left` (memory as
/// the cut found it); `calls` counts the persists asked for.
pub struct CutNvram {
    cur: Vec<u8>,
    pub durable: Arc<Mutex<Vec<u8>>>,
    pub left: Arc<Mutex<Option<Vec<u8>>>>,
    pub calls: Arc<AtomicUsize>,
    admit: usize,
}

impl CutNvram {
    pub fn new(start: &[u8], admit: usize) -> Self {
        Self {
            cur: start.to_vec(),
            durable: Arc::new(Mutex::new(start.to_vec())),
            left: Arc::new(Mutex::new(None)),
            calls: Arc::new(AtomicUsize::new(0)),
            admit,
        }
    }
}

impl Nvram for CutNvram {
    fn len(&self) -> usize {
        self.cur.len()
    }
    fn bytes(&self) -> &[u8] {
        &self.cur
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.cur
    }
    fn persist(&mut self, offset: usize, len: usize) -> io::Result<()> {
        let n = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
        if n <= self.admit {
            self.durable.lock()[offset..offset + len].copy_from_slice(&self.cur[offset..offset + len]);
        } else {
            self.left.lock().get_or_insert_with(|| self.cur.clone());
        }
        Ok(())
    }
}

/// Runs `update` on NVRAM holding `start` once for every number of persists a cut can
/// let through (none, one, ... all), and gives each run's durable image and the memory
/// the cut left (`update` returns memory as it ended, for the run no cut stopped).
pub fn cut_at_every_persist(start: &[u8], update: &mut dyn FnMut(CutNvram) -> Vec<u8>) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    for admit in 0.. {
        let nv = CutNvram::new(start, admit);
        let (durable, left, calls) = (nv.durable.clone(), nv.left.clone(), nv.calls.clone());
        let end = update(nv);
        let cur = left.lock().take().unwrap_or(end);
        let durable = durable.lock().clone();
        let done = admit >= calls.load(Ordering::Relaxed);
        out.push((durable, cur));
        if done {
            break;
        }
    }
    out
}

fn differing(old: &[u8], new: &[u8], unit: usize) -> Vec<usize> {
    old.chunks(unit).zip(new.chunks(unit)).enumerate().filter(|(_, (o, n))| o != n).map(|(i, _)| i).collect()
}

/// Every image a cut can leave of NVRAM whose durable contents are `old` and whose memory
/// holds `new`: each differing line lost or landed, in every combination (up to 2^12 of
/// them; past that, each line alone and all but each line), and, for each differing line
/// with the others all lost and all landed, every mix of its words old, new and garbage.
pub fn nvram_images(old: &[u8], new: &[u8]) -> Vec<Vec<u8>> {
    assert_eq!(old.len(), new.len());
    let lines = differing(old, new, LINE);
    let mut out = Vec::new();
    let with = |landed: &dyn Fn(usize) -> bool| {
        let mut img = old.to_vec();
        for &l in &lines {
            if landed(l) {
                let r = l * LINE..((l + 1) * LINE).min(old.len());
                img[r.clone()].copy_from_slice(&new[r]);
            }
        }
        img
    };
    if lines.len() <= 12 {
        for mask in 0u32..1 << lines.len() {
            out.push(with(&|l| lines.iter().position(|&x| x == l).is_some_and(|i| mask & (1 << i) != 0)));
        }
    } else {
        out.push(with(&|_| false));
        out.push(with(&|_| true));
        for &one in &lines {
            out.push(with(&|l| l == one));
            out.push(with(&|l| l != one));
        }
    }
    for &l in &lines {
        let r = l * LINE..((l + 1) * LINE).min(old.len());
        let words = r.len().div_ceil(WORD);
        for others in [false, true] {
            let base = with(&|_| others);
            let mut choice = vec![0u8; words];
            loop {
                let mut img = base.clone();
                for (w, &c) in choice.iter().enumerate() {
                    let at = r.start + w * WORD;
                    let end = (at + WORD).min(r.end);
                    match c {
                        0 => img[at..end].copy_from_slice(&old[at..end]),
                        1 => img[at..end].copy_from_slice(&new[at..end]),
                        _ => img[at..end].copy_from_slice(&GARBAGE[..end - at]),
                    }
                }
                out.push(img);
                // Next combination, base 3.
                let mut i = 0;
                while i < words {
                    choice[i] += 1;
                    if choice[i] < 3 {
                        break;
                    }
                    choice[i] = 0;
                    i += 1;
                }
                if i == words {
                    break;
                }
            }
        }
    }
    out
}

/// Every image a cut can leave of a disk whose flushed contents are `old` and whose write
/// cache holds `new`: each differing block lost, landed or torn after any whole number of
/// sectors, each block alone with the others lost or landed, and every block lost/landed
/// combination up to 2^10.
pub fn disk_images(old: &[u8], new: &[u8]) -> Vec<Vec<u8>> {
    assert_eq!(old.len(), new.len());
    let blocks = differing(old, new, BLOCK);
    let mut out = Vec::new();
    let span = |b: usize| b * BLOCK..((b + 1) * BLOCK).min(old.len());
    let with = |landed: &dyn Fn(usize) -> bool| {
        let mut img = old.to_vec();
        for &b in &blocks {
            if landed(b) {
                img[span(b)].copy_from_slice(&new[span(b)]);
            }
        }
        img
    };
    if blocks.len() <= 10 {
        for mask in 0u32..1 << blocks.len() {
            out.push(with(&|b| blocks.iter().position(|&x| x == b).is_some_and(|i| mask & (1 << i) != 0)));
        }
    } else {
        out.push(with(&|_| false));
        out.push(with(&|_| true));
    }
    for &b in &blocks {
        for others in [false, true] {
            for sectors in 1..BLOCK / SECTOR {
                let mut img = with(&|_| others);
                let r = span(b);
                let torn = r.start..(r.start + sectors * SECTOR).min(r.end);
                img[r.clone()].copy_from_slice(&old[r]);
                img[torn.clone()].copy_from_slice(&new[torn]);
                out.push(img);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_cover_old_new_and_tears() {
        let old = vec![0u8; 128];
        let mut new = old.clone();
        new[3] = 1;
        new[70] = 2;
        let imgs = nvram_images(&old, &new);
        assert!(imgs.contains(&old));
        assert!(imgs.contains(&new));
        // Four line combinations, then 3^8 word mixes per line and per state of the other.
        assert_eq!(imgs.len(), 4 + 2 * 2 * 6561);
        assert!(imgs.iter().any(|i| i[..8] == GARBAGE));

        let old = vec![0u8; 2 * BLOCK];
        let mut new = old.clone();
        new[0] = 1;
        new[BLOCK - 1] = 1;
        let imgs = disk_images(&old, &new);
        assert!(imgs.contains(&old) && imgs.contains(&new));
        // A tear keeps the block's head new and its tail old.
        assert!(imgs.iter().any(|i| i[0] == 1 && i[BLOCK - 1] == 0));
    }
}
