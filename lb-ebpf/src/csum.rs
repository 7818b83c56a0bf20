//! Checksums: full ones over small stack buffers (for headers we build
//! ourselves), and incremental updates of the packet's own.

use aya_ebpf::helpers::bpf_csum_diff;

/// One's-complement partial sum of `len` bytes at `buf` (a multiple of 4), added to `seed`.
#[inline(always)]
pub fn partial(buf: *mut u32, len: u32, seed: u32) -> u32 {
    unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, buf, len, seed) as u32 }
}

/// Folds a partial sum into the 16-bit checksum, in the buffer's byte order.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// One's-complement sum of two 16-bit words (end-around carry).
#[inline(always)]
pub fn add16(a: u16, b: u16) -> u16 {
    let sum = u32::from(a) + u32::from(b);
    ((sum & 0xffff) + (sum >> 16)) as u16
}

/// An incremental one's-complement update (RFC 1624: HC' = ~(~HC + ~m + m')),
/// on 16-bit words in memory order, as the packet holds them.
pub struct Sum(u32);

impl Sum {
    #[inline(always)]
    pub fn start(csum: u16) -> Self {
        Self(u32::from(!csum))
    }

    #[inline(always)]
    pub fn replace16(&mut self, old: u16, new: u16) {
        self.0 += u32::from(!old) + u32::from(new);
    }

    #[inline(always)]
    pub fn replace32(&mut self, old: u32, new: u32) {
        self.replace16(old as u16, new as u16);
        self.replace16((old >> 16) as u16, (new >> 16) as u16);
    }

    /// Adds a one's-complement sum (a `bpf_csum_diff` result).
    #[inline(always)]
    pub fn add(&mut self, sum: u32) {
        // Folded first: `replace16`'s additions stay far from overflowing.
        self.0 += (sum & 0xffff) + (sum >> 16);
    }

    #[inline(always)]
    pub fn finish(self) -> u16 {
        fold(self.0)
    }
}
