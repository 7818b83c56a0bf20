//! A first fragment's translation is recorded once it is sent; later
//! fragments of its datagram follow it (see `lb_common::frag`), in both
//! families. Keys and values are built in per-CPU scratch: IPv6's 88 bytes
//! of them did not fit the IPv6 programs' stack.

use aya_ebpf::{
    bindings::TC_ACT_REDIRECT,
    helpers::{bpf_skb_load_bytes, bpf_skb_store_bytes},
    programs::TcContext,
};
use lb_common::{
    frag::{FragKey, FragValue, FRAG_AT_EGRESS, FRAG_AT_INGRESS, FRAG_LIFETIME_NS, FRAG_ROUTED},
    stats::Stat,
    wire, Ipv4, Ipv6,
};

use crate::{
    ct,
    maps::{FragMap, FRAGS, FRAGS6, FRAG_SCRATCH, FRAG_SCRATCH6},
    nat,
    parse::{Fragment, Packet, IP6_SADDR_OFF, IP_SADDR_OFF},
    redirect, Outcome,
};

/// A key and the value it is to get (or got), in scratch, and what the
/// program that finishes the work needs of the packet's parse.
#[repr(C)]
pub struct FragRecord<A> {
    pub key: FragKey<A>,
    pub value: FragValue<A>,
    pub sent: Outcome,
    /// A later fragment's IP datagram length.
    pub tot_len: u16,
}

/// What the families differ in: their maps, where the header holds the
/// addresses, and how a later fragment's are rewritten (IPv4's under the
/// header checksum).
pub trait Fragments: redirect::Forward {
    /// The source address's offset in the frame; the destination follows.
    const ADDRESSES_OFF: u32;
    /// A first fragment's datagram identification, host order.
    fn datagram_id(ctx: &TcContext, pkt: &Packet<Self>) -> Option<u32>;
    /// `finish_record` and `follow_keyed`, here or in programs of their own.
    fn finish_record(ctx: &TcContext) -> Outcome;
    fn follow_keyed(ctx: &TcContext) -> Outcome;
    fn frags() -> &'static FragMap<Self>;
    fn scratch() -> Option<*mut FragRecord<Self>>;
    /// Rewrites a later fragment's addresses from `from`'s (the key's) to
    /// `to`'s.
    fn rewrite(ctx: &TcContext, from: &FragKey<Self>, to: &FragValue<Self>) -> Result<(), ()>;
}

impl Fragments for Ipv4 {
    const ADDRESSES_OFF: u32 = IP_SADDR_OFF;
    #[inline(always)]
    fn datagram_id(_: &TcContext, pkt: &Packet) -> Option<u32> {
        Some(u32::from(u16::from_be(pkt.id_be)))
    }
    #[inline(always)]
    fn finish_record(ctx: &TcContext) -> Outcome {
        finish_record::<Ipv4>(ctx)
    }
    #[inline(always)]
    fn follow_keyed(ctx: &TcContext) -> Outcome {
        follow_keyed::<Ipv4>(ctx)
    }
    #[inline(always)]
    fn frags() -> &'static FragMap<Self> {
        &FRAGS
    }
    #[inline(always)]
    fn scratch() -> Option<*mut FragRecord<Self>> {
        FRAG_SCRATCH.get_ptr_mut(0)
    }
    #[inline(always)]
    fn rewrite(ctx: &TcContext, from: &FragKey, to: &FragValue) -> Result<(), ()> {
        nat::translate_addresses(
            ctx,
            (wire(from.saddr), wire(from.daddr)),
            (wire(to.src_addr), wire(to.dst_addr)),
        )
    }
}

impl Fragments for Ipv6 {
    const ADDRESSES_OFF: u32 = IP6_SADDR_OFF;
    /// The fragment header's last word, just before the transport header
    /// (`parse::parse6` takes no other first fragment).
    #[inline(always)]
    fn datagram_id(ctx: &TcContext, pkt: &Packet<Ipv6>) -> Option<u32> {
        let id: u32 = ctx.load(pkt.l4_off as usize - 4).ok()?;
        Some(u32::from_be(id))
    }
    /// In `lb_frag6_record`, entered by tail call (the redirect a routed
    /// fragment was given holds across it), as is `follow_keyed`: inlined
    /// after the extension header walk, which reaches them in many states,
    /// `follow_keyed` took `lb_frag6_in` to 817 k verified instructions.
    #[inline(always)]
    fn finish_record(ctx: &TcContext) -> Outcome {
        crate::family6::enter(ctx, lb_common::family6::FRAG_RECORD);
        Outcome::drop(Stat::DropTailCall)
    }
    #[inline(always)]
    fn follow_keyed(ctx: &TcContext) -> Outcome {
        crate::family6::enter(ctx, lb_common::family6::FRAG_FOLLOW);
        Outcome::next(Stat::PassFragmentUntracked) // the tail call failed
    }
    #[inline(always)]
    fn frags() -> &'static FragMap<Self> {
        &FRAGS6
    }
    #[inline(always)]
    fn scratch() -> Option<*mut FragRecord<Self>> {
        FRAG_SCRATCH6.get_ptr_mut(0)
    }
    /// No header checksum: one store of both addresses, from the record.
    #[inline(always)]
    fn rewrite(ctx: &TcContext, _: &FragKey<Ipv6>, to: &FragValue<Ipv6>) -> Result<(), ()> {
        // SAFETY: the value starts with both addresses; the helper copies
        // that many bytes from it.
        let stored = unsafe {
            bpf_skb_store_bytes(
                ctx.skb.skb as *mut _,
                IP6_SADDR_OFF,
                to as *const FragValue<Ipv6> as *const _,
                FragValue::<Ipv6>::ADDRESSES_LEN as u32,
                0,
            )
        };
        if stored < 0 {
            return Err(());
        }
        Ok(())
    }
}

/// This CPU's scratch record.
#[inline(always)]
fn scratch<A: Fragments>() -> Option<&'static mut FragRecord<A>> {
    // SAFETY: this CPU's map value, valid for the program run; nothing
    // else on this CPU runs until the program ends.
    A::scratch().map(|r| unsafe { &mut *r })
}

/// The scratch key's datagram (`id`, `proto`) and hook.
#[inline(always)]
fn key_datagram<A>(key: &mut FragKey<A>, id: u32, proto: u8) {
    key.id = id;
    key.proto = proto;
    key._pad = [0; 2];
}

#[inline(always)]
fn key_hook<A, const EGRESS: bool>(key: &mut FragKey<A>) {
    key.hook = if EGRESS {
        FRAG_AT_EGRESS
    } else {
        FRAG_AT_INGRESS
    };
}

/// Copies both addresses from the packet into `to` (a key or value,
/// which start with them).
#[inline(always)]
fn load_addresses<A: Fragments, T>(ctx: &TcContext, to: &mut T) -> Result<(), ()> {
    // SAFETY: `to` starts with both addresses; the helper writes that
    // many bytes, from the linear header the parse checked.
    let loaded = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            A::ADDRESSES_OFF,
            to as *mut T as *mut _,
            FragValue::<A>::ADDRESSES_LEN as u32,
        )
    };
    if loaded < 0 {
        return Err(());
    }
    Ok(())
}

/// A packet's `outcome`; for a first fragment sent on, what it carries
/// now (its flow's translation, if it got one) is recorded under the
/// datagram it arrived as, at this hook, for the later fragments. After
/// the translation, not at each of its call sites: the verifier walks the
/// record once per program. An unrecorded fragment is dropped (its
/// datagram could not be reassembled at the backend anyway).
#[inline(always)]
pub fn recorded<A: Fragments, const EGRESS: bool>(
    ctx: &TcContext,
    pkt: &Packet<A>,
    outcome: Outcome,
) -> Outcome {
    if !pkt.is_fragment
        || !matches!(
            outcome.stat,
            Stat::DnatNew | Stat::DnatCtHit | Stat::RevNat | Stat::RevSnat
        )
    {
        return outcome;
    }
    let Some(id) = A::datagram_id(ctx, pkt) else {
        return Outcome::drop(Stat::DropFragment);
    };
    let Some(record) = scratch::<A>() else {
        return Outcome::drop(Stat::DropFragment);
    };
    key_datagram(&mut record.key, id, pkt.proto);
    key_hook::<A, EGRESS>(&mut record.key);
    // Word by word (a 16-byte copy is a 128-bit move the BPF backend
    // cannot lower): the addresses the fragment arrived with.
    let key = &mut record.key as *mut FragKey<A> as *mut u32;
    let words = core::mem::size_of::<A>() / 4;
    let (saddr, daddr) = (
        &pkt.saddr as *const A as *const u32,
        &pkt.daddr as *const A as *const u32,
    );
    for i in 0..words {
        // SAFETY: inside the key's leading addresses and the packet's.
        unsafe {
            key.add(i).write(saddr.add(i).read_unaligned());
            key.add(words + i).write(daddr.add(i).read_unaligned());
        }
    }
    record.sent = outcome;
    A::finish_record(ctx)
}

/// The record keyed in scratch gets the addresses the packet carries now;
/// the packet goes on as `FragRecord::sent` says.
#[inline(always)]
pub fn finish_record<A: Fragments>(ctx: &TcContext) -> Outcome {
    let Some(record) = scratch::<A>() else {
        return Outcome::drop(Stat::DropFragment);
    };
    let sent = record.sent;
    let value = &mut record.value;
    if load_addresses::<A, _>(ctx, value).is_err() {
        return Outcome::drop(Stat::DropFragment);
    }
    value.flags = if sent.action == TC_ACT_REDIRECT as i32 {
        FRAG_ROUTED
    } else {
        0
    };
    value._pad = [0; 7];
    value.expires_ns = ct::now() + FRAG_LIFETIME_NS;
    if A::frags().insert(&record.key, &record.value, 0).is_err() {
        return Outcome::drop(Stat::DropFragment);
    }
    sent
}

/// A later fragment: rewritten as its datagram's first fragment was at
/// this hook, and routed like it when its flow is SNATed; untouched when no
/// first fragment was recorded (not a service flow's, or out of order).
#[inline(always)]
pub fn follow<A: Fragments, const EGRESS: bool>(ctx: &TcContext, frag: &Fragment) -> Outcome {
    if stash::<A>(frag).is_err() {
        return Outcome::next(Stat::PassMalformed);
    }
    follow_stashed::<A, EGRESS>(ctx)
}

/// Leaves a later fragment's datagram in scratch, for `follow_stashed`.
#[inline(always)]
pub fn stash<A: Fragments>(frag: &Fragment) -> Result<(), ()> {
    let record = scratch::<A>().ok_or(())?;
    key_datagram(&mut record.key, frag.id, frag.proto);
    record.tot_len = frag.tot_len;
    Ok(())
}

/// `follow` for the fragment `stash`ed.
#[inline(always)]
pub fn follow_stashed<A: Fragments, const EGRESS: bool>(ctx: &TcContext) -> Outcome {
    let Some(record) = scratch::<A>() else {
        return Outcome::next(Stat::PassMalformed);
    };
    key_hook::<A, EGRESS>(&mut record.key);
    A::follow_keyed(ctx)
}

/// `follow` for the fragment keyed in scratch (its addresses still to be
/// read from the packet).
#[inline(always)]
pub fn follow_keyed<A: Fragments>(ctx: &TcContext) -> Outcome {
    let Some(scratch) = scratch::<A>() else {
        return Outcome::next(Stat::PassMalformed);
    };
    if load_addresses::<A, _>(ctx, &mut scratch.key).is_err() {
        return Outcome::next(Stat::PassMalformed);
    }
    let key = &scratch.key;
    let Some(record) = A::frags().get_ptr(key) else {
        return Outcome::next(Stat::PassFragmentUntracked);
    };
    // SAFETY: a map value pointer, valid for the program run.
    let record = unsafe { &*record };
    if ct::now() >= record.expires_ns {
        return Outcome::next(Stat::PassFragmentUntracked);
    }
    if record.flags & FRAG_ROUTED == 0 {
        if A::rewrite(ctx, key, record).is_err() {
            return Outcome::drop(Stat::DropRewrite);
        }
        return Outcome::next(Stat::FragTranslated);
    }
    let route = match redirect::lookup(
        ctx,
        key.proto,
        &record.src_addr,
        &record.dst_addr,
        scratch.tot_len,
    ) {
        Ok(route) if route.way != redirect::Way::TooBig => route,
        // A fragment is not fragmented again here.
        _ => return Outcome::drop(Stat::DropRedirect),
    };
    if A::rewrite(ctx, key, record).is_err() {
        return Outcome::drop(Stat::DropRewrite);
    }
    match redirect::send::<A>(ctx, key.proto, &route) {
        Ok(action) => Outcome {
            action,
            stat: Stat::FragTranslated,
        },
        Err(()) => Outcome::drop(Stat::DropRedirect),
    }
}
