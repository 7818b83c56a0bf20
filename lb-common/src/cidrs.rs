//! The service CIDRs (`--service-cluster-ip-range`, kube-proxy's flag): a
//! TCP or UDP packet to an address there that no frontend holds — an
//! unallocated cluster IP, or an allocated one on a port it does not serve
//! — is rejected, as nftables kube-proxy rejects it, instead of wandering
//! to the default route. And the cluster's pod CIDRs (`--cluster-cidr`).
//! Load-time globals of the eBPF object, one per family.

/// Prefixes held per family (a cluster has one or two; the spare room
/// costs compares of an unrolled loop).
pub const MAX_CIDRS: usize = 4;

/// Addresses and masks as `WORDS` 32-bit words (an IPv4 address is one
/// word, IPv6 four), each four bytes in wire order read as a native `u32`
/// (see `words`): masking needs no byte swap. The first `count` prefixes
/// are used.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Cidrs<const WORDS: usize = 1> {
    pub addr: [[u32; WORDS]; MAX_CIDRS],
    pub mask: [[u32; WORDS]; MAX_CIDRS],
    pub count: u32,
}

pub type Cidrs6 = Cidrs<4>;

impl<const WORDS: usize> Cidrs<WORDS> {
    pub const NONE: Self = Self {
        addr: [[0; WORDS]; MAX_CIDRS],
        mask: [[0; WORDS]; MAX_CIDRS],
        count: 0,
    };

    /// Whether `addr` (wire order, `4 * WORDS` bytes) lies in one of the
    /// prefixes. Fields are read volatile, one at a time where compared:
    /// the datapath's `Cidrs` are load-time globals whose initial zeros the
    /// compiler would otherwise fold, and a copy of IPv6's 132 bytes would
    /// not fit its stack.
    #[inline(always)]
    pub fn contains(&self, addr: &[u8]) -> bool {
        // SAFETY: reads of fields of a valid reference.
        let read = |field: &u32| unsafe { core::ptr::read_volatile(field) };
        let count = read(&self.count);
        let mut i = 0;
        while i < MAX_CIDRS && (i as u32) < count {
            let mut differ = 0;
            let mut w = 0;
            while w < WORDS {
                differ |= (word(addr, w) & read(&self.mask[i][w])) ^ read(&self.addr[i][w]);
                w += 1;
            }
            if differ == 0 {
                return true;
            }
            i += 1;
        }
        false
    }
}

/// Word `w` of a wire-order address, as `Cidrs` holds it.
#[inline(always)]
fn word(addr: &[u8], w: usize) -> u32 {
    u32::from_ne_bytes([
        addr[4 * w],
        addr[4 * w + 1],
        addr[4 * w + 2],
        addr[4 * w + 3],
    ])
}

/// An address's (or mask's) words, as `Cidrs` holds them.
pub fn words<const WORDS: usize>(addr: &[u8]) -> [u32; WORDS] {
    core::array::from_fn(|w| word(addr, w))
}

const _: () = assert!(core::mem::size_of::<Cidrs>() == 36);
const _: () = assert!(core::mem::size_of::<Cidrs6>() == 132);

crate::user_pod!(Cidrs, Cidrs6);
