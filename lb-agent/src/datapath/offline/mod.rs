//! Datapath stand-ins that never touch live traffic: `fake` is an in-memory
//! `LbMaps` (for `check` and the control-plane tests), `probe` runs a private
//! copy of the real program on one synthetic packet (for `explain`).

pub mod fake;
pub mod probe;
