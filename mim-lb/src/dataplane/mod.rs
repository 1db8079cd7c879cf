//! The kernel side as seen from userspace: the embedded program, its maps, attachment.
//!
//! Nothing here knows about configuration files: callers hand in map values, and
//! `crate::director` decides what they are.

pub mod maps;
pub mod program;
pub mod service_index;

use std::{
    fmt,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{Xdp, XdpMode, xdp::XdpLinkId},
};
use mim_lb_common::{limits, maps::names};

/// What went wrong talking to the kernel. Each variant says which step failed.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("pin directory {dir}: {source}")]
    PinDir { dir: PathBuf, source: std::io::Error },
    #[error(
        "maps from an earlier run are still pinned under {dir} (found {map}); another mim-lb may \
         be running. Stop it, or remove the stale pins with `rm -r {dir}`"
    )]
    StalePins { dir: PathBuf, map: String },
    #[error("loading the BPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program { name: &'static str, source: aya::programs::ProgramError },
    #[error("program {0} is missing from the BPF object")]
    MissingProgram(&'static str),
    #[error("map {0} is missing from the BPF object")]
    MissingMap(&'static str),
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
    #[error("reading the number of possible CPUs: {0}")]
    Cpus(std::io::Error),
    #[error("attaching to interface {interface} in {mode} mode: {source}")]
    Attach { interface: String, mode: AttachMode, source: aya::programs::ProgramError },
}

/// How the XDP program is attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// In the driver (fast path), where the driver supports it.
    Native,
    /// In the kernel's generic receive path (works on every interface, slower).
    Generic,
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AttachMode::Native => "native",
            AttachMode::Generic => "generic",
        })
    }
}

/// Name of the data-path program in the BPF object.
pub const PROGRAM: &str = "mim_lb";
/// Name of the pass-everything program (for the peer of a veth running mim-lb natively).
pub const PASS_PROGRAM: &str = "mim_lb_pass";

/// Options for [`Dataplane::load`].
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Pin every map here (created if missing). `None`: maps live as long as the process.
    pub pin_dir: Option<PathBuf>,
    /// Capacity of the connection table.
    pub flow_table_size: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { pin_dir: None, flow_table_size: limits::DEFAULT_FLOW_TABLE_SIZE }
    }
}

/// The loaded program and its maps.
pub struct Dataplane {
    ebpf: Ebpf,
    pin_dir: Option<PathBuf>,
    attached: Option<(XdpLinkId, String, AttachMode)>,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

impl Dataplane {
    /// Loads the embedded program into the kernel (it passes the verifier here) with fresh
    /// maps, pinned under `pin_dir` when one is given. Nothing is attached yet.
    pub fn load(options: &LoadOptions) -> Result<Self, DataplaneError> {
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(names::FLOWS, options.flow_table_size);
        let pin_paths: Vec<(&'static str, PathBuf)> = match &options.pin_dir {
            Some(dir) => {
                prepare_pin_dir(dir)?;
                names::ALL.iter().map(|name| (*name, dir.join(name))).collect()
            }
            None => Vec::new(),
        };
        for (name, path) in &pin_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(program::MIM_LB_OBJECT)?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(logger),
            Err(err) => {
                log::warn!("XDP program log not available: {err}");
                None
            }
        };
        for name in [PROGRAM, PASS_PROGRAM] {
            xdp_mut(&mut ebpf, name)?
                .load()
                .map_err(|source| DataplaneError::Program { name, source })?;
        }
        Ok(Dataplane { ebpf, pin_dir: options.pin_dir.clone(), attached: None, logger })
    }

    /// The data-path program (for BPF_PROG_TEST_RUN).
    pub fn program(&self) -> &Xdp {
        self.ebpf
            .program(PROGRAM)
            .and_then(|p| <&Xdp>::try_from(p).ok())
            .expect("loaded in Dataplane::load")
    }

    /// The pass-everything program (for the peer of a veth running mim-lb natively).
    pub fn pass_program_mut(&mut self) -> &mut Xdp {
        xdp_mut(&mut self.ebpf, PASS_PROGRAM).expect("loaded in Dataplane::load")
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    pub fn pin_dir(&self) -> Option<&Path> {
        self.pin_dir.as_deref()
    }

    /// Takes the reader of the program's rare log events (connection table failures).
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        self.logger.take()
    }

    /// Attaches the data-path program to `interface`. `None` tries native mode and falls back
    /// to generic mode when the driver refuses. Returns the mode in use.
    pub fn attach(
        &mut self,
        interface: &str,
        mode: Option<AttachMode>,
    ) -> Result<AttachMode, DataplaneError> {
        let program = xdp_mut(&mut self.ebpf, PROGRAM)?;
        let try_attach = |program: &mut Xdp, mode: AttachMode| {
            let flags = match mode {
                AttachMode::Native => XdpMode::Driver,
                AttachMode::Generic => XdpMode::Skb,
            };
            program.attach(interface, flags).map_err(|source| DataplaneError::Attach {
                interface: interface.to_string(),
                mode,
                source,
            })
        };
        let (link, used) = match mode {
            Some(mode) => (try_attach(program, mode)?, mode),
            None => match try_attach(program, AttachMode::Native) {
                Ok(link) => (link, AttachMode::Native),
                Err(err) => {
                    log::warn!("{err}; falling back to generic mode");
                    (try_attach(program, AttachMode::Generic)?, AttachMode::Generic)
                }
            },
        };
        self.attached = Some((link, interface.to_string(), used));
        Ok(used)
    }

    /// Detaches the program if attached.
    pub fn detach(&mut self) -> Result<(), DataplaneError> {
        if let Some((link, _, _)) = self.attached.take() {
            xdp_mut(&mut self.ebpf, PROGRAM)?
                .detach(link)
                .map_err(|source| DataplaneError::Program { name: PROGRAM, source })?;
        }
        Ok(())
    }

    /// Removes the pinned maps (the maps themselves live on while this process holds them).
    pub fn unpin(&self) -> Result<(), DataplaneError> {
        let Some(dir) = &self.pin_dir else { return Ok(()) };
        for name in names::ALL {
            match std::fs::remove_file(dir.join(name)) {
                Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                    return Err(DataplaneError::PinDir { dir: dir.clone(), source: err });
                }
                _ => {}
            }
        }
        // Only our own files were in it; leave the directory if someone else put files there.
        let _ = std::fs::remove_dir(dir);
        Ok(())
    }

    /// Typed access to the maps.
    pub fn maps(&mut self) -> maps::Maps<'_> {
        maps::Maps::new(&mut self.ebpf)
    }
}

fn xdp_mut<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, DataplaneError> {
    let program = ebpf.program_mut(name).ok_or(DataplaneError::MissingProgram(name))?;
    program
        .try_into()
        .map_err(|source| DataplaneError::Program { name, source })
}

/// Creates the pin directory and refuses to start over maps someone else pinned there: loading
/// would silently share them.
fn prepare_pin_dir(dir: &Path) -> Result<(), DataplaneError> {
    std::fs::create_dir_all(dir)
        .map_err(|source| DataplaneError::PinDir { dir: dir.to_path_buf(), source })?;
    for name in names::ALL {
        if dir.join(name).exists() {
            return Err(DataplaneError::StalePins { dir: dir.to_path_buf(), map: name.to_string() });
        }
    }
    Ok(())
}
