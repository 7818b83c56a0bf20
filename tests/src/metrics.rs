//! Scraping an agent's `/metrics` and reading the Prometheus text format:
//! `# TYPE` lines and `name{labels} value` samples.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddrV4, TcpStream},
};

use anyhow::{bail, Context as _};

use crate::{netns::NetNs, servers::IO_TIMEOUT};

/// One scrape: samples by their full name (`name{label="v"}`), and types.
#[derive(Debug, Default)]
pub struct Scrape {
    pub samples: BTreeMap<String, f64>,
    pub types: BTreeMap<String, String>,
}

impl Scrape {
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut scrape = Scrape::default();
        for line in text.lines().filter(|l| !l.is_empty()) {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').context("TYPE line")?;
                scrape.types.insert(name.into(), kind.into());
            } else if !line.starts_with('#') {
                let (series, value) = line.rsplit_once(' ').context("sample line")?;
                let value: f64 = value
                    .parse()
                    .with_context(|| format!("value of {series}: {value}"))?;
                scrape.samples.insert(series.into(), value);
            }
        }
        Ok(scrape)
    }

    /// The sample's value; fails naming what the scrape has instead.
    pub fn get(&self, series: &str) -> f64 {
        match self.samples.get(series) {
            Some(v) => *v,
            None => panic!(
                "no sample {series}; have:\n{}",
                self.samples.keys().cloned().collect::<Vec<_>>().join("\n")
            ),
        }
    }
}

/// GET /metrics from inside `ns`.
pub fn scrape(ns: &NetNs, addr: SocketAddrV4) -> anyhow::Result<Scrape> {
    let response = ns.run(|| -> anyhow::Result<String> {
        let mut stream = TcpStream::connect_timeout(&addr.into(), IO_TIMEOUT)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    })?;
    let (head, body) = response.split_once("\r\n\r\n").context("no HTTP header")?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        bail!("GET /metrics: {head}");
    }
    if !head
        .to_ascii_lowercase()
        .contains("content-type: text/plain; version=0.0.4")
    {
        bail!("GET /metrics: not the Prometheus text format: {head}");
    }
    Scrape::parse(body)
}

/// Scrapes until `done` holds (for up to 10 s); the last scrape.
pub fn scrape_until(ns: &NetNs, addr: SocketAddrV4, done: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let scrape = scrape(ns, addr).unwrap();
        if done(&scrape) || std::time::Instant::now() > deadline {
            return scrape;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
