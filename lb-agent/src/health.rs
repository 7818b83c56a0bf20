//! `/healthz` (and `/readyz`): 200 once the agent has programmed the datapath
//! from a complete view of its source, 503 before. Minimal HTTP/1.0.

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};

pub async fn serve(listener: TcpListener, ready: Arc<AtomicBool>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let ready = ready.load(Ordering::Relaxed);
        tokio::spawn(async move {
            let mut request = [0u8; 1024];
            let n =
                tokio::time::timeout(std::time::Duration::from_secs(2), stream.read(&mut request))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or(0);
            let line = String::from_utf8_lossy(&request[..n]);
            let path = line.split_whitespace().nth(1).unwrap_or("");
            let (status, body) = match path {
                "/healthz" | "/readyz" if ready => ("200 OK", "ok\n"),
                "/healthz" | "/readyz" => ("503 Service Unavailable", "not synced yet\n"),
                _ => ("404 Not Found", "not found\n"),
            };
            let response = format!(
                "HTTP/1.0 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}
