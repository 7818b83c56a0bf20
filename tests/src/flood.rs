//! A spoofed SYN flood from a namespace: raw IPv4 TCP SYNs to one
//! address from many sources and ports, as fast as one thread can send
//! (this kernel has no pktgen). For tests and the soak.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
};

use crate::{
    netns::NetNs,
    packet::{Packet, TCP_SYN},
};

/// A running flood; `stop` ends it.
pub struct Flood {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    thread: Option<JoinHandle<std::io::Result<()>>>,
}

impl Flood {
    /// Starts sending SYNs to `target` from `ns`, with sources `first` and
    /// the `hosts - 1` addresses after it, and random ports.
    pub fn syn(ns: &NetNs, target: SocketAddrV4, first: Ipv4Addr, hosts: u8) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (stop_flag, counter) = (stop.clone(), sent.clone());
        let thread = ns.spawn(move || send_syns(target, first, hosts, &stop_flag, &counter));
        Self {
            stop,
            sent,
            thread: Some(thread),
        }
    }

    /// Packets sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Stops the flood: the packets sent, or the sender's error.
    pub fn stop(mut self) -> std::io::Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.take().expect("running");
        thread.join().expect("flood thread")?;
        Ok(self.sent())
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn send_syns(
    target: SocketAddrV4,
    first: Ipv4Addr,
    hosts: u8,
    stop: &AtomicBool,
    sent: &AtomicU64,
) -> std::io::Result<()> {
    // SAFETY: plain socket calls on a descriptor this function owns.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let to = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(*target.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let mut state: u32 = 0x9e37_79b9;
    let result = loop {
        if stop.load(Ordering::Relaxed) {
            break Ok(());
        }
        // xorshift32: cheap, and every source port and host comes up.
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let host = u32::from(first) + state % u32::from(hosts.max(1));
        let port = 1024 + (state >> 16) as u16 % 60000;
        let source = SocketAddrV4::new(Ipv4Addr::from(host), port);
        let frame = Packet::tcp(source, target, TCP_SYN).build();
        let ip = &frame[14..]; // a raw IP socket takes the packet from its IP header
                               // SAFETY: `ip` and `to` are valid for the call.
        let n = unsafe {
            libc::sendto(
                fd,
                ip.as_ptr().cast(),
                ip.len(),
                0,
                (&to as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            // A full queue: the flood outruns the device; try again.
            if e.raw_os_error() != Some(libc::ENOBUFS) && e.raw_os_error() != Some(libc::EAGAIN) {
                break Err(e);
            }
            continue;
        }
        sent.fetch_add(1, Ordering::Relaxed);
    };
    // SAFETY: the descriptor is this function's.
    unsafe { libc::close(fd) };
    result
}
