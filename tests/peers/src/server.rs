//! A small HTTP/1 server on loopback (hyper) that the fakes share: a handler
//! per request, which may also drop the connection without an answer; and
//! stop/start on the same port, for "the peer is down, then back".

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub struct Req {
    pub method: String,
    pub path: String,
    pub query: String,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Req {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub enum Reply {
    Json(u16, serde_json::Value, Vec<(&'static str, String)>),
    /// Close the connection without answering.
    Drop,
}

impl Reply {
    pub fn json(status: u16, v: serde_json::Value) -> Reply {
        Reply::Json(status, v, Vec::new())
    }
}

pub type Handler = Arc<dyn Fn(Req) -> Pin<Box<dyn Future<Output = Reply> + Send>> + Send + Sync>;

pub struct Server {
    pub addr: SocketAddr,
    handler: Handler,
    stop: Mutex<Option<watch::Sender<bool>>>,
}

impl Server {
    /// Serve on `addr` (port 0: any free port).
    pub async fn start(addr: SocketAddr, handler: Handler) -> std::io::Result<Arc<Server>> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let s = Arc::new(Server { addr, handler, stop: Mutex::new(None) });
        s.run(listener);
        Ok(s)
    }

    fn run(&self, listener: TcpListener) {
        let (tx, mut rx) = watch::channel(false);
        *self.stop.lock().unwrap() = Some(tx);
        let handler = self.handler.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let handler = handler.clone();
                        let mut stop = rx.clone();
                        tokio::spawn(async move {
                            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                                let handler = handler.clone();
                                async move {
                                    let (parts, body) = req.into_parts();
                                    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                                    let r = Req {
                                        method: parts.method.to_string(),
                                        path: parts.uri.path().to_string(),
                                        query: parts.uri.query().unwrap_or_default().to_string(),
                                        headers: parts.headers,
                                        body,
                                    };
                                    match handler(r).await {
                                        Reply::Json(status, v, headers) => {
                                            let mut resp = Response::builder().status(status).header("content-type", "application/json");
                                            for (k, v) in headers {
                                                resp = resp.header(k, v);
                                            }
                                            Ok::<_, std::io::Error>(
                                                resp.body(Full::new(Bytes::from(v.to_string()))).unwrap(),
                                            )
                                        }
                                        Reply::Drop => Err(std::io::Error::other("dropped on purpose")),
                                    }
                                }
                            });
                            let conn = hyper::server::conn::http1::Builder::new()
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                            tokio::select! {
                                _ = conn => {}
                                _ = stop.changed() => {}
                            }
                        });
                    }
                    _ = rx.changed() => break,
                }
            }
        });
    }

    /// Stop listening (new connections are refused) and close open ones.
    pub fn stop(&self) {
        if let Some(tx) = self.stop.lock().unwrap().take() {
            let _ = tx.send(true);
        }
    }

    /// Listen again on the same port.
    pub async fn resume(&self) -> std::io::Result<()> {
        let mut tries = 0;
        loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => {
                    self.run(l);
                    return Ok(());
                }
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// The body, gunzipped when the request says so.
pub fn body_of(r: &Req) -> Result<Vec<u8>, String> {
    if r.header("content-encoding").is_some_and(|e| e.eq_ignore_ascii_case("gzip")) {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(r.body.as_ref()), &mut out).map_err(|e| e.to_string())?;
        Ok(out)
    } else {
        Ok(r.body.to_vec())
    }
}

pub fn _infallible(_: Infallible) {}
