// Only the `lb-ebpf` binary matters; this empty library lets `lb-agent` list the
// crate as a build-dependency so cargo rebuilds the agent when it changes.
#![no_std]
