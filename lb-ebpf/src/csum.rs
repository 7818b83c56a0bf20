//! Full checksums over small stack buffers (for headers we build ourselves).

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
