//! BPF_PROG_TEST_RUN harness: a freshly loaded datapath with private maps,
//! programmed through the agent's own manifest → desired → reconcile path.

use aya::{
    maps::{HashMap, MapData, PerCpuArray},
    programs::SchedClassifier,
    Ebpf, TestRun, TestRunOptions,
};
use lb_agent::{
    datapath::{
        conntrack::{Conntrack, Snapshot},
        loader::{self, MapSizes},
        maps::KernelMaps,
        EGRESS_PROGRAM, INGRESS_EXTERNAL_PROGRAM, INGRESS_PROGRAM,
    },
    desired::{self, LbAlgorithm, Limits, NodeContext},
    reconcile::{Reconciler, Report},
    source::manifest,
};
use lb_common::{
    config::{NodeConfig, CONFIG6_MAP, CONFIG_MAP},
    ct::{CtKey, CtValue, CT6_MAP, CT6_NEW_MAP, CT_ASSURED, CT_MAP, CT_NEW_MAP},
    stats::{Stat, STATS_MAP},
    Ipv6,
};

pub struct Harness {
    pub ebpf: Ebpf,
    pub reconciler: Reconciler<KernelMaps>,
    /// The node the manifests are computed for (node ports, local endpoints).
    pub node: NodeContext,
    /// `--lb-algorithm` for the manifests applied.
    pub lb_algorithm: LbAlgorithm,
}

/// Result of one program run.
pub struct RunResult {
    pub verdict: u32,
    pub frame: Vec<u8>,
}

impl Harness {
    pub fn new() -> Self {
        Self::with_conntrack(4096)
    }

    /// A datapath whose assured conntrack table holds `entries` (two per flow).
    pub fn with_conntrack(entries: u32) -> Self {
        Self::with_conntrack_tables(entries, 4096)
    }

    /// A datapath with `assured` entries for assured flows and `new` for
    /// flows not yet assured (two per flow).
    pub fn with_conntrack_tables(assured: u32, new: u32) -> Self {
        Self::load(assured, new, &loader::Globals::DEFAULT)
    }

    /// A datapath that rate-limits the ICMP errors it sends to `limit`.
    pub fn with_icmp_limit(limit: lb_common::icmp::IcmpLimit) -> Self {
        let globals = loader::Globals {
            icmp_limit: limit,
            ..loader::Globals::DEFAULT
        };
        Self::load(4096, 4096, &globals)
    }

    /// A datapath loaded with `globals` (load-time settings).
    pub fn with_globals(globals: &loader::Globals) -> Self {
        Self::load(4096, 4096, globals)
    }

    fn load(assured: u32, new: u32, globals: &loader::Globals) -> Self {
        let sizes = MapSizes {
            service_slots: 4096,
            backends: 1024,
            conntrack: assured,
            conntrack_new: new,
            affinity: 1024,
            source_ranges: 1024,
            maglev_chunks: 1024,
            socket_entries: 1024,
        };
        let mut ebpf = loader::load(None, sizes, globals).expect("load datapath");
        let maps = loader::kernel_maps(&mut ebpf, sizes).expect("service maps");
        let reconciler = Reconciler::restore(maps, sizes.backends).expect("restore");
        Self {
            ebpf,
            reconciler,
            node: NodeContext::default(),
            lb_algorithm: LbAlgorithm::Random,
        }
    }

    /// Programs the maps from manifest YAML, exactly as the agent would.
    pub fn apply_yaml(&mut self, yaml: &str) -> Report {
        let (objects, errors) = manifest::parse_str(yaml, None).expect("valid YAML");
        assert!(errors.is_empty(), "manifest errors: {errors:?}");
        let (desired, errors) = desired::compute(
            &objects,
            Limits {
                max_backends_per_service: 64,
                lb_algorithm: self.lb_algorithm,
                ..Limits::DEFAULT
            },
            self.node.clone(),
        );
        assert!(errors.is_empty(), "manifest errors: {errors:?}");
        let report = self.reconciler.apply(&desired);
        assert!(
            report.errors.is_empty(),
            "apply errors: {:?}",
            report.errors
        );
        report
    }

    fn program(&self, name: &str) -> &SchedClassifier {
        self.ebpf
            .program(name)
            .expect("program")
            .try_into()
            .expect("classifier")
    }

    /// The packet through the ingress program (DNAT).
    pub fn run(&self, frame: &[u8]) -> RunResult {
        self.run_timed(frame).0
    }

    /// The packet through the ingress program of external interfaces.
    pub fn run_external(&self, frame: &[u8]) -> RunResult {
        self.run_program(INGRESS_EXTERNAL_PROGRAM, frame).0
    }

    /// Writes the node settings (SNAT address and ports), as the agent does.
    pub fn set_node_config(&mut self, config: NodeConfig) {
        self.write_config(CONFIG_MAP, config);
    }

    pub fn set_node_config6(&mut self, config: NodeConfig<Ipv6>) {
        self.write_config(CONFIG6_MAP, config);
    }

    fn write_config<V: aya::Pod>(&mut self, name: &str, config: V) {
        let mut map: aya::maps::Array<&mut MapData, V> = self
            .ebpf
            .map_mut(name)
            .expect("config map")
            .try_into()
            .expect("array");
        map.set(0, config, 0).expect("write config");
    }

    /// The packet through the egress program (reverse NAT of replies).
    pub fn run_egress(&self, frame: &[u8]) -> RunResult {
        self.run_program(EGRESS_PROGRAM, frame).0
    }

    /// One ingress run, with the kernel's timing of it. (No `repeat`: later
    /// runs would see the packet the first one rewrote.)
    pub fn run_timed(&self, frame: &[u8]) -> (RunResult, std::time::Duration) {
        self.run_program(INGRESS_PROGRAM, frame)
    }

    pub fn run_program(&self, name: &str, frame: &[u8]) -> (RunResult, std::time::Duration) {
        self.try_run_program(name, frame)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of {name} on {frame:02x?}: {e}"))
    }

    pub fn try_run_program(
        &self,
        name: &str,
        frame: &[u8],
    ) -> Result<(RunResult, std::time::Duration), aya::programs::ProgramError> {
        self.try_run_with(name, frame, None)
    }

    /// The packet through the external ingress program as a GSO
    /// super-packet of `segments` segments of `size` bytes, as a NIC's
    /// driver hands it over (virtio-net and xen-netfront leave `segments` 0).
    pub fn run_external_gso(&self, frame: &[u8], size: u32, segments: u32) -> RunResult {
        let ctx = sk_buff_gso(size, segments);
        self.try_run_with(INGRESS_EXTERNAL_PROGRAM, frame, Some(&ctx))
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN with GSO {size}×{segments}: {e}"))
            .0
    }

    fn try_run_with(
        &self,
        name: &str,
        frame: &[u8],
        ctx: Option<&[u8]>,
    ) -> Result<(RunResult, std::time::Duration), aya::programs::ProgramError> {
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: ctx,
            ..TestRunOptions::default()
        };
        let result = self.program(name).test_run(opts)?;
        out.truncate(result.data_size_out as usize);
        Ok((
            RunResult {
                verdict: result.return_value,
                frame: out,
            },
            result.duration,
        ))
    }

    pub fn counter(&self, stat: Stat) -> u64 {
        let map: PerCpuArray<&MapData, u64> = self
            .ebpf
            .map(STATS_MAP)
            .expect("stats map")
            .try_into()
            .expect("per-cpu array");
        map.get(&(stat as u32), 0)
            .expect("read counter")
            .iter()
            .sum()
    }

    fn ct_table(&mut self, name: &'static str) -> HashMap<&mut MapData, CtKey, CtValue> {
        self.ebpf
            .map_mut(name)
            .expect("ct map")
            .try_into()
            .expect("hash")
    }

    /// The entries of one conntrack table: `CT_MAP` (assured) or `CT_NEW_MAP`.
    pub fn conntrack_table(&self, name: &'static str) -> Vec<(CtKey, CtValue)> {
        let map: HashMap<&MapData, CtKey, CtValue> = self
            .ebpf
            .map(name)
            .expect("ct map")
            .try_into()
            .expect("hash");
        map.iter().map(|e| e.expect("read ct")).collect()
    }

    /// Both conntrack tables as the datapath reads them: an assured entry
    /// (flagged `CT_ASSURED`) wins a key both hold.
    pub fn conntrack(&self) -> Vec<(CtKey, CtValue)> {
        let table = |name| -> HashMap<&MapData, CtKey, CtValue> {
            self.ebpf
                .map(name)
                .expect("ct map")
                .try_into()
                .expect("hash")
        };
        let (new, assured) = (table(CT_NEW_MAP), table(CT_MAP));
        let snapshot = Snapshot::of(Box::new(new.iter()), Box::new(assured.iter()));
        snapshot.expect("read ct").entries.into_iter().collect()
    }

    /// Both IPv6 conntrack tables, as `conntrack`.
    pub fn conntrack6(&self) -> Vec<(CtKey<Ipv6>, CtValue<Ipv6>)> {
        let table = |name| -> HashMap<&MapData, CtKey<Ipv6>, CtValue<Ipv6>> {
            self.ebpf
                .map(name)
                .expect("ct map")
                .try_into()
                .expect("hash")
        };
        let (new, assured) = (table(CT6_NEW_MAP), table(CT6_MAP));
        let snapshot = Snapshot::of(Box::new(new.iter()), Box::new(assured.iter()));
        snapshot.expect("read ct").entries.into_iter().collect()
    }

    /// Rewrites one conntrack entry, in the table its `CT_ASSURED` flag
    /// names (to age it), or removes it from both (to lose it: `None`).
    pub fn set_conntrack(&mut self, key: &CtKey, value: Option<CtValue>) {
        match value {
            Some(v) => {
                let table = if v.flags & CT_ASSURED != 0 {
                    CT_MAP
                } else {
                    CT_NEW_MAP
                };
                self.ct_table(table).insert(key, v, 0).expect("write ct")
            }
            None => {
                let removed = [CT_MAP, CT_NEW_MAP]
                    .into_iter()
                    .filter(|table| self.ct_table(table).remove(key).is_ok())
                    .count();
                assert!(removed > 0, "no conntrack entry {key:?} to delete");
            }
        }
    }

    /// Sets an entry's expiry, to age it as time would.
    pub fn expire_at(&mut self, entry: &(CtKey, CtValue), expires_ns: u64) {
        let (key, value) = entry;
        self.set_conntrack(
            key,
            Some(CtValue {
                expires_ns,
                ..*value
            }),
        );
    }

    /// Makes the affinity entry at `key` in `map` (`AFFINITY_MAP`,
    /// `AFFINITY6_MAP`) `by_ns` older, as time would; returns it as it was.
    pub fn age_affinity<K: aya::Pod>(
        &mut self,
        map: &str,
        key: K,
        by_ns: u64,
    ) -> lb_common::affinity::AffinityValue {
        use lb_common::affinity::AffinityValue;
        let mut map: HashMap<&mut MapData, K, AffinityValue> = self
            .ebpf
            .map_mut(map)
            .expect("affinity map")
            .try_into()
            .unwrap();
        let remembered = map.get(&key, 0).expect("an affinity entry");
        let aged = AffinityValue {
            last_used_ns: remembered.last_used_ns - by_ns,
            ..remembered
        };
        map.insert(key, aged, 0).unwrap();
        remembered
    }

    /// The agent's conntrack upkeep on this datapath's table.
    pub fn agent_conntrack(&mut self) -> Conntrack {
        let assured = self.ebpf.take_map(CT_MAP).expect("ct map");
        let new = self.ebpf.take_map(CT_NEW_MAP).expect("ct map");
        Conntrack::new(assured, new).expect("ct tables")
    }
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}

/// A `struct __sk_buff` (uapi layout: 192 bytes, `gso_segs` at 164,
/// `gso_size` at 176) with only the GSO fields set; the kernel refuses a
/// test-run context with any field it does not take.
fn sk_buff_gso(size: u32, segments: u32) -> Vec<u8> {
    let mut ctx = vec![0u8; 192];
    ctx[164..168].copy_from_slice(&segments.to_ne_bytes());
    ctx[176..180].copy_from_slice(&size.to_ne_bytes());
    ctx
}
