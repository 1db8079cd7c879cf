//! The kernel side as seen from userspace: the embedded program, its pinned maps, and its
//! attachment to the gateway interface.
//!
//! Nothing here knows about configuration files: callers hand in map values, and
//! `crate::director` decides what they are.
//!
//! Pins are what let mim-lb restart without losing flows: the maps (connection table
//! included) and the XDP attachment itself (a bpf_link) are pinned under the pin directory. A
//! new daemon reuses the maps and swaps its program into the pinned link in one atomic
//! `BPF_LINK_UPDATE`, so no packet for a VIP ever reaches the kernel in between.

pub mod batch;
pub mod maps;
pub mod program;
pub mod service_index;

use std::{
    fmt,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapInfo, MapType},
    programs::{
        Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
    },
};
use mim_lb_common::{
    ABI_VERSION, ATTACH_GENERIC, ATTACH_NATIVE, BackendEntry, Counter, FlowEntry, FlowKey,
    GLOBALS_F_READY, Globals, ServiceEntry, TrafficStats, limits, maps::names,
};

/// What went wrong talking to the kernel. Each variant says which step failed.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("pin directory {dir}: {source}")]
    PinDir { dir: PathBuf, source: std::io::Error },
    #[error(
        "maps pinned under {dir} do not fit this version or configuration of mim-lb: {detail}. \
         The program that uses them is still forwarding. To start afresh (recorded flows are \
         lost): `mim-lb detach --config FILE`, then start again"
    )]
    IncompatiblePins { dir: PathBuf, detail: String },
    #[error(
        "{0} is not on a bpf filesystem, so maps cannot be pinned there. Mount one (mount -t bpf bpf \
         /sys/fs/bpf) or choose a pin_dir on one; note that `ip netns exec` remounts /sys without it"
    )]
    NotBpffs(PathBuf),
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
    #[error("map {name}: {source}")]
    Batch { name: &'static str, source: batch::BatchError },
    #[error("reading the number of possible CPUs: {0}")]
    Cpus(std::io::Error),
    #[error("interface {0} not found")]
    NoInterface(String),
    #[error("attaching to interface {interface} in {mode} mode: {source}")]
    Attach { interface: String, mode: AttachMode, source: aya::programs::ProgramError },
    #[error("simulation: {0}")]
    Simulation(String),
    #[error("pinned XDP link {path}: {detail}")]
    Link { path: PathBuf, detail: String },
    #[error("room for {} services (at least {}) is not within 1..={}", .0.wanted, .0.least, limits::MAX_SERVICES)]
    Room(ServiceRoom),
}

/// How the XDP program is attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// In the driver (fast path), where the driver supports it.
    Native,
    /// In the kernel's generic receive path (works on every interface, slower).
    Generic,
}

impl AttachMode {
    fn code(self) -> u32 {
        match self {
            AttachMode::Native => ATTACH_NATIVE,
            AttachMode::Generic => ATTACH_GENERIC,
        }
    }

    fn from_code(code: u32) -> Option<AttachMode> {
        match code {
            ATTACH_NATIVE => Some(AttachMode::Native),
            ATTACH_GENERIC => Some(AttachMode::Generic),
            _ => None,
        }
    }
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
/// File name of the pinned XDP attachment under the pin directory.
pub const LINK_PIN: &str = "XDP_LINK";

/// Options for [`Dataplane::load`].
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Pin every map here (created if missing), reusing maps an earlier run pinned there.
    /// `None`: maps live as long as the process.
    pub pin_dir: Option<PathBuf>,
    /// Capacity of the connection table.
    pub flow_table_size: u32,
    /// How many services the Maglev maps hold room for.
    pub service_room: ServiceRoom,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            pin_dir: None,
            flow_table_size: limits::DEFAULT_FLOW_TABLE_SIZE,
            service_room: ServiceRoom::exactly(limits::MAX_SERVICES),
        }
    }
}

/// Room for services in the maps indexed by service id (`MAGLEV`, `SLOT_SEEN`,
/// `MAGLEV_OLD`), which hold two full Maglev regions (plus two per-slot tables) per service
/// whatever the table sizes: 2 MiB of kernel memory per service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceRoom {
    /// What new maps are created with.
    pub wanted: u32,
    /// The least pinned maps must hold to be reused: a pinned set with room for fewer is
    /// refused (it cannot grow without losing the flows it holds).
    pub least: u32,
}

impl ServiceRoom {
    pub fn exactly(services: u32) -> Self {
        ServiceRoom { wanted: services, least: services }
    }
}

/// How the program came to be attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// A new attachment.
    Fresh(AttachMode),
    /// The program replaced an earlier run's in its pinned link, atomically.
    Replaced(AttachMode),
}

impl Attached {
    pub fn mode(self) -> AttachMode {
        match self {
            Attached::Fresh(m) | Attached::Replaced(m) => m,
        }
    }
}

enum Attachment {
    /// The link pinned at this path. The pin is what keeps it attached: the fds this process
    /// may hold to it (the program owns one after a replacement) only close when it exits.
    Pinned(PathBuf),
    /// No pin directory: the program owns the link, which goes with this process.
    Unpinned(XdpLinkId),
}

/// The loaded program and its maps.
pub struct Dataplane {
    ebpf: Ebpf,
    pin_dir: Option<PathBuf>,
    reused_pins: bool,
    /// Services the maps hold room for (service ids are below it).
    service_room: u32,
    attachment: Option<Attachment>,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

impl Dataplane {
    /// Loads the embedded program into the kernel (it passes the verifier here). With a pin
    /// directory, maps an earlier run pinned there are reused (after checking they fit this
    /// build) and new ones are pinned; [`Dataplane::reused_pins`] tells which happened.
    /// Reused maps keep the room for services they were made with
    /// ([`Dataplane::service_room`]). Nothing is attached yet.
    pub fn load(options: &LoadOptions) -> Result<Self, DataplaneError> {
        let room = options.service_room;
        if room.least > room.wanted || !(1..=limits::MAX_SERVICES).contains(&room.wanted) {
            return Err(DataplaneError::Room(room));
        }
        let mut reused_room = None;
        let pin_paths: Vec<(&'static str, PathBuf)> = match &options.pin_dir {
            Some(dir) => {
                reused_room = check_pins(dir, options.flow_table_size, room)?;
                names::ALL.iter().map(|name| (*name, dir.join(name))).collect()
            }
            None => Vec::new(),
        };
        let service_room = reused_room.unwrap_or(room.wanted);
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(names::FLOWS, options.flow_table_size);
        // Also over pins: the kernel keeps the pinned map's size, and aya bounds its
        // userspace accesses by the size given here.
        loader.map_max_entries(names::MAGLEV, limits::maglev_map_entries(service_room));
        loader.map_max_entries(names::SLOT_SEEN, limits::slot_map_entries(service_room));
        loader.map_max_entries(names::MAGLEV_OLD, limits::slot_map_entries(service_room));
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
        let dataplane = Dataplane {
            ebpf,
            pin_dir: options.pin_dir.clone(),
            reused_pins: reused_room.is_some(),
            service_room,
            attachment: None,
            logger,
        };
        Ok(dataplane)
    }

    /// Whether the maps were pinned by an earlier run (their contents are live state).
    pub fn reused_pins(&self) -> bool {
        self.reused_pins
    }

    /// How many services the maps hold room for: service ids are below it. Fixed for the
    /// life of the maps (pinned ones keep the room they were created with).
    pub fn service_room(&self) -> u32 {
        self.service_room
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

    pub fn pin_dir(&self) -> Option<&Path> {
        self.pin_dir.as_deref()
    }

    /// Takes the reader of the program's rare log events (connection table failures).
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        self.logger.take()
    }

    /// Attaches the data-path program to `interface`. `mode` `None` tries native mode and
    /// falls back to generic mode when the driver refuses.
    ///
    /// With a pin directory, an attachment pinned by an earlier run on the same interface (and
    /// in the requested mode, if one is given) is taken over: the new program replaces the old
    /// one atomically. Otherwise the old attachment is removed first and a new one is made and
    /// pinned.
    pub fn attach(
        &mut self,
        interface: &str,
        mode: Option<AttachMode>,
    ) -> Result<Attached, DataplaneError> {
        let ifindex = if_index(interface)?;
        let link_path = self.pin_dir.as_ref().map(|d| d.join(LINK_PIN));
        if let Some(path) = link_path.as_ref().filter(|p| p.exists()) {
            let globals = self.maps().globals()?;
            let pinned_mode = AttachMode::from_code(globals.attach_mode);
            match pinned_mode {
                Some(m) if globals.ifindex == ifindex && mode.is_none_or(|want| want == m) => {
                    self.replace_in_link(path)?;
                    self.attachment = Some(Attachment::Pinned(path.clone()));
                    return Ok(Attached::Replaced(m));
                }
                _ => {
                    log::warn!(
                        "the pinned attachment is on interface index {} in {} mode, not on {interface} \
                         (index {ifindex}) in {} mode: detaching it and attaching anew",
                        globals.ifindex,
                        pinned_mode.map_or("unknown".to_owned(), |m| m.to_string()),
                        mode.map_or("auto".to_owned(), |m| m.to_string()),
                    );
                    // Not only the pin: the kernel may free an unpinned link later, and until
                    // then a new attachment in the other mode is refused (EEXIST).
                    detach_pinned_link(path)?;
                }
            }
        }

        let program = xdp_mut(&mut self.ebpf, PROGRAM)?;
        let (id, used) = match mode {
            Some(mode) => (attach_in(program, interface, mode)?, mode),
            None => match attach_in(program, interface, AttachMode::Native) {
                Ok(id) => (id, AttachMode::Native),
                Err(err) => {
                    log::warn!("{}; falling back to generic mode", with_causes(&err));
                    (attach_in(program, interface, AttachMode::Generic)?, AttachMode::Generic)
                }
            },
        };
        self.attachment = Some(match link_path {
            Some(path) => self.pin_link(id, &path)?,
            None => Attachment::Unpinned(id),
        });
        let mut globals = self.maps().globals()?;
        globals.ifindex = ifindex;
        globals.attach_mode = used.code();
        self.maps().set_globals(&globals)?;
        Ok(Attached::Fresh(used))
    }

    fn replace_in_link(&mut self, path: &Path) -> Result<(), DataplaneError> {
        let link_err = |detail: String| DataplaneError::Link { path: path.to_path_buf(), detail };
        let pinned = PinnedLink::from_pin(path).map_err(|e| link_err(e.to_string()))?;
        let link = XdpLink::try_from(FdLink::from(pinned))
            .map_err(|e| link_err(format!("not an XDP link: {e}")))?;
        // The program keeps the link's fd (its link id is not needed: detaching goes by pin).
        xdp_mut(&mut self.ebpf, PROGRAM)?
            .attach_to_link(link)
            .map(drop)
            .map_err(|e| link_err(format!("replacing its program: {e}")))
    }

    fn pin_link(&mut self, id: XdpLinkId, path: &Path) -> Result<Attachment, DataplaneError> {
        let program = xdp_mut(&mut self.ebpf, PROGRAM)?;
        let link = program.take_link(id).map_err(|source| DataplaneError::Program { name: PROGRAM, source })?;
        // Only kernels without bpf_link for XDP (before 5.9) give a netlink attachment; it is
        // dropped (detached) with the error, since without a pin restarts would lose flows.
        let fd_link = FdLink::try_from(link).map_err(|_| DataplaneError::Link {
            path: path.to_path_buf(),
            detail: "the kernel gave a netlink attachment, which cannot be pinned".into(),
        })?;
        // Dropping the returned PinnedLink closes our fd; the pin holds the link.
        fd_link
            .pin(path)
            .map_err(|e| DataplaneError::Link { path: path.to_path_buf(), detail: format!("pinning: {e}") })?;
        Ok(Attachment::Pinned(path.to_path_buf()))
    }

    /// Detaches the program and removes the pinned link.
    pub fn detach(&mut self) -> Result<(), DataplaneError> {
        match self.attachment.take() {
            None => Ok(()),
            Some(Attachment::Pinned(path)) => detach_pinned_link(&path),
            Some(Attachment::Unpinned(id)) => xdp_mut(&mut self.ebpf, PROGRAM)?
                .detach(id)
                .map_err(|source| DataplaneError::Program { name: PROGRAM, source }),
        }
    }

    /// Leaves the attachment pinned, so the program keeps forwarding with the pinned maps
    /// after this process exits (`--keep-pinned`, or a restart by systemd).
    pub fn keep_attached(&mut self) {
        // Nothing to undo: the pin holds the link, and the fds this process holds to it only
        // close when it exits.
        self.attachment = None;
    }

    /// Removes the pinned maps (the maps themselves live on while this process holds them).
    pub fn unpin(&self) -> Result<(), DataplaneError> {
        let Some(dir) = &self.pin_dir else { return Ok(()) };
        for name in names::ALL.iter().copied().chain([LINK_PIN]) {
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

    /// Loads the simulation copy of the program over this dataplane's pinned maps (see
    /// [`Simulator`]).
    pub fn simulator(&self) -> Result<Simulator, DataplaneError> {
        let Some(dir) = &self.pin_dir else {
            return Err(DataplaneError::Simulation("it needs the maps pinned".into()));
        };
        let mut loader = EbpfLoader::new();
        let paths: Vec<(&'static str, PathBuf)> = names::ALL.iter().map(|n| (*n, dir.join(n))).collect();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        loader.override_global("SIMULATE", &1u8, true);
        let mut ebpf = loader.load(program::MIM_LB_OBJECT)?;
        xdp_mut(&mut ebpf, PROGRAM)?
            .load()
            .map_err(|source| DataplaneError::Program { name: PROGRAM, source })?;
        Ok(Simulator { ebpf })
    }

    /// Typed access to the maps.
    pub fn maps(&mut self) -> maps::Maps<'_> {
        maps::Maps::new(&mut self.ebpf)
    }

    /// Read-only typed access to the maps.
    pub fn maps_ro(&self) -> maps::MapsRo<'_> {
        maps::MapsRo::new(&self.ebpf)
    }
}

/// The data-path program loaded a second time over the live maps, with `SIMULATE` set: it
/// takes every decision the live program would (same code, same maps) but records no flow,
/// counts nothing, and returns its reason code instead of a verdict.
pub struct Simulator {
    ebpf: Ebpf,
}

impl Simulator {
    /// Runs the program on `frame`: the reason code and the frame it would send.
    pub fn run(&self, frame: &[u8]) -> Result<(u32, Vec<u8>), DataplaneError> {
        use aya::programs::{TestRun as _, TestRunOptions};
        let program: &Xdp = self
            .ebpf
            .program(PROGRAM)
            .ok_or(DataplaneError::MissingProgram(PROGRAM))?
            .try_into()
            .map_err(|source| DataplaneError::Program { name: PROGRAM, source })?;
        let mut out = vec![0u8; frame.len() + 64];
        let result = program
            .test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), repeat: 1, ..Default::default() })
            .map_err(|source| DataplaneError::Program { name: PROGRAM, source })?;
        out.truncate(result.data_size_out as usize);
        let code = result.return_value.checked_sub(mim_lb_common::reason::SIMULATED).ok_or_else(|| {
            DataplaneError::Simulation(format!("the program returned {}, not a reason code", result.return_value))
        })?;
        Ok((code, out))
    }
}

/// `err` and its causes, `: `-separated, each once: aya's message for a refused attach only
/// names the syscall; the errno under it (e.g. `Numerical result out of range` from a veth
/// whose peer's MTU is too large) is what says why the driver refused.
fn with_causes(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut next = err.source();
    while let Some(cause) = next {
        let message = cause.to_string();
        if !text.ends_with(&message) {
            text = format!("{text}: {message}");
        }
        next = cause.source();
    }
    text
}

/// Detaches the link pinned at `path` now, then removes the pin.
///
/// Removing a pin (or closing the last fd) only drops a reference, and the kernel may free
/// the link later from a work queue: the program can stay attached for a moment after. An
/// explicit `BPF_LINK_DETACH` takes it off the interface before this returns, whoever else
/// still holds the link. A pin that is already gone is not an error.
pub fn detach_pinned_link(path: &Path) -> Result<(), DataplaneError> {
    use std::os::{fd::AsRawFd as _, unix::ffi::OsStrExt as _};
    let link_err = |detail: String| DataplaneError::Link { path: path.to_path_buf(), detail };
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|e| link_err(e.to_string()))?;

    // The leading members of `union bpf_attr` for the two commands; the kernel zero-fills the
    // rest when given a shorter size.
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    #[repr(C)]
    struct LinkDetach {
        link_fd: u32,
    }
    fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> libc::c_long {
        // SAFETY: `attr` is a valid, initialised prefix of union bpf_attr for `cmd`, alive
        // for the call; the kernel reads at most size_of::<T>() bytes of it.
        unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) }
    }

    let fd = bpf(BPF_OBJ_GET, &mut ObjGet { pathname: c_path.as_ptr() as u64, bpf_fd: 0, file_flags: 0 });
    if fd < 0 {
        let err = std::io::Error::last_os_error();
        if err.kind() == std::io::ErrorKind::NotFound {
            return Ok(());
        }
        return Err(link_err(format!("opening it: {err}")));
    }
    // SAFETY: the syscall returned a new fd that nothing else owns.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    if bpf(BPF_LINK_DETACH, &mut LinkDetach { link_fd: fd.as_raw_fd() as u32 }) < 0 {
        return Err(link_err(format!("BPF_LINK_DETACH: {}", std::io::Error::last_os_error())));
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(link_err(format!("removing the pin: {e}"))),
        _ => Ok(()),
    }
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_DETACH: libc::c_long = 34;

fn attach_in(program: &mut Xdp, interface: &str, mode: AttachMode) -> Result<XdpLinkId, DataplaneError> {
    let flags = match mode {
        AttachMode::Native => XdpMode::Driver,
        AttachMode::Generic => XdpMode::Skb,
    };
    program
        .attach(interface, flags)
        .map_err(|source| DataplaneError::Attach { interface: interface.to_string(), mode, source })
}

fn if_index(interface: &str) -> Result<u32, DataplaneError> {
    let name = std::ffi::CString::new(interface)
        .map_err(|_| DataplaneError::NoInterface(interface.to_string()))?;
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(DataplaneError::NoInterface(interface.to_string()));
    }
    Ok(index)
}

fn xdp_mut<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, DataplaneError> {
    let program = ebpf.program_mut(name).ok_or(DataplaneError::MissingProgram(name))?;
    program
        .try_into()
        .map_err(|source| DataplaneError::Program { name, source })
}

/// Whether `dir` is on a bpf filesystem, the only place maps can be pinned.
fn on_bpffs(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let Ok(c_dir) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else { return false };
    // SAFETY: statfs writes into `st`, which lives for the call; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c_dir.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

/// The oldest `Globals::abi_version` whose maps this build takes over. Version 1 lacked
/// `SLOT_SEEN` and `MAGLEV_OLD` (created empty, which is what they hold for its state) and
/// used no bits of a Maglev entry beyond the master's id and the changed mark, whose meaning
/// version 2 keeps: a marked slot with no previous master sends unrecorded flows to its
/// master, as version 1 did.
const MIN_READABLE_ABI_VERSION: u32 = 1;

/// Maps added after `MIN_READABLE_ABI_VERSION`: a pinned set may lack them, and they are then
/// created (empty) and pinned beside the others.
const MAPS_ADDED_SINCE_OLDEST: [&str; 2] = [names::SLOT_SEEN, names::MAGLEV_OLD];

/// What this build expects of each pinned map: (name, type, key size, value size, entries).
fn expected_maps(flow_table_size: u32, service_room: u32) -> [(&'static str, MapType, usize, usize, u32); 15] {
    use core::mem::size_of;
    [
        (names::GLOBALS, MapType::Array, 4, size_of::<Globals>(), 1),
        (names::SERVICES, MapType::Array, 4, size_of::<ServiceEntry>(), 2 * limits::SERVICE_SLOTS),
        (names::MAGLEV, MapType::Array, 4, 4, limits::maglev_map_entries(service_room)),
        (names::BACKENDS, MapType::Array, 4, size_of::<BackendEntry>(), limits::MAX_BACKENDS),
        (names::FLOWS, MapType::LruHash, size_of::<FlowKey>(), size_of::<FlowEntry>(), flow_table_size),
        (names::REASON_STATS, MapType::PerCpuArray, 4, size_of::<Counter>(), limits::REASON_SLOTS),
        (names::SERVICE_STATS, MapType::PerCpuArray, 4, size_of::<TrafficStats>(), limits::MAX_SERVICES),
        (names::BACKEND_STATS, MapType::PerCpuArray, 4, size_of::<TrafficStats>(), limits::MAX_BACKENDS),
        (names::SLOT_SEEN, MapType::Array, 4, 4, limits::slot_map_entries(service_room)),
        (names::MAGLEV_OLD, MapType::Array, 4, 4, limits::slot_map_entries(service_room)),
        (names::FLOW_EVENTS, MapType::RingBuf, 0, 0, limits::FLOW_EVENTS_BYTES),
        (names::SYNC_STATS, MapType::PerCpuArray, 4, 8, mim_lb_common::SYNC_STAT_SLOTS),
        (
            names::FRAGMENTS,
            MapType::LruHash,
            size_of::<mim_lb_common::FragmentKey>(),
            size_of::<mim_lb_common::FragmentEntry>(),
            limits::FRAGMENT_TABLE_SIZE,
        ),
        (
            names::ACTIVE_SKETCH,
            MapType::Array,
            4,
            size_of::<mim_lb_common::ActiveSketch>(),
            limits::MAX_BACKENDS * limits::SKETCH_GENERATIONS,
        ),
        (names::SKETCH_GEN, MapType::Array, 4, 4, 1),
    ]
}

/// The `abi_version` in the pinned GLOBALS under `dir`, if it can be read and the maps were
/// filled (an unfilled set speaks no version).
fn pinned_abi_version(dir: &Path) -> Option<u32> {
    let data = aya::maps::MapData::from_pin(dir.join(names::GLOBALS)).ok()?;
    let globals: aya::maps::Array<_, Globals> = aya::maps::Array::try_from(aya::maps::Map::Array(data)).ok()?;
    let g = globals.get(&0, 0).ok()?;
    (g.flags & GLOBALS_F_READY != 0).then_some(g.abi_version)
}

/// Creates the pin directory if needed and decides whether pins found there can be reused.
/// Returns the room for services of a complete, compatible set if one was found; a partial or
/// mismatching set is an error rather than something to overwrite, because it holds live
/// flows.
fn check_pins(dir: &Path, flow_table_size: u32, room: ServiceRoom) -> Result<Option<u32>, DataplaneError> {
    std::fs::create_dir_all(dir)
        .map_err(|source| DataplaneError::PinDir { dir: dir.to_path_buf(), source })?;
    if !on_bpffs(dir) {
        return Err(DataplaneError::NotBpffs(dir.to_path_buf()));
    }
    let present: Vec<&str> =
        names::ALL.iter().copied().filter(|name| dir.join(name).exists()).collect();
    if present.is_empty() {
        return Ok(None);
    }
    let incompatible = |detail: String| DataplaneError::IncompatiblePins { dir: dir.to_path_buf(), detail };
    let pinned_room = match MapInfo::from_pin(dir.join(names::MAGLEV)) {
        Ok(info) => room_of_pinned(info.max_entries(), room).map_err(incompatible)?,
        // Missing: reported below as an incomplete set.
        Err(_) => room.wanted,
    };
    let expected = expected_maps(flow_table_size, pinned_room);
    // Maps added since the oldest readable ABI may be missing only from a set that ABI filled:
    // from a newer set, a missing one held live state (an old table during a resize).
    let abi = pinned_abi_version(dir);
    let filled_by_oldest = abi.is_some_and(|v| v < ABI_VERSION);
    let missing: Vec<&str> = expected
        .iter()
        .map(|e| e.0)
        .filter(|n| {
            let may_be_missing =
                (filled_by_oldest && MAPS_ADDED_SINCE_OLDEST.contains(n)) || names::STATELESS.contains(n);
            !present.contains(n) && !may_be_missing
        })
        .collect();
    if !missing.is_empty() {
        return Err(incompatible(format!("the set is incomplete (missing {})", missing.join(", "))));
    }
    for (name, map_type, key, value, entries) in expected.into_iter().filter(|e| present.contains(&e.0)) {
        let info = MapInfo::from_pin(dir.join(name))
            .map_err(|e| incompatible(format!("{name} cannot be opened: {e}")))?;
        let found_type = info.map_type().map_err(|e| incompatible(format!("{name}: {e}")))?;
        let found = (found_type, info.key_size() as usize, info.value_size() as usize, info.max_entries());
        if found != (map_type, key, value, entries) {
            let hint = if name == names::FLOWS && found.3 != entries {
                format!(" (flow_table_size was {} and is now {entries})", found.3)
            } else {
                String::new()
            };
            return Err(incompatible(format!(
                "{name} is {found_type:?} with key {} bytes, value {} bytes, {} entries; this build \
                 needs {map_type:?} with key {key}, value {value}, {entries} entries{hint}",
                found.1, found.2, found.3
            )));
        }
    }
    // Checked before anything is loaded over the pins, so a refusal leaves them untouched.
    if let Some(v) = abi.filter(|v| !(MIN_READABLE_ABI_VERSION..=ABI_VERSION).contains(v)) {
        return Err(incompatible(format!("they were filled by ABI version {v}, this build speaks {ABI_VERSION}")));
    }
    Ok(Some(pinned_room))
}

/// The room for services of a pinned Maglev map of `entries` entries, if it can serve `room`:
/// at least `room.least` services. Pinned maps keep their size (growing one would mean a new
/// map, and the flows the old one steers would be lost), so one with room for more than
/// `room.wanted` is reused as it is, and one with room for fewer than `room.least` refused.
fn room_of_pinned(entries: u32, room: ServiceRoom) -> Result<u32, String> {
    let per_service = limits::maglev_map_entries(1);
    let pinned = entries / per_service;
    if !entries.is_multiple_of(per_service) || !(1..=limits::MAX_SERVICES).contains(&pinned) {
        return Err(format!(
            "MAGLEV has {entries} entries, which is not room for 1 to {} services of {per_service} entries",
            limits::MAX_SERVICES
        ));
    }
    if pinned < room.least {
        return Err(format!(
            "MAGLEV holds room for {pinned} services and this configuration needs {} (max_services, or the \
             number of services). Pinned maps keep their size: to grow them, detach (which loses the recorded \
             flows) or go back to a configuration of at most {pinned} services",
            room.least
        ));
    }
    Ok(pinned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_maglev_maps_are_reused_at_their_room_or_refused() {
        let entries = limits::maglev_map_entries;
        let room = |wanted, least| ServiceRoom { wanted, least };
        // Larger or smaller than wanted: kept as it is, as long as it holds `least`.
        assert_eq!(room_of_pinned(entries(64), room(8, 1)), Ok(64));
        assert_eq!(room_of_pinned(entries(8), room(16, 5)), Ok(8));
        assert_eq!(room_of_pinned(entries(5), room(16, 5)), Ok(5));
        let err = room_of_pinned(entries(4), room(16, 5)).unwrap_err();
        assert!(err.starts_with("MAGLEV holds room for 4 services and this configuration needs 5"), "{err}");
        assert!(err.contains("detach"), "{err}");
        // Not whole services, none, or more than any build made.
        assert!(room_of_pinned(entries(2) + 1, room(8, 1)).is_err());
        assert!(room_of_pinned(0, room(8, 1)).is_err());
        assert!(room_of_pinned(entries(limits::MAX_SERVICES + 1), room(8, 1)).is_err());
    }
}
