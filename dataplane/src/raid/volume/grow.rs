//! Growing a volume online: rows added at the end of every member's data area, into the
//! room its checksum area was sized for at creation (see `layout`); nothing moves.
//!
//! Two steps, so that the slow one runs beside the volume's I/O and the quick one can run
//! where the volume's size is read:
//!
//! 1. [`Raid4::prepare_grow`]: every member is extended (a file grows; a device must be
//!    large enough, and its new rows are zeroed), and the checksums of the new rows
//!    (all-zero blocks) are written. The volume's size does not change: nothing reads or
//!    writes the new rows yet. Zero rows have zero parity, so the stripes are consistent.
//! 2. [`Raid4::commit_grow`]: the size changes, and the superblocks say so (a new event).
//!
//! A crash in step 1 leaves the volume as it was, with longer members. A crash in step 2
//! leaves some members' superblocks at the new size and the others one event behind at
//! the old one: the open takes the newest (the volume grown) and brings the others up to
//! it, as for any round cut short.

use super::*;

impl Raid4 {
    /// Step 1 of growing the volume to `bytes` (see the module's notes). Refused while a
    /// member is failed or being rebuilt, or while a scrub runs, and where the checksum
    /// area has no room for that size. Idempotent.
    pub fn prepare_grow(&self, bytes: u64) -> io::Result<()> {
        let _round = self.grow_round.lock();
        let cur = self.geo();
        let new = cur.grown(bytes).map_err(invalid)?;
        let view = self.view();
        let roomy = |d: &Option<Arc<dyn BlockDevice>>| d.as_ref().is_some_and(|d| d.size() >= new.member_bytes());
        if bytes <= *self.prepared_bytes.lock() && view.devs.iter().all(roomy) {
            return Ok(());
        }
        self.check_growable()?;
        let prepared = cur.grown(*self.prepared_bytes.lock()).map_err(invalid)?;
        let (old_rows, new_rows) = (prepared.rows(), new.rows());
        let specs: Vec<DiskSpec> = self.members.read().iter().map(|m| m.spec.clone()).collect();
        for (m, spec) in specs.iter().enumerate() {
            let dev = view.devs[m].as_ref().ok_or_else(|| io::Error::other(format!("member {m} is missing")))?;
            let named = |e: io::Error| io::Error::new(e.kind(), format!("member {m} ({spec}): {e}"));
            dev.grow(new.member_bytes()).map_err(named)?;
            if open::is_device_node(&spec.path) && new_rows > old_rows {
                // A device's new rows hold what the medium held; a file's read as zeroes.
                dev.write_zeroes(new.data_offset() + old_rows * B, (new_rows - old_rows) * B).map_err(named)?;
            }
        }
        // The new rows' checksums: in memory first (so that any write-back of a checksum
        // block covering old and new rows carries both), then their blocks on every member.
        {
            let mut members = self.members.write();
            for m in members.iter_mut() {
                if m.csums.len() < crate::usize_of(new_rows) {
                    let mut v: Vec<AtomicU32> =
                        m.csums.iter().map(|c| AtomicU32::new(c.load(Ordering::Relaxed))).collect();
                    v.resize_with(crate::usize_of(new_rows), || AtomicU32::new(*ZERO_CRC));
                    m.csums = v.into_boxed_slice();
                }
            }
        }
        {
            let mut dirty = self.dirty_csums.lock();
            for m in 0..new.members() {
                dirty.extend((old_rows / CSUMS_PER_BLOCK..new.csum_blocks()).map(|b| (m, b)));
            }
        }
        self.write_csums()?;
        self.flush_members()?;
        *self.prepared_bytes.lock() = bytes;
        Ok(())
    }

    /// Step 2 of growing the volume to `bytes`: from now on the volume is that large, and
    /// its superblocks say so. Runs step 1 first where it has not run.
    pub fn commit_grow(&self, bytes: u64) -> io::Result<()> {
        self.prepare_grow(bytes)?;
        let _round = self.grow_round.lock();
        if bytes <= self.geo().volume_bytes {
            return Ok(());
        }
        self.volume_bytes.store(bytes, Ordering::Release);
        self.meta.lock().events += 1;
        self.write_superblocks()?;
        tracing::info!("RAID-4 volume {}: grown to {bytes} bytes", self.name);
        Ok(())
    }

    /// The largest size the volume can grow to (its checksum area's room).
    pub fn max_bytes(&self) -> u64 {
        self.geo().max_volume_bytes()
    }

    fn check_growable(&self) -> io::Result<()> {
        let members = self.members.read();
        if let Some((i, m)) = members.iter().enumerate().find(|(_, m)| m.state != MemberState::InSync) {
            return Err(io::Error::other(format!(
                "RAID-4 volume {}: member {i} ({}) is {}: replace or rebuild it before growing the volume",
                self.name,
                m.spec,
                m.state.name()
            )));
        }
        drop(members);
        if let Some(p) = self.maint.scrub_progress().or_else(|| self.maint.rebuild_progress()) {
            return Err(io::Error::other(format!(
                "RAID-4 volume {}: a {} is running; grow the volume once it ends",
                self.name, p.operation
            )));
        }
        Ok(())
    }
}
