//! The in-process engine: frames go straight to the destination's handler, replies come
//! back through a channel. For tests and the simulator.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam_channel::{unbounded, Receiver, Sender};

use super::wire::{self, Message};
use super::{
    ConnectError, Connector, FrameHandler, Hello, Link, LinkError, LinkEvent, MirrorDirectory, Reply, ReplySink,
    Welcome,
};

pub struct MemConnector {
    pub directory: Arc<dyn MirrorDirectory>,
}

struct MemSink {
    tx: Sender<LinkEvent>,
    closed: AtomicBool,
}

impl ReplySink for MemSink {
    fn send(&self, msg: &Message<'_>) -> io::Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "closed"));
        }
        let _ = self.tx.send(LinkEvent::Reply(reply_of(msg)?));
        Ok(())
    }
    fn close(&self) {
        if !self.closed.swap(true, Ordering::SeqCst) {
            let _ = self.tx.send(LinkEvent::Closed { reason: "closed by destination".into() });
        }
    }
}

pub struct MemLink {
    handler: Box<dyn FrameHandler>,
    sink: Arc<MemSink>,
    rx: Receiver<LinkEvent>,
}

impl MemLink {
    fn deliver(&mut self, msg: Message<'_>) -> Result<(), LinkError> {
        if self.sink.closed.load(Ordering::SeqCst) {
            return Err(LinkError::Closed("closed".into()));
        }
        // Round-trip through the codec so the in-process engine checks what TCP checks.
        let bytes = msg.encode();
        let (msg, _) = wire::decode(&bytes).map_err(|e| LinkError::Closed(e.to_string()))?.expect("whole frame");
        if let Err(reason) = self.handler.on_message(msg).map_err(|e| e.to_string()) {
            let _ = self.sink.send(&Message::Error { reason: reason.clone() });
            self.sink.close();
            return Err(LinkError::Closed(reason));
        }
        Ok(())
    }
}

impl Link for MemLink {
    fn send_entries(&mut self, partition: u8, offset: u64, bytes: &[u8]) -> Result<(), LinkError> {
        self.deliver(Message::Entries { partition, offset, bytes })
    }
    fn send(&mut self, msg: &Message<'_>) -> Result<(), LinkError> {
        self.deliver(msg.clone())
    }
    fn flush(&mut self) -> Result<(), LinkError> {
        if let Err(reason) = self.handler.commit().map_err(|e| e.to_string()) {
            self.sink.close();
            return Err(LinkError::Closed(reason));
        }
        Ok(())
    }
    fn poll(&mut self) -> Option<LinkEvent> {
        self.rx.try_recv().ok()
    }
    fn close(&mut self) {
        self.sink.close();
    }
}

impl Connector for MemConnector {
    type Link = MemLink;
    fn connect(&self, target: &str, hello: &Hello) -> Result<(MemLink, Welcome), ConnectError> {
        let (tx, rx) = unbounded();
        let sink = Arc::new(MemSink { tx, closed: AtomicBool::new(false) });
        let (handler, welcome) = self
            .directory
            .attach(hello, sink.clone())
            .map_err(|(code, reason)| ConnectError::Refused { target: target.to_string(), code, reason })?;
        Ok((MemLink { handler, sink, rx }, welcome))
    }
}

// ---------------------------------------------------------------------------------------
// The simulated network: the same engine with time, faults and node crashes.

/// How [`MemNet`] treats a cut link between two nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Frames are held until the link heals (a partition TCP rides out by retransmitting).
    Stall,
    /// Open connections are reset at once and frames dropped; connects fail.
    Reset,
    /// Frames vanish while the connections stay open (message loss that nothing reports).
    Drop,
}

/// Per-frame faults of [`MemNet`], as probabilities in parts per million.
#[derive(Debug, Clone, Copy, Default)]
pub struct FrameFaults {
    pub drop_ppm: u32,
    pub duplicate_ppm: u32,
    /// A frame delayed past the ones sent after it on its connection.
    pub reorder_ppm: u32,
}

/// What [`MemNet`] did, by class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct NetCounters {
    pub frames_sent: u64,
    pub frames_delivered: u64,
    pub frames_dropped: u64,
    pub frames_duplicated: u64,
    pub frames_reordered: u64,
    pub connects: u64,
    pub connects_failed: u64,
    pub resets: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    ToDst,
    ToSrc,
}

#[derive(Debug)]
enum Payload {
    Frame(Vec<u8>),
    /// The sending end closed the connection (EOF or reset reaches the other end).
    Close(String),
}

#[derive(Debug)]
struct Packet {
    conn: u64,
    dir: Dir,
    payload: Payload,
}

struct NetConn {
    src: String,
    dst: String,
    /// Taken out while a frame is handed to it (the handler may answer through the net).
    handler: Option<Box<dyn FrameHandler>>,
    handler_busy: bool,
    /// Replies that reached the source, for its link to poll.
    inbox: std::collections::VecDeque<LinkEvent>,
    src_open: bool,
    dst_open: bool,
    /// Delivery time of the last frame queued each way: frames keep their order.
    last_at: [u64; 2],
}

struct NetNode {
    directory: Option<Arc<dyn MirrorDirectory>>,
    /// Set when the node lost power: nothing it sends leaves it from then on.
    power_cut: Arc<AtomicBool>,
}

struct NetState {
    clock: Arc<dyn crate::clock::Clock>,
    rng: rand_chacha::ChaCha12Rng,
    delay_ns: (u64, u64),
    faults: FrameFaults,
    nodes: std::collections::BTreeMap<String, NetNode>,
    cuts: std::collections::BTreeMap<(String, String), Cut>,
    conns: std::collections::BTreeMap<u64, NetConn>,
    /// In flight, by (delivery time, order of sending).
    queue: std::collections::BTreeMap<(u64, u64), Packet>,
    next_conn: u64,
    next_order: u64,
    counters: NetCounters,
}

fn pair(a: &str, b: &str) -> (String, String) {
    if a <= b {
        (a.to_string(), b.to_string())
    } else {
        (b.to_string(), a.to_string())
    }
}

impl NetState {
    fn cut_between(&self, a: &str, b: &str) -> Option<Cut> {
        self.cuts.get(&pair(a, b)).copied()
    }

    fn cut_off(&self, node: &str) -> bool {
        self.nodes.get(node).is_none_or(|n| n.power_cut.load(Ordering::SeqCst))
    }

    fn chance(&mut self, ppm: u32) -> bool {
        use rand::Rng;
        ppm > 0 && self.rng.gen_range(0..1_000_000) < ppm
    }

    /// Queues a packet on `conn` in direction `dir`, applying the frame faults.
    fn send(&mut self, conn: u64, dir: Dir, payload: Payload) {
        use rand::Rng;
        let Some(c) = self.conns.get(&conn) else { return };
        let from = if dir == Dir::ToDst { &c.src } else { &c.dst };
        let to = if dir == Dir::ToDst { &c.dst } else { &c.src };
        if self.cut_off(from) {
            return;
        }
        let cut = self.cut_between(from, to);
        self.counters.frames_sent += 1;
        let is_frame = matches!(payload, Payload::Frame(_));
        if matches!(cut, Some(Cut::Drop | Cut::Reset)) || (is_frame && self.chance(self.faults.drop_ppm)) {
            self.counters.frames_dropped += 1;
            return;
        }
        let now = self.clock.now_ns();
        let delay = self.rng.gen_range(self.delay_ns.0..=self.delay_ns.1);
        let i = dir as usize;
        let last = self.conns[&conn].last_at[i];
        let at = if is_frame && self.chance(self.faults.reorder_ppm) {
            self.counters.frames_reordered += 1;
            // Later than its successors are likely to be: they overtake it.
            now + delay + 4 * self.delay_ns.1
        } else {
            (now + delay).max(last)
        };
        if let Some(c) = self.conns.get_mut(&conn) {
            c.last_at[i] = c.last_at[i].max(at);
        }
        let dup = match &payload {
            Payload::Frame(b) if self.chance(self.faults.duplicate_ppm) => Some(b.clone()),
            _ => None,
        };
        self.push(at, Packet { conn, dir, payload });
        if let Some(b) = dup {
            self.counters.frames_duplicated += 1;
            self.push(at, Packet { conn, dir, payload: Payload::Frame(b) });
        }
    }

    fn push(&mut self, at: u64, p: Packet) {
        self.next_order += 1;
        self.queue.insert((at, self.next_order), p);
    }

    /// Closes one end of a connection; the other end learns it after the usual delay.
    fn close_end(&mut self, conn: u64, end: Dir, reason: &str) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let was_open = match end {
            Dir::ToDst => std::mem::replace(&mut c.src_open, false),
            Dir::ToSrc => std::mem::replace(&mut c.dst_open, false),
        };
        if was_open {
            self.send(conn, end, Payload::Close(reason.to_string()));
        }
    }
}

/// A deterministic in-process network for the simulator: every frame and reply crosses it
/// encoded (the codec checks what TCP's does), with a random delay, in order per
/// connection unless a reorder fault says otherwise, and subject to cuts between nodes,
/// frame loss and duplication, and node crashes. Nothing moves until [`MemNet::deliver`]
/// is called: the simulator decides when the network runs.
#[derive(Clone)]
pub struct MemNet {
    state: Arc<parking_lot::Mutex<NetState>>,
}

impl MemNet {
    pub fn new(clock: Arc<dyn crate::clock::Clock>, seed: u64, delay_ns: (u64, u64)) -> Self {
        use rand::SeedableRng;
        let state = NetState {
            clock,
            rng: rand_chacha::ChaCha12Rng::seed_from_u64(seed),
            delay_ns,
            faults: FrameFaults::default(),
            nodes: Default::default(),
            cuts: Default::default(),
            conns: Default::default(),
            queue: Default::default(),
            next_conn: 0,
            next_order: 0,
            counters: NetCounters::default(),
        };
        Self { state: Arc::new(parking_lot::Mutex::new(state)) }
    }

    /// A node comes up: `directory` answers hellos addressed to `name` (if it hosts
    /// mirrors); `power_cut` says when everything the node sends must be lost.
    pub fn node_up(&self, name: &str, directory: Option<Arc<dyn MirrorDirectory>>, power_cut: Arc<AtomicBool>) {
        self.state.lock().nodes.insert(name.to_string(), NetNode { directory, power_cut });
    }

    /// A node is gone (crashed): its connections end without a word from it. The peers
    /// learn of it only where `reset_peers` (a rebooting host answers with resets);
    /// otherwise their connections just go silent.
    pub fn node_down(&self, name: &str, reset_peers: bool) {
        let mut s = self.state.lock();
        s.nodes.remove(name);
        let ids: Vec<u64> = s.conns.iter().filter(|(_, c)| c.src == name || c.dst == name).map(|(id, _)| *id).collect();
        let mut handlers = Vec::new();
        for id in ids {
            let c = s.conns.get_mut(&id).expect("listed");
            let src_side = c.src == name;
            // The crashed end's state is gone with it.
            if src_side {
                c.src_open = false;
            } else {
                c.dst_open = false;
                handlers.extend(c.handler.take());
            }
            if reset_peers {
                s.counters.resets += 1;
                let (at, dir) = (s.clock.now_ns() + s.delay_ns.1, if src_side { Dir::ToDst } else { Dir::ToSrc });
                s.push(at, Packet { conn: id, dir, payload: Payload::Close("connection reset by peer".into()) });
            }
        }
        drop(s);
        // Dropped outside the lock: a session's drop talks to its mirror.
        drop(handlers);
    }

    /// Cuts the link between two nodes (see [`Cut`]).
    pub fn cut(&self, a: &str, b: &str, how: Cut) {
        let mut s = self.state.lock();
        s.cuts.insert(pair(a, b), how);
        if how == Cut::Reset {
            let ids: Vec<u64> =
                s.conns.iter().filter(|(_, c)| pair(&c.src, &c.dst) == pair(a, b)).map(|(id, _)| *id).collect();
            for id in ids {
                s.counters.resets += 1;
                let at = s.clock.now_ns() + s.delay_ns.1;
                let c = s.conns.get_mut(&id).expect("listed");
                let (src_open, dst_open) = (c.src_open, c.dst_open);
                c.src_open = false;
                c.dst_open = false;
                if src_open {
                    s.push(
                        at,
                        Packet { conn: id, dir: Dir::ToSrc, payload: Payload::Close("connection reset".into()) },
                    );
                }
                if dst_open {
                    s.push(
                        at,
                        Packet { conn: id, dir: Dir::ToDst, payload: Payload::Close("connection reset".into()) },
                    );
                }
            }
        }
    }

    pub fn heal(&self, a: &str, b: &str) {
        self.state.lock().cuts.remove(&pair(a, b));
    }

    pub fn heal_all(&self) {
        self.state.lock().cuts.clear();
    }

    pub fn set_faults(&self, faults: FrameFaults) {
        self.state.lock().faults = faults;
    }

    pub fn counters(&self) -> NetCounters {
        self.state.lock().counters
    }

    /// Frames in flight.
    pub fn in_flight(&self) -> usize {
        self.state.lock().queue.len()
    }

    /// Delivers every packet due by now: frames to the destination's handlers (each
    /// connection that received some then commits once: group commit), replies and closes
    /// to the source's links. Returns how many were delivered.
    pub fn deliver(&self) -> usize {
        let mut delivered = 0;
        let mut to_commit: Vec<u64> = Vec::new();
        loop {
            let mut s = self.state.lock();
            let now = s.clock.now_ns();
            let Some((&key, _)) = s.queue.iter().find(|(k, p)| {
                k.0 <= now && {
                    let c = s.conns.get(&p.conn);
                    // Held by a stalled link: not yet.
                    !c.is_some_and(|c| s.cut_between(&c.src, &c.dst) == Some(Cut::Stall))
                }
            }) else {
                break;
            };
            let p = s.queue.remove(&key).expect("found");
            let Some(c) = s.conns.get_mut(&p.conn) else { continue };
            match (p.dir, p.payload) {
                (Dir::ToSrc, Payload::Frame(bytes)) => {
                    if !c.src_open {
                        continue;
                    }
                    let ev = match wire::decode(&bytes) {
                        Ok(Some((msg, _))) => reply_of(&msg)
                            .map(LinkEvent::Reply)
                            .unwrap_or_else(|e| LinkEvent::Closed { reason: e.to_string() }),
                        Ok(None) => LinkEvent::Closed { reason: "truncated reply".into() },
                        Err(e) => LinkEvent::Closed { reason: e.to_string() },
                    };
                    c.inbox.push_back(ev);
                    delivered += 1;
                    s.counters.frames_delivered += 1;
                }
                (Dir::ToSrc, Payload::Close(reason)) => {
                    if c.src_open {
                        c.src_open = false;
                        c.inbox.push_back(LinkEvent::Closed { reason });
                    }
                }
                (Dir::ToDst, Payload::Close(_)) => {
                    c.dst_open = false;
                    let h = c.handler.take();
                    drop(s);
                    drop(h);
                }
                (Dir::ToDst, Payload::Frame(bytes)) => {
                    if !c.dst_open || c.handler_busy {
                        continue;
                    }
                    let Some(mut handler) = c.handler.take() else { continue };
                    c.handler_busy = true;
                    s.counters.frames_delivered += 1;
                    delivered += 1;
                    drop(s);
                    let r = match wire::decode(&bytes) {
                        Ok(Some((msg, _))) => handler.on_message(msg).map_err(|e| e.to_string()),
                        Ok(None) => Err("truncated frame".into()),
                        Err(e) => Err(e.to_string()),
                    };
                    let mut s = self.state.lock();
                    match r {
                        Ok(()) => {
                            if let Some(c) = s.conns.get_mut(&p.conn) {
                                c.handler_busy = false;
                                if c.dst_open && c.handler.is_none() {
                                    c.handler = Some(handler);
                                    handler = dead_handler();
                                }
                            }
                            if !to_commit.contains(&p.conn) {
                                to_commit.push(p.conn);
                            }
                            drop(s);
                            drop(handler);
                        }
                        Err(reason) => {
                            // As the TCP engine does: the error goes back, then the close.
                            if let Some(c) = s.conns.get_mut(&p.conn) {
                                c.handler_busy = false;
                            }
                            let ok = s.conns.get(&p.conn).is_some_and(|c| c.dst_open);
                            if ok {
                                let frame = Message::Error { reason: reason.clone() }.encode();
                                s.send(p.conn, Dir::ToSrc, Payload::Frame(frame));
                                s.close_end(p.conn, Dir::ToSrc, &reason);
                            }
                            drop(s);
                            drop(handler);
                        }
                    }
                }
            }
        }
        for id in to_commit {
            let mut s = self.state.lock();
            let Some(c) = s.conns.get_mut(&id) else { continue };
            if !c.dst_open {
                continue;
            }
            let Some(mut handler) = c.handler.take() else { continue };
            drop(s);
            let r = handler.commit().map_err(|e| e.to_string());
            let mut s = self.state.lock();
            let keep = s.conns.get(&id).is_some_and(|c| c.dst_open && c.handler.is_none());
            if let Err(reason) = &r {
                if keep {
                    s.close_end(id, Dir::ToSrc, reason);
                }
            } else if keep {
                s.conns.get_mut(&id).expect("checked").handler = Some(handler);
                handler = dead_handler();
            }
            drop(s);
            drop(handler);
        }
        // Connections closed at both ends with nothing in flight are forgotten.
        let mut s = self.state.lock();
        let busy: std::collections::BTreeSet<u64> = s.queue.values().map(|p| p.conn).collect();
        s.conns.retain(|id, c| c.src_open || c.dst_open || busy.contains(id) || !c.inbox.is_empty());
        delivered
    }
}

/// A handler standing in for one moved back into its connection.
fn dead_handler() -> Box<dyn FrameHandler> {
    struct Dead;
    impl FrameHandler for Dead {
        fn on_message(&mut self, _: Message<'_>) -> Result<(), crate::transport::HandlerError> {
            Err("closed".into())
        }
        fn commit(&mut self) -> Result<(), crate::transport::HandlerError> {
            Ok(())
        }
    }
    Box::new(Dead)
}

fn reply_of(msg: &Message<'_>) -> io::Result<Reply> {
    Reply::from_message(msg).ok_or_else(|| io::Error::other(format!("unexpected reply {msg:?}")))
}

/// The destination's end. It holds the network weakly: the network holds the handler
/// that holds this sink.
struct NetSink {
    net: std::sync::Weak<parking_lot::Mutex<NetState>>,
    conn: u64,
}

impl ReplySink for NetSink {
    fn send(&self, msg: &Message<'_>) -> io::Result<()> {
        let Some(net) = self.net.upgrade() else {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "network gone"));
        };
        let mut s = net.lock();
        if !s.conns.get(&self.conn).is_some_and(|c| c.dst_open) {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "connection closed"));
        }
        s.send(self.conn, Dir::ToSrc, Payload::Frame(msg.encode()));
        Ok(())
    }
    fn close(&self) {
        if let Some(net) = self.net.upgrade() {
            net.lock().close_end(self.conn, Dir::ToSrc, "closed by destination");
        }
    }
}

/// The source's end of a [`MemNet`] connection.
pub struct NetLink {
    net: MemNet,
    conn: u64,
}

impl NetLink {
    fn queue(&mut self, frame: Vec<u8>) -> Result<(), LinkError> {
        let mut s = self.net.state.lock();
        if !s.conns.get(&self.conn).is_some_and(|c| c.src_open) {
            return Err(LinkError::Closed("connection closed".into()));
        }
        s.send(self.conn, Dir::ToDst, Payload::Frame(frame));
        Ok(())
    }
}

impl Link for NetLink {
    fn send_entries(&mut self, partition: u8, offset: u64, bytes: &[u8]) -> Result<(), LinkError> {
        self.queue(Message::Entries { partition, offset, bytes }.encode())
    }
    fn send(&mut self, msg: &Message<'_>) -> Result<(), LinkError> {
        self.queue(msg.encode())
    }
    fn flush(&mut self) -> Result<(), LinkError> {
        Ok(())
    }
    fn poll(&mut self) -> Option<LinkEvent> {
        self.net.state.lock().conns.get_mut(&self.conn)?.inbox.pop_front()
    }
    fn close(&mut self) {
        self.net.state.lock().close_end(self.conn, Dir::ToDst, "closed by source");
    }
}

impl Drop for NetLink {
    fn drop(&mut self) {
        self.close();
    }
}

impl Connector for MemNet {
    type Link = NetLink;
    fn connect(&self, target: &str, hello: &Hello) -> Result<(NetLink, Welcome), ConnectError> {
        let fail = |s: &mut NetState, kind: io::ErrorKind, what: &str| {
            s.counters.connects_failed += 1;
            ConnectError::Io { target: target.to_string(), source: io::Error::new(kind, what.to_string()) }
        };
        let (conn, directory) = {
            let mut s = self.state.lock();
            s.counters.connects += 1;
            let src = hello.source_node.clone();
            if s.cut_off(&src) {
                return Err(fail(&mut s, io::ErrorKind::Other, "the source lost power"));
            }
            if s.cut_between(&src, target).is_some() {
                return Err(fail(&mut s, io::ErrorKind::TimedOut, "connection timed out"));
            }
            let directory = match s.nodes.get(target) {
                Some(NetNode { directory: Some(d), power_cut }) if !power_cut.load(Ordering::SeqCst) => d.clone(),
                _ => return Err(fail(&mut s, io::ErrorKind::ConnectionRefused, "connection refused")),
            };
            s.next_conn += 1;
            let id = s.next_conn;
            s.conns.insert(
                id,
                NetConn {
                    src,
                    dst: target.to_string(),
                    handler: None,
                    handler_busy: false,
                    inbox: Default::default(),
                    src_open: true,
                    dst_open: true,
                    last_at: [0; 2],
                },
            );
            (id, directory)
        };
        // The hello and its answer cross whole, as TCP's blocking handshake does.
        let sink = Arc::new(NetSink { net: Arc::downgrade(&self.state), conn });
        match directory.attach(hello, sink) {
            Ok((handler, welcome)) => {
                let mut s = self.state.lock();
                match s.conns.get_mut(&conn) {
                    Some(c) if c.dst_open && c.src_open => c.handler = Some(handler),
                    _ => {
                        drop(s);
                        drop(handler);
                        return Err(ConnectError::Io {
                            target: target.to_string(),
                            source: io::Error::new(io::ErrorKind::ConnectionReset, "reset during the handshake"),
                        });
                    }
                }
                Ok((NetLink { net: self.clone(), conn }, welcome))
            }
            Err((code, reason)) => {
                self.state.lock().conns.remove(&conn);
                Err(ConnectError::Refused { target: target.to_string(), code, reason })
            }
        }
    }
}
