//! Reading and writing a hash map many entries a syscall
//! (`BPF_MAP_LOOKUP_BATCH`, `BPF_MAP_UPDATE_BATCH`, kernel ≥ 5.6), which aya
//! does not offer. Its cursor is a bucket index, not a
//! key, so entries may be deleted between batches — the conntrack GC
//! deletes as it reads — without the walk starting over, as a
//! `get_next_key` walk does when its key is gone.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd},
};

use aya::Pod;

/// Entries a batch asks for; a bucket holding more is read with a larger
/// buffer (the kernel returns ENOSPC rather than split a bucket).
pub const BATCH: usize = 4096;

/// `union bpf_attr`'s `batch` member.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// A map's own file descriptor, for batch calls beside aya's typed map.
pub fn dup_fd(map: &aya::maps::Map) -> Result<OwnedFd, aya::maps::MapError> {
    use aya::maps::Map;
    let data = match map {
        Map::HashMap(data) | Map::LruHashMap(data) => data,
        _ => return Err(aya::maps::MapError::InvalidMapType { map_type: 0 }),
    };
    data.fd().as_fd().try_clone_to_owned().map_err(|io_error| {
        aya::sys::SyscallError {
            call: "dup",
            io_error,
        }
        .into()
    })
}

/// Writes `keys[i]` → `values[i]` in order in one syscall
/// (`BPF_MAP_UPDATE_BATCH`; the kernel updates them one by one, as single
/// writes would, so what a packet can see in between is the same). On
/// failure: how many were written, and the error.
pub fn update_batch<K: Pod, V: Pod>(
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> Result<(), (usize, io::Error)> {
    assert_eq!(keys.len(), values.len(), "one value a key");
    if keys.is_empty() {
        return Ok(());
    }
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: keys.len() as u32,
        map_fd: fd.as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    // SAFETY: the attribute points at `count` keys and values of the map's
    // sizes (the caller's contract), alive for the call; the kernel only
    // reads them.
    unsafe { bpf(BPF_MAP_UPDATE_BATCH, &mut attr) }.map_err(|e| (attr.count as usize, e))
}

/// `bpf(cmd, attr)`.
///
/// # Safety
/// `attr`'s pointers must be valid for what `cmd` reads and writes.
unsafe fn bpf(cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: the caller's contract.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<BatchAttr>(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One batch: keys and values, index for index.
pub type Batch<'a, K, V> = (&'a [K], &'a [V]);

/// A walk over a hash map, batch by batch.
pub struct Batches<'fd, K, V> {
    fd: BorrowedFd<'fd>,
    cursor: Option<u32>,
    done: bool,
    keys: Vec<K>,
    values: Vec<V>,
}

impl<'fd, K: Pod + Default, V: Pod + Default> Batches<'fd, K, V> {
    /// `fd`: a hash map whose keys are `K` and values `V` (not per-CPU).
    pub fn new(fd: BorrowedFd<'fd>) -> Self {
        Self {
            fd,
            cursor: None,
            done: false,
            keys: vec![K::default(); BATCH],
            values: vec![V::default(); BATCH],
        }
    }

    /// The next batch of entries; `None` once the map has been walked. A
    /// batch may be empty before the end.
    pub fn next_batch(&mut self) -> Result<Option<Batch<'_, K, V>>, aya::maps::MapError> {
        if self.done {
            return Ok(None);
        }
        loop {
            let mut out_batch: u32 = 0;
            let mut attr = BatchAttr {
                in_batch: self
                    .cursor
                    .as_ref()
                    .map_or(0, |c| std::ptr::from_ref(c) as u64),
                out_batch: std::ptr::from_mut(&mut out_batch) as u64,
                keys: self.keys.as_mut_ptr() as u64,
                values: self.values.as_mut_ptr() as u64,
                count: self.keys.len() as u32,
                map_fd: self.fd.as_raw_fd() as u32,
                ..BatchAttr::default()
            };
            // SAFETY: the attribute points at buffers of `count` keys and
            // values of the map's sizes (the caller's contract) and at two
            // u32 bucket cursors, all alive for the call.
            let error = unsafe { bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) }.err();
            match error.as_ref().and_then(io::Error::raw_os_error) {
                None => self.cursor = Some(out_batch),
                Some(libc::ENOENT) => self.done = true, // the last batch
                Some(libc::ENOSPC) if attr.count == 0 => {
                    // One bucket holds more than the buffer: grow it.
                    let len = self.keys.len() * 2;
                    self.keys.resize(len, K::default());
                    self.values.resize(len, V::default());
                    continue;
                }
                Some(_) => {
                    return Err(aya::sys::SyscallError {
                        call: "bpf_map_lookup_batch",
                        io_error: error.unwrap_or_else(io::Error::last_os_error),
                    }
                    .into())
                }
            }
            let n = attr.count as usize;
            return Ok(Some((&self.keys[..n], &self.values[..n])));
        }
    }
}
