//! The operator's read-only commands: `inspect` (the live maps, as text or
//! JSON), `explain` (what happens to a client's packet to a Service, from the
//! live maps and a test run of the real program) and `dump` (the text format
//! both `inspect` and the golden tests read).

pub mod dump;
pub mod explain;
pub mod inspect;
