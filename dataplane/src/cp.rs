//! Consistency points: pushing logged block updates into a volume.
//!
//! Both sides use the same [`Overlay`], so a log entry means exactly the same thing on the
//! source (its block cache of dirty blocks since the last CP) and on the destination (the
//! newest contents per block of a CP, built from its own log file by reference, or from
//! block data sent by value). Entries are applied in sequence order; a block is then written
//! to the volume once, with its newest contents, and adjacent blocks are coalesced into one
//! write.
//!
//! Rules, identical on both sides so that the mirror equals the primary block for block:
//! a write replaces the bytes it covers (partial blocks are read, modified and kept whole);
//! write-zeroes does the same with zeroes; a trim zeroes the whole blocks inside its range
//! and leaves partial blocks untouched (a trim is advisory).

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::Arc;

use crate::format::{EntryHeader, EntryKind, BLOCK_BYTES};
use crate::storage::{BlockDevice, WriteOp};

pub type Vbn = u64;
/// A cached block. Shared with a CP's [`CpImage`] while the CP writes it out (the image
/// takes a reference, not a copy); a write to a shared block goes to a fresh buffer, so
/// the image keeps the contents the CP began with (copy on write).
type BlockBuf = Arc<[u8; BLOCK_BYTES]>;

#[derive(Debug)]
enum Contents<'a> {
    Data(BlockBuf),
    /// A whole block of a log entry's data, where the entries outlive the overlay (a CP
    /// applied from a log file, a replay): written out from there, never copied.
    Borrowed(&'a [u8]),
    Zero,
}

#[derive(Debug)]
struct Slot<'a> {
    contents: Contents<'a>,
    /// The NVLog partition of the newest entry that touched the block.
    partition: u8,
}

/// Newest contents of the blocks changed since the last CP. `'a`: the entries whose data
/// [`Overlay::apply_borrowed`] refers to (the source's cache copies everything and is an
/// `Overlay<'static>`).
#[derive(Debug, Default)]
pub struct Overlay<'a> {
    blocks: HashMap<Vbn, Slot<'a>>,
    /// Buffers of released blocks, for reuse; each is referenced from here alone.
    free: Vec<BlockBuf>,
}

/// The byte range of block `vbn` that `[offset, offset+len)` covers, as (start, end)
/// within the block.
fn cover(vbn: Vbn, offset: u64, len: u64) -> (usize, usize) {
    let b0 = vbn * BLOCK_BYTES as u64;
    let start = offset.max(b0) - b0;
    let end = (offset + len).min(b0 + BLOCK_BYTES as u64) - b0;
    // Both are within one block, below BLOCK_BYTES.
    (crate::usize_of(start), crate::usize_of(end))
}

impl<'a> Overlay<'a> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Whether the overlay holds any of the `count` blocks from `first`.
    pub fn holds_any(&self, first: Vbn, count: u64) -> bool {
        if count > self.blocks.len() as u64 {
            self.blocks.keys().any(|v| (first..first + count).contains(v))
        } else {
            (first..first + count).any(|v| self.blocks.contains_key(&v))
        }
    }

    fn buf(&mut self) -> BlockBuf {
        self.free.pop().unwrap_or_else(|| Arc::new([0u8; BLOCK_BYTES]))
    }

    /// Keeps a buffer the overlay no longer uses for reuse, unless a CP image still holds
    /// it (then the image's drop frees it).
    fn recycle(&mut self, b: BlockBuf) {
        if Arc::strong_count(&b) == 1 {
            self.free.push(b);
        }
    }

    /// The block's current bytes, loaded from `base` if the overlay does not hold it, as a
    /// mutable data buffer.
    fn block_mut(&mut self, vbn: Vbn, partition: u8, base: &dyn BlockDevice) -> io::Result<&mut [u8; BLOCK_BYTES]> {
        let needs_load = !self.blocks.contains_key(&vbn);
        if needs_load {
            let mut b = self.buf();
            base.read_at(&mut Arc::get_mut(&mut b).expect("a fresh buffer is unshared")[..], vbn * BLOCK_BYTES as u64)?;
            self.blocks.insert(vbn, Slot { contents: Contents::Data(b), partition });
        }
        match self.blocks.get(&vbn).map(|s| &s.contents) {
            Some(Contents::Zero) => {
                let mut b = self.buf();
                Arc::get_mut(&mut b).expect("a fresh buffer is unshared").fill(0);
                self.blocks.get_mut(&vbn).expect("present").contents = Contents::Data(b);
            }
            Some(&Contents::Borrowed(src)) => {
                let mut b = self.buf();
                Arc::get_mut(&mut b).expect("a fresh buffer is unshared").copy_from_slice(src);
                self.blocks.get_mut(&vbn).expect("present").contents = Contents::Data(b);
            }
            _ => {}
        }
        let slot = self.blocks.get_mut(&vbn).expect("present");
        slot.partition = partition;
        match &mut slot.contents {
            // A block a CP image shares is copied before it changes.
            Contents::Data(b) => Ok(Arc::make_mut(b)),
            Contents::Zero | Contents::Borrowed(_) => unreachable!("converted above"),
        }
    }

    fn set_zero(&mut self, vbn: Vbn, partition: u8) {
        if let Some(Slot { contents: Contents::Data(b), .. }) =
            self.blocks.insert(vbn, Slot { contents: Contents::Zero, partition })
        {
            self.recycle(b);
        }
    }

    /// Applies one logged mutation. Every block it touches is added to `touched`.
    pub fn apply(
        &mut self,
        header: &EntryHeader,
        data: &[u8],
        base: &dyn BlockDevice,
        touched: &mut HashSet<Vbn>,
    ) -> io::Result<()> {
        self.apply_with(header, data, base, touched, |o, vbn, partition, src| {
            // The whole block is replaced: a buffer a CP image shares is left to it, and
            // the new contents go to another.
            let mut b = match o.blocks.remove(&vbn) {
                Some(Slot { contents: Contents::Data(b), .. }) if Arc::strong_count(&b) == 1 => b,
                _ => o.buf(),
            };
            Arc::get_mut(&mut b).expect("unshared").copy_from_slice(src);
            o.blocks.insert(vbn, Slot { contents: Contents::Data(b), partition });
        })
    }

    /// [`Self::apply`], with whole blocks of `data` referred to instead of copied: for
    /// entries that outlive the overlay (a CP applied from a log file, a replay), where a
    /// copy per block was most of the cost of building the CP's image.
    pub fn apply_borrowed(
        &mut self,
        header: &EntryHeader,
        data: &'a [u8],
        base: &dyn BlockDevice,
        touched: &mut HashSet<Vbn>,
    ) -> io::Result<()> {
        self.apply_with(header, data, base, touched, |o, vbn, partition, _| {
            let at = crate::usize_of(vbn * BLOCK_BYTES as u64 - header.offset);
            let src: &'a [u8] = &data[at..at + BLOCK_BYTES];
            if let Some(Slot { contents: Contents::Data(b), .. }) =
                o.blocks.insert(vbn, Slot { contents: Contents::Borrowed(src), partition })
            {
                o.recycle(b);
            }
        })
    }

    /// The rules of [`Self::apply`]; `whole` stores a write that covers block `vbn` whole
    /// (given its bytes).
    fn apply_with(
        &mut self,
        header: &EntryHeader,
        data: &[u8],
        base: &dyn BlockDevice,
        touched: &mut HashSet<Vbn>,
        mut whole_write: impl FnMut(&mut Self, Vbn, u8, &[u8]),
    ) -> io::Result<()> {
        let offset = header.offset;
        let len = u64::from(header.length);
        crate::storage::check_range(base.size(), offset, len)?;
        let first = offset / BLOCK_BYTES as u64;
        let last = (offset + len - 1) / BLOCK_BYTES as u64;
        for vbn in first..=last {
            let (s, e) = cover(vbn, offset, len);
            let whole = s == 0 && e == BLOCK_BYTES;
            match header.kind {
                EntryKind::Write => {
                    let src_at = crate::usize_of(vbn * BLOCK_BYTES as u64 + s as u64 - offset);
                    let src = &data[src_at..src_at + (e - s)];
                    if whole {
                        whole_write(self, vbn, header.partition, src);
                    } else {
                        self.block_mut(vbn, header.partition, base)?[s..e].copy_from_slice(src);
                    }
                }
                EntryKind::WriteZeroes => {
                    if whole {
                        self.set_zero(vbn, header.partition);
                    } else {
                        self.block_mut(vbn, header.partition, base)?[s..e].fill(0);
                    }
                }
                EntryKind::Trim => {
                    if !whole {
                        continue;
                    }
                    self.set_zero(vbn, header.partition);
                }
            }
            touched.insert(vbn);
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset`: overlay blocks where present, `base` elsewhere.
    pub fn read(&self, buf: &mut [u8], offset: u64, base: &dyn BlockDevice) -> io::Result<()> {
        crate::storage::check_range(base.size(), offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        if self.blocks.is_empty() {
            return base.read_at(buf, offset);
        }
        let len = buf.len() as u64;
        let first = offset / BLOCK_BYTES as u64;
        let last = (offset + len - 1) / BLOCK_BYTES as u64;
        // Runs of blocks absent from the overlay are read from the base in one call.
        let mut run_start: Option<Vbn> = None;
        let read_run = |from: Vbn, to: Vbn, buf: &mut [u8]| -> io::Result<()> {
            let a = (from * BLOCK_BYTES as u64).max(offset);
            let b = ((to + 1) * BLOCK_BYTES as u64).min(offset + len);
            let at = crate::usize_of(a - offset);
            base.read_at(&mut buf[at..at + crate::usize_of(b - a)], a)
        };
        for vbn in first..=last {
            match self.blocks.get(&vbn) {
                None => {
                    run_start.get_or_insert(vbn);
                }
                Some(slot) => {
                    if let Some(from) = run_start.take() {
                        read_run(from, vbn - 1, buf)?;
                    }
                    let (s, e) = cover(vbn, offset, len);
                    let at = crate::usize_of(vbn * BLOCK_BYTES as u64 + s as u64 - offset);
                    match &slot.contents {
                        Contents::Data(b) => buf[at..at + (e - s)].copy_from_slice(&b[s..e]),
                        Contents::Borrowed(b) => buf[at..at + (e - s)].copy_from_slice(&b[s..e]),
                        Contents::Zero => buf[at..at + (e - s)].fill(0),
                    }
                }
            }
        }
        if let Some(from) = run_start {
            read_run(from, last, buf)?;
        }
        Ok(())
    }

    /// Writes the given blocks' current contents to `dev` as one batch (one op per block,
    /// straight from the cache; engines coalesce adjacent ones). Does not flush `dev`.
    pub fn write_blocks(&self, blocks: &HashSet<Vbn>, dev: &dyn BlockDevice) -> io::Result<()> {
        static ZERO: [u8; BLOCK_BYTES] = [0; BLOCK_BYTES];
        let mut sorted: Vec<Vbn> = blocks.iter().copied().filter(|v| self.blocks.contains_key(v)).collect();
        sorted.sort_unstable();
        let ops: Vec<WriteOp<'_>> = sorted
            .iter()
            .map(|vbn| WriteOp {
                offset: vbn * BLOCK_BYTES as u64,
                buf: match &self.blocks[vbn].contents {
                    Contents::Data(b) => &b[..],
                    Contents::Borrowed(b) => b,
                    Contents::Zero => &ZERO[..],
                },
            })
            .collect();
        dev.write_many(&ops)
    }

    /// The given blocks' current contents (`None`: zeroes), in block order: what a CP
    /// writes while the cache goes on taking writes. The image shares the buffers; a
    /// later write to one of them copies it first.
    pub fn snapshot(&self, blocks: &HashSet<Vbn>) -> CpImage {
        let mut sorted: Vec<Vbn> = blocks.iter().copied().filter(|v| self.blocks.contains_key(v)).collect();
        sorted.sort_unstable();
        let blocks = sorted
            .into_iter()
            .map(|vbn| {
                let copy = match &self.blocks[&vbn].contents {
                    Contents::Data(b) => Some(Arc::clone(b)),
                    Contents::Borrowed(b) => {
                        let mut copy = Arc::new([0u8; BLOCK_BYTES]);
                        Arc::get_mut(&mut copy).expect("fresh").copy_from_slice(b);
                        Some(copy)
                    }
                    Contents::Zero => None,
                };
                (vbn, copy)
            })
            .collect();
        CpImage { blocks }
    }

    /// Drops the given blocks whose newest write is in `partition`: they are on the volume
    /// now. Blocks rewritten since (in the other partition) stay.
    pub fn release(&mut self, blocks: &HashSet<Vbn>, partition: u8) {
        for vbn in blocks {
            if self.blocks.get(vbn).is_some_and(|s| s.partition == partition) {
                if let Some(Slot { contents: Contents::Data(b), .. }) = self.blocks.remove(vbn) {
                    self.recycle(b);
                }
            }
        }
    }

    pub fn clear(&mut self) {
        let drained: Vec<Slot<'a>> = self.blocks.drain().map(|(_, s)| s).collect();
        for slot in drained {
            if let Contents::Data(b) = slot.contents {
                self.recycle(b);
            }
        }
    }
}

/// Blocks copied out of an [`Overlay`] for a CP to write (see [`Overlay::snapshot`]).
#[derive(Debug, Default)]
pub struct CpImage {
    blocks: Vec<(Vbn, Option<BlockBuf>)>,
}

impl CpImage {
    pub fn len(&self) -> usize {
        self.blocks.len()
    }
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
    /// Writes the blocks to `dev` as one batch and flushes it.
    pub fn write_out(&self, dev: &dyn BlockDevice) -> io::Result<()> {
        static ZERO: [u8; BLOCK_BYTES] = [0; BLOCK_BYTES];
        let ops: Vec<WriteOp<'_>> = self
            .blocks
            .iter()
            .map(|(vbn, b)| WriteOp {
                offset: vbn * BLOCK_BYTES as u64,
                buf: b.as_deref().map_or(&ZERO[..], |b| &b[..]),
            })
            .collect();
        dev.write_many(&ops)?;
        dev.flush()
    }
}

/// Applies `entries` (header, data), already in sequence order, to `dev` through an overlay,
/// writes each touched block once and flushes. Used by the destination's CP by reference,
/// by failover replay and by the source's recovery.
pub fn apply_entries<'a>(
    entries: impl IntoIterator<Item = (EntryHeader, &'a [u8])>,
    dev: &dyn BlockDevice,
) -> io::Result<usize> {
    let mut overlay = Overlay::new();
    let mut touched = HashSet::new();
    let mut last_seq: Option<u64> = None;
    let mut n = 0;
    for (h, data) in entries {
        // Replay order is an invariant of every caller; check it here too.
        assert!(last_seq.is_none_or(|s| h.seq > s), "entries applied out of sequence order");
        last_seq = Some(h.seq);
        overlay.apply_borrowed(&h, data, dev, &mut touched)?;
        n += 1;
    }
    overlay.write_blocks(&touched, dev)?;
    dev.flush()?;
    Ok(n)
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::storage::MemDevice;
    use proptest::prelude::*;

    fn hdr(kind: EntryKind, seq: u64, offset: u64, length: u32) -> EntryHeader {
        EntryHeader {
            kind,
            partition: (seq % 2) as u8,
            volume_id: 1,
            epoch: 1,
            seq,
            offset,
            length,
            data_len: if kind == EntryKind::Write { length } else { 0 },
        }
    }

    /// The reference model: a flat byte array with the same rules.
    fn model_apply(m: &mut [u8], h: &EntryHeader, data: &[u8]) {
        let (o, l) = (h.offset as usize, h.length as usize);
        match h.kind {
            EntryKind::Write => m[o..o + l].copy_from_slice(data),
            EntryKind::WriteZeroes => m[o..o + l].fill(0),
            EntryKind::Trim => {
                let first = o.div_ceil(BLOCK_BYTES) * BLOCK_BYTES;
                let end = (o + l) / BLOCK_BYTES * BLOCK_BYTES;
                if end > first {
                    m[first..end].fill(0);
                }
            }
        }
    }

    proptest! {
        #[test]
        fn overlay_matches_flat_model(ops in proptest::collection::vec((0u8..3, 0u64..60_000, 1u32..12_000, any::<u8>()), 1..40)) {
            let size = 64 * 1024u64;
            let dev = MemDevice::new(size);
            let init: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            dev.write_at(&init, 0).unwrap();
            let mut model = init.clone();
            let mut overlay = Overlay::new();
            let mut touched = HashSet::new();
            let mut entries = Vec::new();
            for (i, (k, off, len, fill)) in ops.into_iter().enumerate() {
                let len = len.min((size - off) as u32);
                let kind = [EntryKind::Write, EntryKind::Trim, EntryKind::WriteZeroes][k as usize];
                let h = hdr(kind, i as u64 + 1, off, len);
                let data = if kind == EntryKind::Write { vec![fill; len as usize] } else { vec![] };
                overlay.apply(&h, &data, &dev, &mut touched).unwrap();
                model_apply(&mut model, &h, &data);
                entries.push((h, data));
            }
            // Reads through the overlay see the model.
            let mut got = vec![0u8; size as usize];
            overlay.read(&mut got, 0, &dev).unwrap();
            prop_assert!(got == model);
            // Written out, the device equals the model.
            overlay.write_blocks(&touched, &dev).unwrap();
            prop_assert!(dev.snapshot() == model);
            // And replaying the same entries onto a fresh copy gives the same bytes.
            let dev2 = MemDevice::new(size);
            dev2.write_at(&init, 0).unwrap();
            apply_entries(entries.iter().map(|(h, d)| (*h, &d[..])), &dev2).unwrap();
            prop_assert!(dev2.snapshot() == model);
        }
    }

    #[test]
    fn release_keeps_blocks_rewritten_in_the_other_partition() {
        let dev = MemDevice::new(16 * 4096);
        let mut o = Overlay::new();
        let mut t0 = HashSet::new();
        let mut t1 = HashSet::new();
        o.apply(&hdr(EntryKind::Write, 2, 0, 8192), &[1u8; 8192], &dev, &mut t0).unwrap();
        o.apply(&hdr(EntryKind::Write, 3, 4096, 4096), &[2u8; 4096], &dev, &mut t1).unwrap();
        o.write_blocks(&t0, &dev).unwrap();
        o.release(&t0, 0);
        assert_eq!(o.len(), 1, "block 1 was rewritten in partition 1 and must stay");
        let mut b = [0u8; 4096];
        o.read(&mut b, 4096, &dev).unwrap();
        assert_eq!(b, [2u8; 4096]);
    }
}
