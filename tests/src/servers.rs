//! Small real servers for backends (HTTP and line echo over TCP, UDP echo) and
//! the matching clients. Every loop is bounded by a stop flag or a timeout.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::netns::NetNs;

pub const IO_TIMEOUT: Duration = Duration::from_secs(3);

/// TCP and UDP servers of one backend; stopped and joined on drop.
pub struct BackendServers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl BackendServers {
    /// Serves on 0.0.0.0:`tcp_port` and 0.0.0.0:`udp_port` inside `ns`.
    /// TCP: an HTTP GET gets `backend NAME client IP:PORT`; any other line is
    /// answered with `NAME` per line. UDP: `NAME client IP:PORT` per
    /// datagram; a query `size N …` gets `NAME client IP:PORT got LEN`
    /// padded to N bytes (LEN: the query's length), for fragmented answers.
    pub fn start(ns: &NetNs, name: &str, tcp_port: u16, udp_port: u16) -> anyhow::Result<Self> {
        Self::start_on(ns, Ipv4Addr::UNSPECIFIED, name, tcp_port, udp_port)
    }

    /// `start`, bound to `addr` (answers then come from it, as from a
    /// daemon that binds its listen address).
    pub fn start_on(
        ns: &NetNs,
        addr: impl Into<std::net::IpAddr>,
        name: &str,
        tcp_port: u16,
        udp_port: u16,
    ) -> anyhow::Result<Self> {
        let addr = addr.into();
        let (listener, udp) = ns.run(|| -> anyhow::Result<_> {
            let listener = TcpListener::bind((addr, tcp_port))?;
            let udp = UdpSocket::bind((addr, udp_port))?;
            Ok((listener, udp))
        })?;
        udp.set_read_timeout(Some(Duration::from_millis(50)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let (tcp_name, tcp_stop) = (name.to_owned(), stop.clone());
        threads.push(std::thread::spawn(move || {
            while !tcp_stop.load(Ordering::Relaxed) {
                // Wait for a connection, waking every 50 ms to check the stop flag.
                if !readable(&listener, 50) {
                    continue;
                }
                if let Ok((stream, peer)) = listener.accept() {
                    let name = tcp_name.clone();
                    std::thread::spawn(move || serve_tcp(stream, peer, &name));
                }
            }
        }));
        let (udp_name, udp_stop) = (name.to_owned(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !udp_stop.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = udp.recv_from(&mut buf) {
                    let answer = udp_answer(&udp_name, peer, &buf[..n]);
                    let _ = udp.send_to(&answer, peer);
                }
            }
        }));
        Ok(Self { stop, threads })
    }
}

/// The UDP server's answer to `query` from `peer`.
fn udp_answer(name: &str, peer: SocketAddr, query: &[u8]) -> Vec<u8> {
    let size = std::str::from_utf8(query.get(..16).unwrap_or(query))
        .ok()
        .and_then(|q| q.strip_prefix("size "))
        .and_then(|q| q.split_whitespace().next())
        .and_then(|n| n.parse::<usize>().ok());
    match size {
        Some(size) => {
            let mut answer = format!("{name} client {peer} got {}", query.len()).into_bytes();
            answer.resize(size.max(answer.len()), b'.');
            answer
        }
        None => format!("{name} client {peer}").into_bytes(),
    }
}

impl Drop for BackendServers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Whether `listener` has a connection waiting within `timeout_ms`.
fn readable(listener: &TcpListener, timeout_ms: i32) -> bool {
    use std::os::fd::AsRawFd as _;
    let mut fd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut fd, 1, timeout_ms) > 0 }
}

fn serve_tcp(stream: TcpStream, peer: SocketAddr, name: &str) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let _ = stream.set_nonblocking(false);
    let Ok(write_half) = stream.try_clone() else {
        return;
    };
    let mut writer = write_half;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while reader.read_line(&mut line).unwrap_or(0) > 0 {
        if line == "SINK\n" {
            // Throughput: swallow everything, then report the byte count.
            let n = std::io::copy(&mut reader, &mut std::io::sink()).unwrap_or(0);
            let _ = writeln!(writer, "{n}");
            return;
        }
        if line.starts_with("GET ") {
            // Skip the headers, answer, close.
            let mut header = String::new();
            while reader.read_line(&mut header).unwrap_or(0) > 0 && header.trim() != "" {
                header.clear();
            }
            let body = format!("backend {name} client {peer}\n");
            let _ = write!(
                writer,
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            return;
        }
        if writeln!(writer, "{name}").is_err() {
            return;
        }
        line.clear();
    }
}

/// One HTTP/1.0 GET on a new connection; returns the body.
pub fn http_get(addr: impl Into<SocketAddr>) -> std::io::Result<String> {
    let addr = addr.into();
    get_over(TcpStream::connect_timeout(&addr, IO_TIMEOUT)?, addr)
}

/// The GET on a connected stream to `addr`; the body.
fn get_over(mut stream: TcpStream, addr: impl std::fmt::Display) -> std::io::Result<String> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    write!(stream, "GET / HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    Ok(body.trim().to_owned())
}

/// `http_get` from a fixed source address and port (either family).
pub fn http_get_from(
    from: impl Into<SocketAddr>,
    addr: impl Into<SocketAddr>,
) -> std::io::Result<String> {
    use nix::sys::socket::{
        bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrStorage,
    };
    use std::os::fd::AsRawFd as _;
    let (from, addr) = (from.into(), addr.into());
    let family = if addr.is_ipv6() {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    // Close-on-exec, as std's sockets are: a process another test thread
    // spawns meanwhile would otherwise hold the socket open after it is
    // dropped, with its port bound and its FIN never sent.
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(from))?;
    connect(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    get_over(TcpStream::from(fd), addr)
}

/// One datagram from a new socket; returns the answer and who sent it.
pub fn udp_query(addr: impl Into<SocketAddr>) -> std::io::Result<(String, SocketAddr)> {
    let addr = addr.into();
    let unspecified: std::net::IpAddr = if addr.is_ipv6() {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    } else {
        Ipv4Addr::UNSPECIFIED.into()
    };
    let socket = UdpSocket::bind((unspecified, 0))?;
    socket.set_read_timeout(Some(IO_TIMEOUT))?;
    socket.send_to(b"query", addr)?;
    let mut buf = [0u8; 2048];
    let (n, from) = socket.recv_from(&mut buf)?;
    Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
}

/// A `query_len`-byte datagram asking for an `answer_len`-byte answer,
/// both sent without DF (each side's stack fragments what its link cannot
/// carry whole; an IPv6 host always does): the answer's first line and
/// length, and who sent it.
pub fn udp_query_sized(
    addr: SocketAddr,
    query_len: usize,
    answer_len: usize,
) -> std::io::Result<(String, usize, SocketAddr)> {
    let socket = match addr {
        SocketAddr::V4(_) => UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?,
        SocketAddr::V6(_) => UdpSocket::bind((std::net::Ipv6Addr::UNSPECIFIED, 0))?,
    };
    socket.set_read_timeout(Some(IO_TIMEOUT))?;
    if addr.is_ipv4() {
        allow_fragments(&socket)?;
    }
    let mut query = format!("size {answer_len} ").into_bytes();
    query.resize(query_len.max(query.len()), b'q');
    socket.send_to(&query, addr)?;
    let mut buf = vec![0u8; 65536];
    let (n, from) = socket.recv_from(&mut buf)?;
    let text = String::from_utf8_lossy(&buf[..n]);
    let line = text.trim_end_matches('.').to_owned();
    Ok((line, n, from))
}

/// IPv4 without DF: the stack fragments what the link cannot carry.
fn allow_fragments(socket: &UdpSocket) -> std::io::Result<()> {
    let dont: libc::c_int = libc::IP_PMTUDISC_DONT;
    // SAFETY: a valid socket and an int option.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(socket),
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            (&dont as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A long-lived line-echo connection (sockets survive the netns thread that made them).
pub struct EchoConnection {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl EchoConnection {
    pub fn open(addr: SocketAddrV4) -> std::io::Result<Self> {
        let stream = TcpStream::connect_timeout(&addr.into(), IO_TIMEOUT)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Self { stream, reader })
    }

    /// Sends a line; returns the backend's name.
    pub fn ask(&mut self) -> std::io::Result<String> {
        writeln!(self.stream, "who")?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        Ok(line.trim().to_owned())
    }
}

/// Sends `bytes` over one connection to a backend's sink; returns the elapsed time.
pub fn sink_transfer(addr: impl Into<SocketAddr>, bytes: u64) -> std::io::Result<Duration> {
    let started = std::time::Instant::now();
    let mut stream = TcpStream::connect_timeout(&addr.into(), IO_TIMEOUT)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    stream.write_all(b"SINK\n")?;
    let chunk = vec![0x5au8; 256 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        stream.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    if reply.trim().parse::<u64>().ok() != Some(bytes) {
        return Err(std::io::Error::other(format!(
            "sink received {reply:?}, sent {bytes}"
        )));
    }
    Ok(started.elapsed())
}

/// Sends `bytes` to a backend's sink through `addr`, every read and write
/// bounded by 10 s: a black-holed path fails instead of hanging. Returns
/// the sink's count of bytes received.
pub fn bounded_sink_transfer(addr: impl Into<SocketAddr>, bytes: usize) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr.into(), IO_TIMEOUT)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(b"SINK\n")?;
    stream.write_all(&vec![0x5a; bytes])?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    Ok(reply.trim().to_owned())
}

/// The status code of `GET path` at `addr` in `ns`.
pub fn get_status(ns: &crate::netns::NetNs, addr: &str, path: &str) -> std::io::Result<u16> {
    ns.run(|| {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect(addr)?;
        write!(s, "GET {path} HTTP/1.0\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        out.split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {out:?}")))
    })
}

/// Waits until `GET path` at `addr` in `ns` answers `want`; the last
/// answer or error otherwise.
pub fn wait_for_status(
    ns: &crate::netns::NetNs,
    addr: &str,
    path: &str,
    want: u16,
) -> Result<(), String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let got = get_status(ns, addr, path).map_err(|e| e.to_string());
        match got {
            Ok(code) if code == want => return Ok(()),
            _ if std::time::Instant::now() > deadline => return Err(format!("{path}: {got:?}")),
            _ => std::thread::sleep(std::time::Duration::from_millis(100)),
        }
    }
}
