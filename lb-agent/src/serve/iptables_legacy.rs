//! kube-proxy's chains in legacy iptables (the x_tables kernel tables that
//! `iptables-legacy` writes, still the default on older nodes), read with
//! the sockopt ABI `iptables-save` uses: `IPT_SO_GET_INFO` for a table's
//! size, `IPT_SO_GET_ENTRIES` for its rules. A user chain is an entry whose
//! target is `ERROR`, with the chain's name as its data. Only tables the
//! kernel lists in `/proc/net/ip{,6}_tables_names` are asked for: asking
//! for another would load its module.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

/// One family's legacy tables: its names file, socket family and sockopt
/// level, and where an entry's `target_offset` and `next_offset` are
/// (after `struct ipt_ip` or `struct ip6t_ip6`).
struct Family {
    name: &'static str,
    tables_file: &'static str,
    domain: libc::c_int,
    level: libc::c_int,
    target_offset_at: usize,
}

const FAMILIES: [Family; 2] = [
    Family {
        name: "ip",
        tables_file: "/proc/net/ip_tables_names",
        domain: libc::AF_INET,
        level: libc::IPPROTO_IP,
        target_offset_at: 88,
    },
    Family {
        name: "ip6",
        tables_file: "/proc/net/ip6_tables_names",
        domain: libc::AF_INET6,
        level: libc::IPPROTO_IPV6,
        target_offset_at: 140,
    },
];

/// `IPT_SO_GET_INFO` and `IPT_SO_GET_ENTRIES` (the same numbers for ip6t).
const SO_GET_INFO: libc::c_int = 64;
const SO_GET_ENTRIES: libc::c_int = 65;
const TABLE_NAME_LEN: usize = 32;
/// `struct ipt_getinfo`: name, valid_hooks, hook_entry[5], underflow[5],
/// num_entries, size.
const GETINFO_LEN: usize = TABLE_NAME_LEN + 4 + 20 + 20 + 4 + 4;
const GETINFO_SIZE_AT: usize = GETINFO_LEN - 4;
/// `struct ipt_get_entries`: name, size, then the entries (8-aligned).
const GET_ENTRIES_HEADER: usize = 40;
/// `struct xt_entry_target`'s header: target_size, name[29], revision.
const TARGET_HEADER: usize = 32;
const TARGET_NAME_LEN: usize = 29;

/// The chains of legacy iptables that `is_chain` accepts, as
/// `FAMILY TABLE/CHAIN`. No x_tables in the kernel: none.
pub fn chains(is_chain: impl Fn(&str) -> bool) -> std::io::Result<Vec<String>> {
    let mut found = Vec::new();
    for family in &FAMILIES {
        let Ok(tables) = std::fs::read_to_string(family.tables_file) else {
            continue; // the family's x_tables are not loaded
        };
        for table in tables.lines().map(str::trim).filter(|t| !t.is_empty()) {
            for chain in user_chains(family, table)? {
                if is_chain(&chain) {
                    found.push(format!("{} {table}/{chain} (legacy)", family.name));
                }
            }
        }
    }
    Ok(found)
}

/// Every user chain of one table.
fn user_chains(family: &Family, table: &str) -> std::io::Result<Vec<String>> {
    // SAFETY: a plain socket call; the fd is owned at once.
    let fd = unsafe { libc::socket(family.domain, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh, valid descriptor nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut info = [0u8; GETINFO_LEN];
    let name = table.as_bytes();
    if name.len() >= TABLE_NAME_LEN {
        return Ok(Vec::new());
    }
    info[..name.len()].copy_from_slice(name);
    get(&socket, family.level, SO_GET_INFO, &mut info)?;
    let size = u32::from_ne_bytes(word(&info, GETINFO_SIZE_AT)) as usize;
    let mut entries = vec![0u8; GET_ENTRIES_HEADER + size];
    entries[..name.len()].copy_from_slice(name);
    entries[TABLE_NAME_LEN..TABLE_NAME_LEN + 4].copy_from_slice(&(size as u32).to_ne_bytes());
    get(&socket, family.level, SO_GET_ENTRIES, &mut entries)?;
    Ok(chain_names(
        &entries[GET_ENTRIES_HEADER..],
        family.target_offset_at,
    ))
}

/// The names of the `ERROR` targets in a table's entries: its user chains
/// (the table's last entry, `ERROR` with data `ERROR`, ends it).
fn chain_names(entries: &[u8], target_offset_at: usize) -> Vec<String> {
    let mut names = Vec::new();
    let mut at = 0;
    while at + target_offset_at + 4 <= entries.len() {
        let half = |i: usize| u16::from_ne_bytes([entries[i], entries[i + 1]]) as usize;
        let (target, next) = (half(at + target_offset_at), half(at + target_offset_at + 2));
        let target_at = at + target;
        let data_at = target_at + TARGET_HEADER;
        if next == 0 || data_at > entries.len() {
            break;
        }
        let text = |bytes: &[u8]| {
            let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
            String::from_utf8_lossy(&bytes[..end]).into_owned()
        };
        if text(&entries[target_at + 2..target_at + 2 + TARGET_NAME_LEN]) == "ERROR" {
            let data_end = (data_at + TABLE_NAME_LEN).min(entries.len());
            let chain = text(&entries[data_at..data_end]);
            if chain != "ERROR" {
                names.push(chain);
            }
        }
        at += next;
    }
    names
}

fn word(buf: &[u8], at: usize) -> [u8; 4] {
    [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]
}

fn get(
    socket: &OwnedFd,
    level: libc::c_int,
    option: libc::c_int,
    buf: &mut [u8],
) -> std::io::Result<()> {
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: a valid socket and a buffer of the stated length.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            level,
            option,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An entry with no matches and the given target name and data, as
    /// the kernel lays out an IPv4 one.
    fn entry(target: &str, data: &str) -> Vec<u8> {
        let (target_at, target_len) = (112, TARGET_HEADER + TABLE_NAME_LEN);
        let mut e = vec![0u8; target_at + target_len];
        e[88..90].copy_from_slice(&(target_at as u16).to_ne_bytes());
        e[90..92].copy_from_slice(&((target_at + target_len) as u16).to_ne_bytes());
        e[target_at..target_at + 2].copy_from_slice(&(target_len as u16).to_ne_bytes());
        e[target_at + 2..target_at + 2 + target.len()].copy_from_slice(target.as_bytes());
        let data_at = target_at + TARGET_HEADER;
        e[data_at..data_at + data.len()].copy_from_slice(data.as_bytes());
        e
    }

    #[test]
    fn user_chains_are_the_error_targets_but_the_last() {
        let table = [
            entry("", ""),
            entry("ERROR", "KUBE-SERVICES"),
            entry("DNAT", ""),
            entry("ERROR", "KUBE-SVC-ERIFXISQEP7F7OF4"),
            entry("ERROR", "ERROR"),
        ]
        .concat();
        assert_eq!(
            chain_names(&table, 88),
            ["KUBE-SERVICES", "KUBE-SVC-ERIFXISQEP7F7OF4"]
        );
        assert!(
            chain_names(&table[..50], 88).is_empty(),
            "truncated: nothing read past it"
        );
    }
}
