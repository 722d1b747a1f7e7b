//! A queue's writer thread: what the export completes, and the answers the reader queues,
//! encoded and gathered into as few write calls as the host's reading allows.

use super::*;

/// Sends what the reader hands over and what the export completes, batching into one
/// system call whatever is waiting. Ends once the reader has gone and every command it
/// submitted is answered.
pub(super) fn write_loop(
    mut stream: TcpStream,
    framing: Framing,
    info: &QueueInfo,
    shared: &Shared,
    out: &Receiver<Vec<u8>>,
    io: &Receiver<IoReply>,
) -> io::Result<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(WRITE_BATCH_BYTES);
    let (mut out_gone, mut io_gone) = (false, false);
    let mut failed: Option<io::Error> = None;
    loop {
        // Block for the next item. A channel reports that it is closed only once it is
        // empty, so nothing sent before the reader left is lost.
        let first = match (out_gone, io_gone) {
            (true, true) => break,
            (false, true) => match out.recv() {
                Ok(bytes) => Err(bytes),
                Err(_) => {
                    out_gone = true;
                    continue;
                }
            },
            (true, false) => match io.recv() {
                Ok(reply) => Ok(reply),
                Err(_) => {
                    io_gone = true;
                    continue;
                }
            },
            (false, false) => select! {
                recv(out) -> m => match m {
                    Ok(bytes) => Err(bytes),
                    Err(_) => { out_gone = true; continue; }
                },
                recv(io) -> r => match r {
                    Ok(reply) => Ok(reply),
                    Err(_) => { io_gone = true; continue; }
                },
            },
        };
        let mut item = Some(first);
        while let Some(next) = item.take() {
            match next {
                Err(bytes) => buf.extend_from_slice(&bytes),
                Ok(reply) => encode_reply(&mut buf, framing, info, shared, reply),
            }
            if buf.len() >= WRITE_BATCH_BYTES {
                break;
            }
            item = out.try_recv().map(Err).ok().or_else(|| io.try_recv().map(Ok).ok());
        }
        if failed.is_none() {
            if let Err(e) = stream.write_all(&buf) {
                // Keep draining so that every completer finds its channel open.
                let _ = stream.shutdown(Shutdown::Both);
                failed = Some(e);
            }
        }
        buf.clear();
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn encode_reply(buf: &mut Vec<u8>, framing: Framing, info: &QueueInfo, shared: &Shared, reply: IoReply) {
    info.in_flight.fetch_sub(1, Ordering::AcqRel);
    let cid = (reply.cookie & 0xffff) as u16;
    let qid = info.qid.load(Ordering::Relaxed);
    let status = match reply.result {
        Ok(Some(data)) if reply.cookie & COOKIE_READ != 0 => {
            framing.c2h_data(buf, cid, 0, &data, true);
            Status::SUCCESS
        }
        Ok(_) => Status::SUCCESS,
        Err(e) => {
            // A command that failed because the volume stopped being writable here (a
            // switchover or a fencing under way) is a path error: the host retries it on
            // the path that has become optimized. Any other failure is the volume's own.
            let path = info.volume.get().and_then(|v| shared.ana_state(v).refusal());
            tracing::debug!(
                "nvmf: command {cid} on queue {qid} failed{}: {e}",
                if path.is_some() { " (the path is no longer optimized)" } else { "" }
            );
            path.unwrap_or(Status::INTERNAL)
        }
    };
    framing.capsule_resp(buf, &cqe(0, 0, info.sqhd(), qid, cid, status));
}
