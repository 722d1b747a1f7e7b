//! The control API's HTTP server, from hostile bytes on a connection: hyper's parsing, the
//! bounds on heads and bodies, the request's target, headers (challenge and call proofs)
//! and query parameters, routed to a real node with no volumes. Whatever arrives, the
//! connection is answered or closed, and nothing panics.
//!
//! Two routes stay out: `POST /v1/volumes` (it would create a volume per input) and a
//! followed event stream (it stays open until the client leaves); both are answered 404
//! by the harness, before the node.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use nvmirror_control::api::http::{self, Api, ApiRequest, Caller, Reply};
use nvmirror_control::api::{HttpPeers, NodeApi};
use nvmirror_control::node::{Node, NodeConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Harness(NodeApi);

impl Api for Harness {
    fn handle(&self, request: ApiRequest) -> Reply {
        let path = request.target.split('?').next().unwrap_or("").trim_matches('/');
        let creates = request.method == hyper::Method::POST && path == "v1/volumes";
        let follows = path == "v1/events" && request.target.contains("follow");
        if creates || follows {
            return Reply::error(404, "left out of the fuzz harness");
        }
        self.0.handle(request)
    }
}

struct World {
    runtime: tokio::runtime::Runtime,
    api: Arc<dyn Api>,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("nvmirror-fuzz-api-http-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let any = "127.0.0.1:9".parse().expect("address");
        let node = Node::open(NodeConfig {
            name: "fuzz".into(),
            nvram: format!("file:{}", dir.join("nvram").display()).parse().expect("nvram"),
            data_dir: dir,
            replication: any,
            nbd: any,
            nvmf: None,
            control: any,
            raid: Default::default(),
            mirror_layout: Default::default(),
            secret: None,
            tls: None,
            nbd_client_ca: None,
            require_signed_ctl: false,
            advertise: None,
            copy_rate: None,
            peers: Arc::new(HttpPeers { secret: None }),
        })
        .expect("open a node");
        World { runtime: http::runtime(&http::LIMITS).expect("runtime"), api: Arc::new(Harness(NodeApi::new(node))) }
    })
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    w.runtime.block_on(async {
        let (mut client, server) = tokio::io::duplex(256 << 10);
        let caller = Caller { addr: "127.0.0.1:40000".parse().expect("address"), operator: None };
        let served = tokio::spawn(http::serve_stream(server, caller, w.api.clone(), http::LIMITS));
        // The whole input, then the client's end of sending: the server sees the end of
        // the stream wherever the input stops.
        let _ = client.write_all(data).await;
        let _ = client.shutdown().await;
        let mut answer = Vec::new();
        let _ = client.read_to_end(&mut answer).await;
        let _ = served.await;
        if !answer.is_empty() {
            assert!(
                answer.starts_with(b"HTTP/1."),
                "an answer that is not HTTP: {:?}",
                String::from_utf8_lossy(&answer)
            );
        }
    });
});
