fn main() {
    let mut ebpf = aya::Ebpf::load(lb_agent::datapath::EBPF_OBJECT).expect("load");
    let prog: &mut aya::programs::SchedClassifier = ebpf.program_mut("lb_ingress").unwrap().try_into().unwrap();
    prog.load().expect("prog load");
    println!("loaded");
}
