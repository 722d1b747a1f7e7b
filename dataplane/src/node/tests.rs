//! The node core's role changes against a real source and mirror in one process (the
//! in-process transport), with an environment that keeps its regions in files and
//! records the order of its steps.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::bounded;

use super::*;
use crate::clock::SystemClock;
use crate::destination::MemMirrorDirectory;
use crate::frontend::{Completer, Export, IoRequest};
use crate::nvram::{MappedNvram, MemNvram, NvramMode};
use crate::source::{self, Control, SourceConfig, SourceHandle};
use crate::storage::MemDevice;
use crate::transport::mem::MemConnector;

const VOL: u64 = 8 << 20;
const PART: usize = crate::source::PARTITION_BYTES_MIN;

/// Regions are files in a temporary dir; every step is written down.
struct FileEnv {
    dir: PathBuf,
    steps: Vec<String>,
    record: Option<Promoted>,
    /// The record cannot be saved (a crash at that point).
    record_fails: bool,
}

impl FileEnv {
    fn new(dir: &std::path::Path) -> Self {
        FileEnv { dir: dir.to_path_buf(), steps: Vec::new(), record: None, record_fails: false }
    }
    fn region(&self, name: &str, bytes: usize) -> MappedNvram {
        MappedNvram::open(&self.dir.join(name), bytes, NvramMode::File).expect("open region")
    }
}

impl NodeEnv for FileEnv {
    fn fresh_region(&mut self, name: &str, bytes: usize) -> io::Result<Box<dyn Nvram>> {
        self.steps.push(format!("region {name}"));
        let _ = std::fs::remove_file(self.dir.join(name));
        Ok(Box::new(self.region(name, bytes)))
    }
    fn record_primary(&mut self, v: &Promoted) -> io::Result<()> {
        if self.record_fails {
            return Err(io::Error::other("crash"));
        }
        self.steps.push("record".into());
        self.record = Some(v.clone());
        Ok(())
    }
    fn start_primary(&mut self, v: &Promoted) -> io::Result<()> {
        assert_eq!(self.record.as_ref(), Some(v), "started before its record was saved");
        self.steps.push("start".into());
        Ok(())
    }
}

/// A mirrored source with `before` blocks written and applied by a CP, then `after`
/// blocks that only the mirror's log holds; the source is stopped.
fn mirrored(before: u64, after: u64) -> (Arc<Mirror>, u64) {
    let dir = Arc::new(MemMirrorDirectory::default());
    let mut cfg = SourceConfig::new("src", "vol", 42, PART);
    cfg.cp_interval = Duration::from_secs(3600);
    let nv: Box<dyn Nvram> = Box::new(MemNvram::new(NvLog::<MemNvram>::region_bytes(PART)));
    let (log, rec) = NvLog::open(nv, 42, PART).expect("NVLog");
    let h = source::spawn(source::SourceParts {
        cfg,
        nvlog: log,
        recovered: rec,
        device: Arc::new(MemDevice::new(VOL)),
        connector: Arc::new(MemConnector { directory: dir.clone() }),
        clock: Arc::new(SystemClock::default()),
        mirror: None,
        changes: None,
    })
    .expect("spawn");
    let (tx, rx) = bounded(1);
    h.control(Control::Attach { target: "mem".into(), peer: None, reply: tx }).expect("attach");
    rx.recv().expect("reply").expect("attached");
    while h.status().expect("status").state != source::PairState::InSync {
        std::thread::sleep(Duration::from_millis(5));
    }
    for b in 0..before {
        write(&h, b);
    }
    let (tx, rx) = bounded(1);
    h.control(Control::Cp(tx)).expect("cp");
    let cp = rx.recv_timeout(Duration::from_secs(10)).expect("reply").expect("cp");
    for b in before..before + after {
        write(&h, b);
    }
    h.stop();
    let mirror = dir.mirror.lock().clone().expect("a mirror");
    (mirror, cp)
}

fn write(h: &SourceHandle, block: u64) {
    let (tx, rx) = bounded(1);
    let data = vec![u8::try_from(block % 251).expect("small") + 1; 4096];
    h.submit(IoRequest::Write { offset: block * 4096, data, fua: false }, Completer::new(0, tx));
    rx.recv_timeout(Duration::from_secs(10)).expect("reply").result.expect("write");
}

#[test]
fn a_failover_replays_then_formats_the_logs_records_and_starts_in_that_order() {
    let (mirror, cp) = mirrored(3, 5);
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut env = FileEnv::new(tmp.path());
    let report = failover(&mut env, &mirror, None).expect("failover");
    assert_eq!(report.entries_replayed, 5, "{report:?}");
    assert_eq!(report.epoch, 2);
    assert_eq!(env.steps, ["region vol.2.nvlog", "region vol.changes", "record", "start"]);
    let v = env.record.clone().expect("recorded");
    assert_eq!(
        (v.volume.as_str(), v.volume_id, v.size, v.from.as_str(), v.mirrored_to_from),
        ("vol", 42, VOL, "src", false)
    );
    // The new NVLog continues the mirror's numbering.
    let (_, recovered) =
        NvLog::open(env.region(&nvlog_name("vol", 2), NvLog::<MappedNvram>::region_bytes(PART)), 42, PART)
            .expect("the new NVLog opens");
    assert_eq!(recovered.checkpoint, Checkpoint { released_cp: cp, next_seq: report.last_seq + 1 });
    assert!(recovered.entries_in_order().is_empty());
    // The change map is relative to the old primary's CP and holds what the replay wrote.
    let map = ChangeMap::open(Box::new(env.region(&changes_name("vol"), ChangeMap::region_bytes(VOL))), VOL)
        .expect("the change map opens");
    assert_eq!(map.base(), Some(&ChangeBase { peer: "src".into(), cp }));
    let replayed: u64 = report.replayed.iter().map(|r| r.1).sum();
    assert_eq!(replayed, 5 * 4096);
    for &(o, l) in &report.replayed {
        assert!(map.is_marked(o / map_region(&map)) && map.is_marked((o + l - 1) / map_region(&map)));
    }
    assert!(map.marked() < map.regions(), "a failover that knows its replay marks only that");
}

fn map_region(map: &ChangeMap) -> u64 {
    VOL.div_ceil(map.regions())
}

#[test]
fn a_failover_cut_short_before_its_record_is_finished_by_taking_the_mirror_up() {
    let (mirror, cp) = mirrored(2, 4);
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut env = FileEnv::new(tmp.path());
    env.record_fails = true;
    let e = failover(&mut env, &mirror, None).expect_err("the record cannot be saved");
    assert!(matches!(e, NodeError::Io { .. }), "{e}");
    assert!(env.record.is_none() && !env.steps.contains(&"start".to_string()), "{:?}", env.steps);
    assert!(mirror.meta().promoted, "the promotion itself completed");
    // A second failover finds the mirror promoted and refuses; the restart's take-up
    // finishes the change, its replay unknown: the whole volume is marked changed.
    assert!(matches!(
        failover(&mut env, &mirror, None),
        Err(NodeError::Promote(crate::destination::MirrorError::AlreadyPromoted { epoch: 2, .. }))
    ));
    env.record_fails = false;
    env.steps.clear();
    let v = take_up_promoted(&mut env, &mirror, None, false).expect("take up");
    assert_eq!(env.steps, ["region vol.2.nvlog", "region vol.changes", "record"]);
    assert_eq!(v.epoch, 2);
    let map = ChangeMap::open(Box::new(env.region(&changes_name("vol"), ChangeMap::region_bytes(VOL))), VOL)
        .expect("the change map opens");
    assert_eq!(map.marked(), map.regions());
    assert_eq!(map.base(), Some(&ChangeBase { peer: "src".into(), cp }));
    let (_, recovered) =
        NvLog::open(env.region(&nvlog_name("vol", 2), NvLog::<MappedNvram>::region_bytes(PART)), 42, PART)
            .expect("the new NVLog opens");
    assert_eq!(recovered.checkpoint.next_seq, mirror.meta().applied_seq + 1);
}

#[test]
fn a_takeover_refuses_a_mirror_that_is_not_level_with_the_primary() {
    let (mirror, cp) = mirrored(2, 3);
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut env = FileEnv::new(tmp.path());
    // The primary drained with three entries past that CP; the mirror applied up to it.
    let next_seq = mirror.meta().applied_seq + 1 + 3;
    let e = takeover(&mut env, &mirror, cp, next_seq).expect_err("three entries past the CP");
    assert!(matches!(e, NodeError::Refused(ref m) if m.contains("not level")), "{e}");
    assert!(env.steps.is_empty() && !mirror.meta().promoted);
}

#[test]
fn a_takeover_of_a_level_mirror_replays_nothing_and_is_mirrored_to_the_old_primary() {
    let (mirror, cp) = mirrored(4, 0);
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut env = FileEnv::new(tmp.path());
    let next = mirror.meta().applied_seq + 1;
    let report = takeover(&mut env, &mirror, cp, next).expect("takeover");
    assert_eq!(report.entries_replayed, 0);
    assert_eq!(env.steps, ["region vol.2.nvlog", "region vol.changes", "record", "start"]);
    assert!(env.record.as_ref().is_some_and(|v| v.mirrored_to_from && v.from == "src"));
}

/// The planted defect is where the simulator looks for it: in the core's failover.
#[test]
fn the_planted_failover_skips_the_replay() {
    struct Planted(FileEnv);
    impl NodeEnv for Planted {
        fn fresh_region(&mut self, name: &str, bytes: usize) -> io::Result<Box<dyn Nvram>> {
            self.0.fresh_region(name, bytes)
        }
        fn record_primary(&mut self, v: &Promoted) -> io::Result<()> {
            self.0.record_primary(v)
        }
        fn start_primary(&mut self, v: &Promoted) -> io::Result<()> {
            self.0.start_primary(v)
        }
        fn planted_bug(&self) -> Option<PlantedBug> {
            Some(PlantedBug::FailoverSkipsReplay)
        }
    }
    let (mirror, _) = mirrored(1, 3);
    let tmp = tempfile::tempdir().expect("tempdir");
    let report = failover(&mut Planted(FileEnv::new(tmp.path())), &mirror, None).expect("failover");
    assert_eq!(report.entries_replayed, 0);
}

#[test]
fn a_returning_primary_is_resynced_by_delta_only_from_a_base_of_its_own_with_its_changes_known() {
    let hello = crate::transport::Hello {
        source_node: "b".into(),
        volume: "vol".into(),
        volume_id: 42,
        epoch: 3,
        volume_bytes: VOL,
        partition_bytes: PART as u64,
        intent: crate::transport::Intent::Resync,
        base_seq: 0,
        base_cp_gen: 0,
        features: 0,
    };
    let fresh = || crate::destination::MirrorMeta::new(&hello);
    let mine = ChangeBase { peer: "a".into(), cp: 7 };
    let other = ChangeBase { peer: "c".into(), cp: 7 };
    let delta = returning_mirror_meta(fresh(), "a", Some(&mine), true);
    assert!(delta.resyncing && delta.applied_cp == 7 && !delta.consistent, "{delta:?}");
    for (base, known) in [(Some(&mine), false), (Some(&other), true), (None, true)] {
        let m = returning_mirror_meta(fresh(), "a", base, known);
        assert!(!m.resyncing && m.applied_cp == 0, "a baseline for {base:?}, own changes known {known}: {m:?}");
    }
}
