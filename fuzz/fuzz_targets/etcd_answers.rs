//! The etcd client on hostile answers: a stand-in member on loopback answers every
//! request with the input (its first byte picks the HTTP status, the rest is the body),
//! and every call the fleet mode makes (lease grant and keepalive, get, put, create,
//! delete) is made, without and with user authentication. Each returns a value or an
//! error, never a panic.
#![no_main]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use nvmirror_control::etcd::{Etcd, EtcdSecurity};

const STATUSES: [u16; 6] = [200, 400, 401, 404, 500, 503];

struct World {
    answer: Arc<Mutex<(u16, Vec<u8>)>>,
    plain: Etcd,
    authenticated: Etcd,
}

/// Answers each request on `listener` with the current answer, one request per connection.
fn stand_in(listener: TcpListener, answer: Arc<Mutex<(u16, Vec<u8>)>>) {
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
        let mut reader = BufReader::new(conn.try_clone().expect("clone"));
        let mut length = 0usize;
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) if line == "\r\n" => break,
                Ok(_) => {
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                }
            }
        }
        let mut body = vec![0u8; length.min(1 << 20)];
        let _ = reader.read_exact(&mut body);
        let (status, text) = answer.lock().expect("answer").clone();
        let head = format!("HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", text.len());
        // One write: head and body in one segment, no Nagle wait between them.
        let mut out = head.into_bytes();
        out.extend_from_slice(&text);
        let _ = conn.write_all(&out);
    }
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("etcd://{}", listener.local_addr().expect("addr"));
        let answer = Arc::new(Mutex::new((200, b"{}".to_vec())));
        let a = answer.clone();
        std::thread::spawn(move || stand_in(listener, a));
        let password = std::env::temp_dir().join(format!("nvmirror-fuzz-etcd-{}.pw", std::process::id()));
        std::fs::write(&password, "pw\n").expect("password file");
        let security = EtcdSecurity { user: Some("nvm".into()), password_file: Some(password), ..Default::default() };
        let timeout = Duration::from_secs(2);
        World {
            answer,
            plain: Etcd::new(&url, timeout).expect("client"),
            authenticated: Etcd::secured(&url, timeout, &security).expect("client with a user"),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else { return };
    let w = world();
    *w.answer.lock().expect("answer") = (STATUSES[usize::from(pick) % STATUSES.len()], body.to_vec());
    for etcd in [&w.plain, &w.authenticated] {
        let _ = etcd.grant(3);
        let _ = etcd.keepalive(7);
        let _ = etcd.get("nvmirror/volumes/v/primary");
        let _ = etcd.put("nvmirror/volumes/v/state", b"{}", Some(7));
        let _ = etcd.create("nvmirror/volumes/v/primary", b"{\"node\":\"a\"}", Some(7));
        let _ = etcd.delete("nvmirror/volumes/v/primary");
    }
});
