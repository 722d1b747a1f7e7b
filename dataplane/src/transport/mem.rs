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
        let reply = match msg {
            Message::Ack { seq } => Reply::Ack { seq: *seq },
            Message::CpDone { cp } => Reply::CpDone { cp: *cp },
            Message::BaselineAck => Reply::BaselineAck,
            Message::Refuse { code, reason } => Reply::Refuse { code: *code, reason: reason.clone() },
            Message::Error { reason } => Reply::Error { reason: reason.clone() },
            Message::RdmaListen { addr, token } => Reply::RdmaListen { addr: addr.clone(), token: *token },
            Message::RdmaRegions { regions } => Reply::RdmaRegions { regions: *regions },
            other => return Err(io::Error::other(format!("unexpected reply {other:?}"))),
        };
        let _ = self.tx.send(LinkEvent::Reply(reply));
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
        if let Err(reason) = self.handler.on_message(msg) {
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
        if let Err(reason) = self.handler.commit() {
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
