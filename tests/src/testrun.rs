//! The real XDP program, loaded into the kernel with maps filled by the real control plane,
//! run on single frames with BPF_PROG_TEST_RUN.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context as _, Result, anyhow};
use aya::programs::{TestRun as _, TestRunOptions};
use mim_lb::{
    config::{Config, ServiceKey},
    daemon,
    dataplane::{Dataplane, LoadOptions},
    director::Director,
};
use mim_lb_common::{Counter, MAGLEV_BACKEND_MASK, hash, reason};

/// The source MAC the program writes into forwarded frames in these tests.
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0x47, 0x57, 0x00, 0x00, 0x01];

pub struct ProgramUnderTest {
    pub director: Director,
    /// Where the maps are pinned, for tests that need pins; removed on drop.
    pin_dir: Option<PathBuf>,
}

impl Drop for ProgramUnderTest {
    fn drop(&mut self) {
        if let Some(dir) = &self.pin_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// What one run of the program did to a frame.
#[derive(Debug)]
pub struct Outcome {
    pub verdict: u32,
    pub bytes: Vec<u8>,
}

impl ProgramUnderTest {
    /// Loads the program (no pins, nothing attached) and applies `config`.
    pub fn new(config: &str) -> Result<Self> {
        Self::with_flow_table(config, 65_536)
    }

    /// Like [`ProgramUnderTest::new`] with a connection table of `flow_table_size` entries.
    pub fn with_flow_table(config: &str, flow_table_size: u32) -> Result<Self> {
        let config = Config::parse(config).map_err(|e| anyhow!("test config: {e}"))?;
        let dataplane = Dataplane::load(&LoadOptions { flow_table_size, ..daemon::load_options(&config, None) })
            .context("loading the XDP program")?;
        let mut prog = ProgramUnderTest { director: Director::new(dataplane, GATEWAY_MAC), pin_dir: None };
        prog.apply_parsed(&config)?;
        Ok(prog)
    }

    /// Like [`ProgramUnderTest::new`], with the maps pinned under a unique directory of
    /// bpffs (`mim-lb-test-<pid>-...`, removed on drop or by `cargo xtask test` if killed).
    pub fn pinned(config: &str) -> Result<Self> {
        Self::pinned_with_flow_table(config, 65_536)
    }

    /// [`ProgramUnderTest::pinned`] with a connection table of `flow_table_size` entries (the
    /// daemon's default is `limits::DEFAULT_FLOW_TABLE_SIZE`).
    pub fn pinned_with_flow_table(config: &str, flow_table_size: u32) -> Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        let config = Config::parse(config).map_err(|e| anyhow!("test config: {e}"))?;
        let dir = PathBuf::from(format!(
            "/sys/fs/bpf/mim-lb-test-{:x}-p{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let loaded = Dataplane::load(&LoadOptions { flow_table_size, ..daemon::load_options(&config, Some(dir.clone())) });
        let dataplane = match loaded {
            Ok(d) => d,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e).context("loading the XDP program");
            }
        };
        let mut prog = ProgramUnderTest { director: Director::new(dataplane, GATEWAY_MAC), pin_dir: Some(dir) };
        prog.apply_parsed(&config)?;
        Ok(prog)
    }

    /// Restarts the control plane over the pinned maps, as a new daemon would: loads the
    /// program over the pins, takes their state over (`Director::recover`) with
    /// `gateway_mac` as the interface's MAC, and applies `config`.
    pub fn restart(&mut self, config: &str, gateway_mac: [u8; 6]) -> Result<()> {
        let dir = self.pin_dir.clone().context("only a pinned program can restart")?;
        let parsed = Config::parse(config).map_err(|e| anyhow!("test config: {e}"))?;
        let dataplane =
            Dataplane::load(&LoadOptions { flow_table_size: 65_536, ..daemon::load_options(&parsed, Some(dir)) })
                .context("loading the XDP program over the pins")?;
        anyhow::ensure!(dataplane.reused_pins(), "the restart did not find the pins");
        let (director, _) = Director::recover(dataplane, gateway_mac).context("taking over the pinned maps")?;
        self.director = director;
        self.apply(config)
    }

    /// The pin directory of a pinned program.
    pub fn pin_dir(&self) -> Option<&std::path::Path> {
        self.pin_dir.as_deref()
    }

    /// The kernel's id of the pinned map `name` (a pinned program only).
    pub fn map_id(&self, name: &str) -> Result<u32> {
        let dir = self.pin_dir.as_ref().context("only a pinned program has map pins")?;
        Ok(aya::maps::MapInfo::from_pin(dir.join(name))?.id())
    }

    /// Loads the program without applying any config.
    pub fn unconfigured() -> Result<Self> {
        let dataplane = Dataplane::load(&LoadOptions { flow_table_size: 65_536, ..LoadOptions::default() })
            .context("loading the XDP program")?;
        Ok(ProgramUnderTest { director: Director::new(dataplane, GATEWAY_MAC), pin_dir: None })
    }

    /// Applies `config` the way the daemon does, then reports every backend healthy (the
    /// verdict its health checks would give masters that answer), so that the tables hold
    /// every backend with a weight.
    pub fn apply(&mut self, config: &str) -> Result<()> {
        let config = Config::parse(config).map_err(|e| anyhow!("test config: {e}"))?;
        self.apply_parsed(&config)
    }

    pub fn apply_parsed(&mut self, config: &Config) -> Result<()> {
        self.director.apply_config(config).context("applying the test config")?;
        for (service, address, _, up) in self.director.health_targets() {
            if !up {
                self.director.set_health(&service, address, true, "test: healthy").context("marking healthy")?;
            }
        }
        Ok(())
    }

    /// Runs the sweep as if every recorded flow had been idle for longer than any timeout:
    /// with no flow recorded, it clears every slot's changed mark, so each flow goes to the
    /// master its slot names (the state of a daemon long after its last table change).
    pub fn settle(&mut self) {
        let idle = std::time::Duration::from_secs(60);
        let later = mim_lb::director::monotonic_ns() + 2 * idle.as_nanos() as u64;
        self.director.sweep(later, idle, idle).expect("sweep");
    }

    /// The backend id of the master at `addr` in the service `key`.
    pub fn backend_id(&self, key: &ServiceKey, addr: IpAddr) -> u32 {
        self.director.desired()[key].backends[&addr].id
    }

    /// The service id of `key`.
    pub fn service_id(&self, key: &ServiceKey) -> u32 {
        self.director.desired()[key].id
    }

    /// Runs the program once on `frame`.
    pub fn run(&self, frame: &[u8]) -> Result<Outcome> {
        let mut out = vec![0u8; frame.len() + 256];
        let result = self
            .director
            .dataplane()
            .program()
            .test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), repeat: 1, ..Default::default() })
            .context("BPF_PROG_TEST_RUN")?;
        out.truncate(result.data_size_out as usize);
        Ok(Outcome { verdict: result.return_value, bytes: out })
    }

    /// Per-reason counters (summed over CPUs), indexed by reason code.
    pub fn reasons(&mut self) -> Result<Vec<Counter>> {
        Ok(self.director.dataplane().maps_ro().reason_counters()?)
    }

    pub fn reason_packets(&mut self, code: u32) -> Result<u64> {
        Ok(self.reasons()?[code as usize].packets)
    }

    /// The MAC of the master at `addr` in the service `key`.
    pub fn master_mac(&self, key: &ServiceKey, addr: IpAddr) -> [u8; 6] {
        self.director.desired()[key].backends[&addr].mac().expect("test backends have MACs")
    }

    /// Which master the control plane's live table gives to a flow of `key`: computed from
    /// the shared hash and the table the director wrote, independent of the program.
    pub fn table_master(&self, key: &ServiceKey, src: IpAddr, sport: u16, dport: u16) -> Option<IpAddr> {
        let svc = &self.director.written()[key];
        let (s, family) = mim_lb::dataplane::service_index::addr_words(src);
        let (d, _) = mim_lb::dataplane::service_index::addr_words(key.vip);
        let h = if svc.flags & mim_lb_common::SERVICE_F_SOURCE_HASH != 0 {
            hash::source_hash(family, &s)
        } else {
            hash::flow_hash(family, &s, &d, sport.to_be(), dport.to_be(), key.protocol.number())
        };
        let id = svc.table()[hash::table_slot(h, svc.table_size) as usize] & MAGLEV_BACKEND_MASK;
        self.director.desired()[key].backends.iter().find(|(_, b)| b.id == id).map(|(a, _)| *a)
    }
}

/// The frame the program should send for `input` forwarded to `master_mac`: the input with
/// only its two MAC addresses rewritten.
pub fn forwarded(input: &[u8], master_mac: [u8; 6]) -> Vec<u8> {
    let mut out = input.to_vec();
    out[0..6].copy_from_slice(&master_mac);
    out[6..12].copy_from_slice(&GATEWAY_MAC);
    out
}

/// The name of a verdict, for messages.
pub fn verdict_name(v: u32) -> &'static str {
    match v {
        reason::XDP_DROP => "XDP_DROP",
        reason::XDP_PASS => "XDP_PASS",
        reason::XDP_TX => "XDP_TX",
        _ => "other",
    }
}
