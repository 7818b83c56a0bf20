//! One request and its replies over a netlink socket (netlink-sys), for
//! any message family netlink-packet-* defines: the socket-diag requests
//! of the UDP reset and the nftables dumps that look for kube-proxy.

use netlink_packet_core::{
    NetlinkDeserializable, NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable,
};
use netlink_sys::{Socket, SocketAddr};

/// A socket of `protocol` bound and connected to the kernel.
pub fn connect(protocol: isize) -> std::io::Result<Socket> {
    let mut socket = Socket::new(protocol)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    Ok(socket)
}

pub fn send<T: NetlinkSerializable>(
    socket: &Socket,
    flags: u16,
    payload: T,
) -> std::io::Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    let mut message = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(payload));
    message.finalize();
    let mut buf = vec![0; message.buffer_len()];
    message.serialize(&mut buf);
    socket.send(&buf, 0)?;
    Ok(())
}

/// Reads replies until the dump ends or the request is answered (an ACK or
/// an error), handing each message to `each`.
pub fn receive<T: NetlinkDeserializable>(
    socket: &Socket,
    mut each: impl FnMut(NetlinkPayload<T>),
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let size = socket.recv(&mut &mut buf[..], 0)?;
        let mut offset = 0;
        while offset < size {
            let message = NetlinkMessage::<T>::deserialize(&buf[offset..size])
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
            let length = message.header.length as usize;
            let last = matches!(
                message.payload,
                NetlinkPayload::Done(_) | NetlinkPayload::Error(_)
            );
            each(message.payload);
            if last {
                return Ok(());
            }
            if length == 0 {
                break;
            }
            offset += length;
        }
    }
}
