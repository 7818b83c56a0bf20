//! The service CIDRs (`--service-cluster-ip-range`, kube-proxy's flag): a
//! TCP or UDP packet to an address there that no frontend holds — an
//! unallocated cluster IP, or an allocated one on a port it does not serve
//! — is rejected, as nftables kube-proxy rejects it, instead of wandering
//! to the default route. A load-time global of the eBPF object.

/// Prefixes held (a dual-stack cluster has two; the spare room costs four
/// compares of an unrolled loop).
pub const MAX_CIDRS: usize = 4;

/// Addresses and masks in host order; the first `count` are used.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Cidrs {
    pub addr: [u32; MAX_CIDRS],
    pub mask: [u32; MAX_CIDRS],
    pub count: u32,
}

impl Cidrs {
    pub const NONE: Self = Self {
        addr: [0; MAX_CIDRS],
        mask: [0; MAX_CIDRS],
        count: 0,
    };

    /// Whether `addr` (host order) lies in one of the prefixes.
    #[inline(always)]
    pub fn contains(&self, addr: u32) -> bool {
        let mut i = 0;
        while i < MAX_CIDRS {
            if (i as u32) < self.count && addr & self.mask[i] == self.addr[i] {
                return true;
            }
            i += 1;
        }
        false
    }
}

crate::user_pod!(Cidrs);
