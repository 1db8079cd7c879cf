//! `mim-lb run`: load, fill, attach, then serve: health checks, neighbour resolution, the
//! control socket, reloads and the flow sweep, all feeding one event loop that owns the
//! director. On SIGINT/SIGTERM the program is detached and the pins removed, unless
//! `--keep-pinned` asks to leave it forwarding for the next run.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use log::{error, info, warn};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    health::bringup::Bringup,
    sync::runner::SyncRunner,
    cli::{RunArgs, XdpModeArg},
    lock::InstanceLock,
    config::{CheckKind, Config, ServiceKey, XdpMode},
    control::{
        protocol::{Request, Response},
        server::{self, Pending},
    },
    dataplane::{AttachMode, Attached, Dataplane, LoadOptions, Simulator},
    director::{Admin, Director, held::{self, HeldCounts}, monotonic_ns, read_pinned_flows, slow_start},
    health::{self, HealthChecker, Report, Verdict},
    neighbor::{self, NeighborEvent, NeighborResolver},
    status::{self, CheckStatus, DaemonFacts},
};

/// Command-line settings that override the file, on start and on every reload.
#[derive(Clone)]
struct Overrides {
    interface: Option<String>,
    xdp_mode: Option<XdpMode>,
}

impl Overrides {
    fn load(&self, path: &Path) -> Result<Config> {
        let mut config = Config::from_file(path)
            .with_context(|| format!("{} is not a valid mim-lb config", path.display()))?;
        if let Some(interface) = &self.interface {
            config.interface = interface.clone();
        }
        if let Some(mode) = self.xdp_mode {
            config.xdp_mode = mode;
        }
        Ok(config)
    }
}

pub fn run(args: RunArgs) -> Result<()> {
    let overrides = Overrides {
        interface: args.interface.clone(),
        xdp_mode: args.xdp_mode.map(|mode| match mode {
            XdpModeArg::Auto => XdpMode::Auto,
            XdpModeArg::Native => XdpMode::Native,
            XdpModeArg::Generic => XdpMode::Generic,
        }),
    };
    let config = overrides.load(&args.config)?;
    log_open_file_limit(crate::rlimit::raise_open_file_limit());
    // The event loop (which owns the director) runs on this thread; health checks, the
    // control socket, metrics and the neighbour watch run on two workers, so a table rebuild
    // in the loop never delays a check's timer into a false timeout.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("mim-lb-worker")
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(serve(args.config, overrides, config, args.keep_pinned))
}

/// A daemon that cannot raise its limit still runs: the bound on metrics connections keeps
/// peers from exhausting it, and the limit it has may well be enough.
fn log_open_file_limit(raised: Result<crate::rlimit::OpenFileLimit, crate::rlimit::RlimitError>) {
    use crate::rlimit::show;
    match raised {
        Ok(limit) if limit.was < limit.now => {
            info!("open files limit raised from {} to {} (the hard limit)", show(limit.was), show(limit.now))
        }
        Ok(limit) => info!("open files limit: {} (the hard limit)", show(limit.now)),
        Err(e) => warn!("{e}; running with the limit as it is"),
    }
}

/// How the daemon loads the program for `config`: the maps sized by it.
pub fn load_options(config: &Config, pin_dir: Option<PathBuf>) -> LoadOptions {
    let (wanted, least) = config.service_room();
    LoadOptions {
        pin_dir,
        flow_table_size: config.flow_table_size,
        service_room: crate::dataplane::ServiceRoom { wanted, least },
    }
}

/// Says what reloads may serve, and when pinned maps keep another size than the config asks.
fn log_service_room(config: &Config, dataplane: &Dataplane) {
    let room = dataplane.service_room();
    let (wanted, _) = config.service_room();
    let how = if config.max_services.is_some() { "max_services" } else { "by default twice the services configured, at least 8" };
    if room == wanted {
        info!("maps sized for {room} services ({how}); reloads may serve up to {room}");
    } else {
        info!(
            "the pinned maps hold room for {room} services, kept as they are (the configuration asks for {wanted}, \
             {how}); reloads may serve up to {room}. A fresh start (after `mim-lb detach`) sizes them anew"
        );
    }
}

async fn serve(config_path: PathBuf, overrides: Overrides, config: Config, keep_pinned: bool) -> Result<()> {
    let signals = Signals::install()?;
    let _lock = InstanceLock::acquire(&config.control_socket, &config.pin_dir)?;
    let listener = server::bind(&config.control_socket).await?;
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(crate::metrics::bind(addr).await?),
        None => None,
    };
    let sync_socket = match &config.sync {
        Some(sync) => Some(crate::sync::runner::bind(sync).await?),
        None => None,
    };
    let gateway_mac = neighbor::interface_mac(&config.interface)
        .await
        .with_context(|| format!("reading the MAC address of {}", config.interface))?;
    let dataplane =
        Dataplane::load(&load_options(&config, Some(config.pin_dir.clone()))).context("loading the XDP program")?;
    log_service_room(&config, &dataplane);
    let reused = dataplane.reused_pins();
    let mut director = if reused {
        let (director, found) = Director::recover(dataplane, gateway_mac).context("reading the pinned maps")?;
        info!(
            "reusing the maps pinned under {} ({} services, {} backends, recorded flows kept)",
            config.pin_dir.display(),
            found.services,
            found.backends
        );
        director
    } else {
        info!("XDP program loaded; maps pinned under {}", config.pin_dir.display());
        Director::new(dataplane, gateway_mac)
    };

    let mut attached = None;
    let listeners = Listeners { control: listener, metrics: metrics_listener, sync: sync_socket, signals };
    let result =
        start_and_serve(&config_path, overrides, config.clone(), &mut director, listeners, &mut attached, keep_pinned).await;
    let stop = attached.take();
    let dataplane = director.dataplane_mut();
    match (&result, stop, keep_pinned) {
        (Ok(()), Some(_), true) => {
            dataplane.keep_attached();
            info!(
                "stopped; the program stays attached to {} and the maps stay pinned under {} (--keep-pinned)",
                config.interface,
                config.pin_dir.display()
            );
        }
        // Failing before attaching over maps an earlier run left: that run's program is still
        // forwarding with them, so they are left alone.
        (Err(_), None, _) if reused => {
            warn!("not attached; the pins under {} are left as they were", config.pin_dir.display())
        }
        // Failing after taking over an earlier run's attachment: the program keeps forwarding
        // with the same maps, as after a stop with --keep-pinned, rather than dropping every
        // flow the restart was meant to keep.
        (Err(_), Some(_), _) if reused => {
            dataplane.keep_attached();
            warn!(
                "start failed after taking over the program on {}; it stays attached with the maps pinned under {}",
                config.interface,
                config.pin_dir.display()
            );
        }
        _ => {
            if let Err(err) = dataplane.detach() {
                warn!("detaching: {err}");
            }
            if let Err(err) = dataplane.unpin() {
                warn!("removing pins: {err}");
            }
            info!("detached from {} and removed the pins under {}", config.interface, config.pin_dir.display());
        }
    }
    let _ = std::fs::remove_file(&config.control_socket);
    result
}

/// Sockets bound before anything touches the kernel, so a taken address fails the start, and
/// the signal handlers.
struct Listeners {
    control: tokio::net::UnixListener,
    metrics: Option<tokio::net::TcpListener>,
    sync: Option<crate::sync::runner::Sockets>,
    signals: Signals,
}

/// SIGTERM, SIGINT and SIGHUP, caught from the very start of `run`: a signal that arrives
/// while the daemon starts waits for the event loop. Installed only there, a SIGTERM just
/// after `ready` (an operator's or a service manager's stop) killed the daemon outright, which
/// leaves the program attached and the pins in place as a crash does, not a clean stop.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            hup: signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
        })
    }
}

async fn start_and_serve(
    config_path: &Path,
    overrides: Overrides,
    config: Config,
    director: &mut Director,
    listeners: Listeners,
    attached: &mut Option<Attached>,
    keep_pinned: bool,
) -> Result<()> {
    // Everything that can fail without changing the data path comes before the first write,
    // so a failed start over pins an earlier run left changes nothing it forwards with.
    let (neigh_tx, neigh_rx) = mpsc::channel(256);
    let neighbors = NeighborResolver::start(&config.interface, neigh_tx)
        .await
        .with_context(|| format!("watching the neighbour table of {}", config.interface))?;
    let mode = match config.xdp_mode {
        XdpMode::Auto => None,
        XdpMode::Native => Some(AttachMode::Native),
        XdpMode::Generic => Some(AttachMode::Generic),
    };
    // Over maps an earlier run left, this build's program takes over first: the maps already
    // hold a complete state it reads, while the program it replaces may not read what this
    // build writes (an older ABI). Fresh maps are filled first, then attached.
    let reused = director.dataplane().reused_pins();
    if reused && let Err(e) = attach(director, &config, mode, attached) {
        neighbors.shutdown().await;
        return Err(e);
    }
    let report = match director.apply_config(&config) {
        Ok(report) => report,
        Err(e) => {
            neighbors.shutdown().await;
            return Err(e).context("filling the maps");
        }
    };
    info!(
        "maps filled: {} services, {} Maglev entries and {} backend entries written",
        director.desired().len(),
        report.maglev_writes,
        report.backend_writes
    );
    for (key, s) in director.desired() {
        info!("service {} {} -> {} backends, health check {}", s.name, key, s.backends.len(), s.health.kind.name());
    }
    if !reused && let Err(e) = attach(director, &config, mode, attached) {
        neighbors.shutdown().await;
        return Err(e);
    }
    let how = attached.expect("attached above");
    // Peers are told of flows from the moment the tables are live; the pull of their state
    // runs in the event loop, and `mim-lb ready` waits for it.
    // A fresh start pulls once its first round of health checks is applied (a peer's marks
    // fit only a table with the masters in it); a start over kept pins, at once.
    let pull_now = director.dataplane().reused_pins();
    let sync = match (listeners.sync, &config.sync) {
        (Some(sockets), Some(_)) => match SyncRunner::start(sockets, &config, director, pull_now) {
            Ok(runner) => Some(runner),
            Err(e) => {
                neighbors.shutdown().await;
                return Err(e);
            }
        },
        _ => None,
    };

    // Its first pass removes what an earlier run left: nothing is announced until ready.
    let announcer = match config.announce {
        Some(announce) => match crate::announce::Announcer::start(announce).await {
            Ok(announcer) => Some(announcer),
            Err(e) => {
                neighbors.shutdown().await;
                return Err(e).context("starting to announce the VIPs ([announce])");
            }
        },
        None => None,
    };

    let logger = director.dataplane_mut().take_logger();
    let log_task = logger.map(|logger| tokio::spawn(forward_program_log(logger)));
    let (report_tx, report_rx) = mpsc::channel(1024);
    let (control_tx, control_rx) = mpsc::channel(64);
    let metrics_task = listeners.metrics.map(|listener| {
        info!("serving Prometheus metrics on http://{}/metrics", config.metrics_listen.expect("bound"));
        tokio::spawn(crate::metrics::serve(listener, control_tx.clone()))
    });
    let control_task = tokio::spawn(server::serve(listeners.control, control_tx));

    let mut daemon = Daemon {
        config_path: config_path.to_owned(),
        overrides,
        config,
        health: HealthChecker::new(report_tx),
        neighbors,
        checks: BTreeMap::new(),
        started: Instant::now(),
        mode: how.mode(),
        simulator: None,
        sync,
        bringup: (!director.dataplane().reused_pins()).then(|| first_round(director)),
        timer_not_before: None,
        held: None,
        held_recorded: None,
        tcp_active: None,
        sketch_flips: 0,
        announcer,
    };
    daemon.refresh_watchers(director);
    info!(
        "ready: serving {} services on {} in {} mode",
        director.desired().len(),
        daemon.config.interface,
        daemon.mode
    );
    let result = daemon.event_loop(director, listeners.signals, report_rx, neigh_rx, control_rx).await;
    // Withdraw first: the router moves the traffic to the other directors while this one
    // still forwards; only then does the program go (unless it stays, --keep-pinned).
    if let Some(announcer) = daemon.announcer.take() {
        let wait = daemon.config.announce.map_or(Duration::ZERO, |a| a.withdraw_wait);
        if announcer.withdraw_all().await && !keep_pinned && !wait.is_zero() {
            info!("routes withdrawn; forwarding what still arrives for {} ms before detaching", wait.as_millis());
            tokio::time::sleep(wait).await;
        }
    }

    daemon.health.shutdown();
    control_task.abort();
    if let Some(task) = metrics_task {
        task.abort();
    }
    if let Some(task) = log_task {
        task.abort();
    }
    daemon.neighbors.shutdown().await;
    result
}

fn attach(director: &mut Director, config: &Config, mode: Option<AttachMode>, attached: &mut Option<Attached>) -> Result<()> {
    let how = director.dataplane_mut().attach(&config.interface, mode)?;
    *attached = Some(how);
    match how {
        Attached::Fresh(m) => info!("attached to {} in {m} mode", config.interface),
        Attached::Replaced(m) => info!("replaced the running program on {} ({m} mode) atomically", config.interface),
    }
    Ok(())
}

/// What the event loop owns besides the director.
struct Daemon {
    config_path: PathBuf,
    overrides: Overrides,
    config: Config,
    health: HealthChecker,
    neighbors: NeighborResolver,
    /// Last health check result per backend, with when it ended.
    checks: BTreeMap<(ServiceKey, IpAddr), (health::CheckOutcome, Instant)>,
    started: Instant,
    mode: AttachMode,
    /// Loaded on the first `simulate` request.
    simulator: Option<Simulator>,
    /// Flow sync with peer directors, when `[sync]` is configured.
    sync: Option<SyncRunner>,
    /// After a fresh start, until every master has had its first checks: their verdicts,
    /// held to be applied as one change (`health::bringup`).
    bringup: Option<Bringup>,
    /// After a timed change failed: not retried before this.
    timer_not_before: Option<tokio::time::Instant>,
    /// The connections each master holds, as status and metrics show them, with the time
    /// they speak for: the older of the last table read and the end of the last sketch window
    /// (`director::held`). None until both have been made once.
    held: Option<(Instant, HeldCounts)>,
    /// The counts of the last read of the connection table, with when that read began.
    held_recorded: Option<(Instant, HeldCounts)>,
    /// The active TCP connections of the last whole sketch window, with when it ended.
    tcp_active: Option<(Instant, std::collections::HashMap<u32, u64>)>,
    /// Generations the sketch moved through since this daemon cleared it; counts are taken
    /// once all the complete ones are of its own time.
    sketch_flips: u32,
    /// The VIPs' routes for the routing daemon, with `[announce]`.
    announcer: Option<crate::announce::Announcer>,
}

/// A read of the connection table under way on a blocking thread: when it began (both
/// clocks), whether a sweep waits for it, and the flows with their counts.
struct Reading {
    started_ns: u64,
    started: Instant,
    sweep: bool,
    task: tokio::task::JoinHandle<Result<(Flows, HeldCounts), aya::maps::MapError>>,
}

/// A copy of the connection table.
type Flows = Vec<(mim_lb_common::FlowKey, mim_lb_common::FlowEntry)>;

/// The first round of checks of a fresh start: every checked master, with its `rise`.
fn first_round(director: &Director) -> Bringup {
    let targets = director
        .health_targets()
        .into_iter()
        .filter(|(_, _, check, _)| check.kind != CheckKind::None)
        .map(|(service, address, check, _)| ((service, address), check.rise, check.interval * check.rise + check.timeout));
    Bringup::new(targets, Instant::now())
}

impl Daemon {
    async fn event_loop(
        &mut self,
        director: &mut Director,
        signals: Signals,
        mut reports: mpsc::Receiver<Report>,
        mut neighbours: mpsc::Receiver<NeighborEvent>,
        mut control: mpsc::Receiver<Pending>,
    ) -> Result<()> {
        let Signals { mut term, mut int, mut hup } = signals;
        let mut sweep = tokio::time::interval(self.sweep_period());
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The connection table is read on a blocking thread (a million entries take a third of
        // a second or more in the kernel); its copy is swept when it arrives. At most one read
        // at a time. Reads for the connection counts come between sweeps, spaced by how long
        // the last read took (`held::next_count_in`).
        let mut reading: Option<Reading> = None;
        let mut count_due = tokio::time::Instant::now();
        let mut period = self.sweep_period();
        // The interface's MAC is the source MAC of every forwarded frame: a change (an
        // operator's `ip link set address`, a bond failing over) is picked up within a second.
        let mut link_check = tokio::time::interval(Duration::from_secs(1));
        link_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sync_tick = tokio::time::interval(crate::sync::runner::TICK);
        sync_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sketch_tick = tokio::time::interval(held::SKETCH_FLIP);
        sketch_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seen_tick = tokio::time::interval(crate::sync::runner::SEEN_EVERY);
        seen_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let syncing = self.sync.is_some();
        loop {
            // A reload may change the idle timeouts, and with them how often to sweep.
            if self.sweep_period() != period {
                period = self.sweep_period();
                sweep = tokio::time::interval(period);
                sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            }
            // Outside any change: the next one then writes only its own slots.
            director.tidy();
            // Whatever the last event changed (readiness, a master's state, a reload, an
            // operator's withdraw) decides which VIPs are announced.
            self.update_announce(director);
            let timer = director.next_timer_ns().map(|at| {
                let due = tokio::time::Instant::now() + Duration::from_nanos(at.saturating_sub(monotonic_ns()));
                self.timer_not_before.map_or(due, |t| due.max(t))
            });
            tokio::select! {
                _ = term.recv() => { info!("SIGTERM: stopping"); return Ok(()); }
                _ = int.recv() => { info!("SIGINT: stopping"); return Ok(()); }
                _ = hup.recv() => match self.reload(director) {
                    Ok(summary) => info!("SIGHUP: {summary}"),
                    Err(why) => error!("SIGHUP: reload rejected, nothing changed: {why}"),
                },
                Some(report) = reports.recv() => self.on_report(director, report),
                _ = tokio::time::sleep_until(timer.unwrap_or_else(tokio::time::Instant::now)), if timer.is_some() => {
                    self.on_timer(director);
                }
                _ = link_check.tick() => self.check_gateway_mac(director).await,
                Some(event) = neighbours.recv() => self.on_neighbour(director, event),
                Some((request, reply)) = control.recv() => {
                    let response = self.on_request(director, request);
                    let _ = reply.send(response);
                }
                _ = async { self.sync.as_ref().expect("guarded").readable().await }, if syncing => {
                    if let Some(sync) = self.sync.as_mut() {
                        sync.on_readable(director);
                    }
                }
                _ = async { self.sync.as_ref().expect("guarded").events_ready().await }, if syncing => {
                    if let Some(sync) = self.sync.as_mut() {
                        sync.on_events(director);
                    }
                }
                _ = tokio::time::sleep_until(self.bringup.as_ref().map_or_else(tokio::time::Instant::now, |b| b.deadline.into())), if self.bringup.is_some() => {
                    self.finish_bringup(director, true);
                }
                _ = tokio::time::sleep_until(
                    self.sync.as_ref().and_then(|s| s.flush_due()).map_or_else(tokio::time::Instant::now, Into::into)
                ), if self.sync.as_ref().is_some_and(|s| s.flush_due().is_some()) => {
                    if let Some(sync) = self.sync.as_mut() {
                        sync.flush();
                    }
                }
                _ = sync_tick.tick(), if syncing => {
                    // What the peers are told is the whole readiness: a fresh start whose first
                    // health checks are not applied yet has an empty table, and a peer that
                    // chose it to pull from would get nothing.
                    let ready = self.not_ready().is_none();
                    if let Some(sync) = self.sync.as_mut() {
                        sync.on_tick(director, ready);
                    }
                }
                _ = seen_tick.tick(), if syncing => {
                    if let Some(sync) = self.sync.as_mut() {
                        sync.on_seen_tick(director);
                    }
                }
                // With peers, the table is also read to refresh their copies of live records,
                // and at once when a peer wants the whole state.
                _ = async {
                    if self.sync.as_ref().is_some_and(|s| s.wants_a_read()) {
                        tokio::time::sleep(Duration::ZERO).await
                    } else {
                        sweep.tick().await;
                    }
                }, if reading.is_none() && (director.sweep_pending() || syncing) => {
                    reading = Some(self.start_read(true));
                }
                _ = sketch_tick.tick() => self.flip_sketch(director),
                _ = tokio::time::sleep_until(count_due), if reading.is_none() => {
                    reading = Some(self.start_read(false));
                }
                joined = async { (&mut reading.as_mut().expect("guarded").task).await }, if reading.is_some() => {
                    let Reading { started_ns: started, started: began, sweep: sweeping, .. } = reading.take().expect("guarded");
                    count_due = (began + held::next_count_in(began.elapsed())).into();
                    match joined {
                        Ok(Ok((flows, counts))) => {
                            self.take_counts(began, counts);
                            if sweeping {
                                if let Some(sync) = self.sync.as_mut() {
                                    sync.on_table_read(director, &flows, started);
                                }
                                let cleared = self.sweep(director, &flows, started);
                                if let Some(sync) = self.sync.as_mut() && !cleared.is_empty() {
                                    sync.send_cleared(director, &cleared);
                                }
                            }
                        }
                        Ok(Err(e)) => self.read_failed(sweeping, &format!("reading the connection table: {e}")),
                        Err(e) => self.read_failed(sweeping, &format!("the reader failed: {e}")),
                    }
                }
            }
        }
    }

    /// A read of the connection table failed: the sweep (and sync, which waited for it) is
    /// told; a read for the counts only leaves the last counts, which age, and logs quietly
    /// (one is tried every second).
    fn read_failed(&mut self, sweeping: bool, why: &str) {
        if !sweeping {
            log::debug!("counting connections: {why}");
            return;
        }
        error!("flow sweep: {why}");
        if let Some(sync) = self.sync.as_mut() {
            sync.read_failed();
        }
    }

    /// Starts a read of the connection table, counted on the reading thread; `sweep` when
    /// the sweep (and sync) waits for it.
    fn start_read(&self, sweep: bool) -> Reading {
        let path = self.config.pin_dir.join(mim_lb_common::maps::names::FLOWS);
        let (tcp_idle, udp_idle) = (self.config.tcp_idle_timeout, self.config.udp_idle_timeout);
        let started = Instant::now();
        let started_ns = monotonic_ns();
        let task = tokio::task::spawn_blocking(move || {
            let flows = read_pinned_flows(&path)?;
            let counts = held::count_records(&flows, started_ns, tcp_idle, udp_idle);
            Ok((flows, counts))
        });
        Reading { started_ns, started, sweep, task }
    }

    /// Keeps a read's counts for status and metrics.
    fn take_counts(&mut self, began: Instant, counts: HeldCounts) {
        self.held_recorded = Some((began, counts));
        self.combine_counts();
    }

    /// Moves the sketch to its next generation: the active TCP connections of the last
    /// window, once every complete generation began after this daemon cleared them.
    fn flip_sketch(&mut self, director: &mut Director) {
        if self.sketch_flips == 0
            && let Err(e) = director.clear_active_sketches()
        {
            log::debug!("counting connections: clearing the active-connection sketches: {e}");
            return;
        }
        let now = Instant::now();
        match director.rotate_active_sketch() {
            Ok(active) => {
                self.sketch_flips = self.sketch_flips.saturating_add(1);
                if self.sketch_flips >= mim_lb_common::limits::SKETCH_GENERATIONS {
                    self.tcp_active = Some((now, active));
                    self.combine_counts();
                }
            }
            Err(e) => log::debug!("counting connections: reading the active-connection sketch: {e}"),
        }
    }

    fn combine_counts(&mut self) {
        if let (Some((read, recorded)), Some((ended, tcp))) = (&self.held_recorded, &self.tcp_active) {
            self.held = Some(((*read).min(*ended), held::with_tcp_active(recorded, tcp)));
        }
    }

    async fn check_gateway_mac(&mut self, director: &mut Director) {
        match neighbor::interface_mac(&self.config.interface).await {
            Ok(mac) => match director.set_gateway_mac(mac) {
                Ok(true) => info!(
                    "{} now has MAC {}: forwarded frames carry it from now on",
                    self.config.interface,
                    crate::config::format_mac(&mac)
                ),
                Ok(false) => {}
                Err(e) => error!("writing the new gateway MAC: {e}"),
            },
            Err(e) => log::debug!("reading the MAC of {}: {e}", self.config.interface),
        }
    }

    fn sweep_period(&self) -> Duration {
        (self.config.tcp_idle_timeout.min(self.config.udp_idle_timeout) / 4)
            .clamp(Duration::from_secs(1), Duration::from_secs(30))
    }

    /// Hands the health checker and the neighbour resolver the current backend set.
    fn refresh_watchers(&mut self, director: &Director) {
        let targets = director
            .health_targets()
            .into_iter()
            .filter(|(_, _, check, _)| check.kind != CheckKind::None)
            .map(|(service, address, check, up)| {
                let port = check.port_for(service.port);
                (
                    health::Target { service, address, port, check },
                    if up { Verdict::Up } else { Verdict::Down },
                )
            })
            .collect();
        self.health.set_targets(targets);
        self.neighbors.set_wanted(director.wanted_macs());
        let known: std::collections::BTreeSet<(ServiceKey, IpAddr)> = director
            .desired()
            .iter()
            .flat_map(|(k, s)| s.backends.keys().map(move |a| (*k, *a)))
            .collect();
        self.checks.retain(|k, _| known.contains(k));
    }

    fn on_report(&mut self, director: &mut Director, report: Report) {
        let known = director.desired().get(&report.service).is_some_and(|s| s.backends.contains_key(&report.address));
        if !known {
            // Queued before a reload removed the backend.
            return;
        }
        self.checks.insert((report.service, report.address), (report.outcome.clone(), Instant::now()));
        let reason = format!("{} check: {}", report.check, report.outcome.detail);
        if let Some(bringup) = self.bringup.as_mut() {
            if report.transition {
                info!("{report} (applied with the first round of checks)");
            }
            let verdict = report.transition.then(|| (report.verdict == Verdict::Up, reason));
            bringup.report((report.service, report.address), verdict);
            self.finish_bringup(director, false);
            return;
        }
        if !report.transition {
            return;
        }
        info!("{report}");
        match director.set_health(&report.service, report.address, report.verdict == Verdict::Up, &reason) {
            Ok(Some(change)) => info!("{change}"),
            Ok(None) => {}
            Err(e) => error!("applying the health verdict for {} of {}: {e}", report.address, report.service),
        }
    }

    /// Slow starts that take their next step.
    fn on_timer(&mut self, director: &mut Director) {
        match director.on_timer() {
            Ok(stepped) => {
                for (service, address, ramp) in stepped {
                    let weight = director.desired().get(&service).and_then(|s| s.backends.get(&address)).map_or(0, |b| b.weight);
                    match ramp {
                        Some(r) => info!(
                            "backend {address} of {service}: slow start step {}/{} (weight {} of {weight})",
                            r.step,
                            slow_start::STEPS,
                            f64::from(weight) * f64::from(r.step) / f64::from(slow_start::STEPS)
                        ),
                        None => info!("backend {address} of {service}: slow start over (weight {weight})"),
                    }
                }
            }
            Err(e) => {
                error!("slow start: moving to the next step (retried in a second): {e}");
                self.timer_not_before = Some(tokio::time::Instant::now() + Duration::from_secs(1));
                return;
            }
        }
        self.timer_not_before = None;
    }

    /// Applies the first round's verdicts in one change once it is complete (or `force`d by
    /// its deadline).
    fn finish_bringup(&mut self, director: &mut Director, force: bool) {
        let done = self.bringup.as_ref().is_some_and(|b| force || b.complete(Instant::now()));
        if !done {
            return;
        }
        let bringup = self.bringup.take().expect("checked");
        let waiting = bringup.waiting();
        match director.set_health_many(&bringup.into_verdicts()) {
            Ok(changes) => changes.iter().for_each(|c| info!("{c}")),
            Err(e) => error!("applying the first health verdicts: {e}"),
        }
        if let Some(sync) = self.sync.as_mut() {
            sync.start_pull();
        }
        if waiting > 0 {
            warn!("first round of health checks: {waiting} masters had no verdict by the deadline; they stay down until their checks pass");
        } else {
            info!("first round of health checks complete: {} masters up", director.desired().values().flat_map(|s| s.backends.values()).filter(|b| b.health_up).count());
        }
    }

    fn on_neighbour(&mut self, director: &mut Director, event: NeighborEvent) {
        let (address, resolved) = match event {
            NeighborEvent::Resolved { address, mac } => {
                info!("neighbour {address} is at {}", crate::config::format_mac(&mac));
                (address, Ok(mac))
            }
            NeighborEvent::Unresolved { address, reason } => {
                warn!("neighbour {address} unresolved: {reason}");
                (address, Err(reason))
            }
        };
        match director.set_resolved_mac(address, resolved) {
            Ok(changes) => changes.iter().for_each(|c| info!("{c}")),
            Err(e) => error!("applying the MAC of {address}: {e}"),
        }
    }

    /// Sweeps a read of the connection table; returns the marks it cleared, for peers.
    fn sweep(
        &mut self,
        director: &mut Director,
        flows: &[(mim_lb_common::FlowKey, mim_lb_common::FlowEntry)],
        read_at_ns: u64,
    ) -> Vec<crate::director::ServiceSlots> {
        match director.sweep_with(flows, read_at_ns, self.config.tcp_idle_timeout, self.config.udp_idle_timeout) {
            Ok(r) => {
                for (service, backend) in &r.backends_retired {
                    info!("backend {backend} of {service} removed: no live flow left on it");
                }
                if r.marks_cleared > 0 || r.flows_deleted > 0 {
                    log::debug!(
                        "sweep: {} flows ({} live), {} slot marks cleared, {} records deleted",
                        r.flows_seen,
                        r.live_flows,
                        r.marks_cleared,
                        r.flows_deleted
                    );
                }
                r.cleared
            }
            Err(e) => {
                error!("flow sweep: {e}");
                Vec::new()
            }
        }
    }

    fn on_request(&mut self, director: &mut Director, request: Request) -> Response {
        match request {
            Request::Status => match self.status(director) {
                Ok(status) => Response { ok: true, status: Some(status), ..Default::default() },
                Err(e) => Response::error(format!("reading the maps: {e}")),
            },
            Request::Drain { service, backend } => self.admin(director, &service, backend, Admin::Drained),
            Request::Enable { service, backend } => self.admin(director, &service, backend, Admin::Enabled),
            Request::Disable { service, backend } => self.admin(director, &service, backend, Admin::Disabled),
            Request::Reload => match self.reload(director) {
                Ok(summary) => {
                    info!("reload: {summary}");
                    Response::message(summary)
                }
                Err(why) => {
                    error!("reload rejected, nothing changed: {why}");
                    Response::error(format!("reload rejected, nothing changed: {why}"))
                }
            },
            Request::Ready => match self.not_ready() {
                None => Response::message(format!("ready: serving {} services on {}", director.desired().len(), self.config.interface)),
                Some(why) => Response::error(why),
            },
            Request::Withdraw | Request::Announce => self.operator_announce(director, request == Request::Withdraw),
            Request::Simulate { flow } => {
                if self.simulator.is_none() {
                    match director.dataplane().simulator() {
                        Ok(sim) => self.simulator = Some(sim),
                        Err(e) => return Response::error(format!("loading the simulation program: {e}")),
                    }
                }
                let simulator = self.simulator.as_ref().expect("just loaded");
                match crate::simulate::run(director, simulator, &flow) {
                    Ok(simulation) => Response { ok: true, simulation: Some(simulation), ..Default::default() },
                    Err(e) => Response::error(e.to_string()),
                }
            }
        }
    }

    /// What keeps this director from carrying the VIP, if anything. The event loop runs only
    /// once the program is attached and the tables are written.
    fn not_ready(&self) -> Option<String> {
        if let Some(b) = &self.bringup {
            return Some(format!("waiting for the first health checks of {} masters", b.waiting()));
        }
        self.sync.as_ref().and_then(|s| s.not_ready())
    }

    fn update_announce(&mut self, director: &Director) {
        let not_ready = self.not_ready();
        if let Some(announcer) = self.announcer.as_mut() {
            let withdrawn = announcer.withdrawn;
            announcer.set(crate::announce::decide(&crate::announce::live_vips(director.desired()), not_ready.as_deref(), withdrawn));
        }
    }

    /// `mim-lb withdraw` and `mim-lb announce`: kept until the other one, or the daemon stops.
    fn operator_announce(&mut self, director: &Director, withdraw: bool) -> Response {
        let Some(announcer) = self.announcer.as_mut() else {
            return Response::error("this director announces nothing: the configuration has no [announce] section");
        };
        let was = announcer.withdrawn;
        announcer.withdrawn = withdraw;
        self.update_announce(director);
        let table = self.config.announce.map_or(0, |a| a.table);
        let message = match (withdraw, was) {
            (true, false) => {
                info!("operator: withdraw: removing the VIPs' routes from table {table}; forwarding what still arrives");
                format!("withdrawn: the VIPs' routes leave table {table}; this director keeps forwarding what still arrives")
            }
            (true, true) => "already withdrawn".to_owned(),
            (false, true) => {
                info!("operator: announce: the VIPs' routes go back into table {table}");
                format!("announcing again: the routes of the VIPs this director can serve go back into table {table}")
            }
            (false, false) => "not withdrawn: nothing to undo".to_owned(),
        };
        Response::message(message)
    }

    fn admin(&mut self, director: &mut Director, service: &str, backend: IpAddr, admin: Admin) -> Response {
        let key = match director.find_service(service) {
            Ok(key) => key,
            Err(e) => return Response::error(e.to_string()),
        };
        match director.set_admin(&key, backend, admin) {
            Ok(Some(change)) => {
                info!("operator: {change}");
                Response::message(change.to_string())
            }
            Ok(None) => Response::message(format!("backend {backend} of {key} was already {}", admin_word(admin))),
            Err(e) => Response::error(e.to_string()),
        }
    }

    /// Re-reads the file and applies it whole, or changes nothing and says why.
    fn reload(&mut self, director: &mut Director) -> Result<String, String> {
        let config = self.overrides.load(&self.config_path).map_err(|e| format!("{e:#}"))?;
        let old = &self.config;
        let fixed = [
            ("interface", old.interface != config.interface),
            ("xdp_mode", old.xdp_mode != config.xdp_mode),
            ("pin_dir", old.pin_dir != config.pin_dir),
            ("flow_table_size", old.flow_table_size != config.flow_table_size),
            ("max_services", old.max_services != config.max_services),
            ("control_socket", old.control_socket != config.control_socket),
            ("metrics_listen", old.metrics_listen != config.metrics_listen),
            ("sync", old.sync != config.sync),
            // The routing daemon's configuration names the table and the protocol number.
            (
                "announce (table, protocol, or the section itself)",
                old.announce.map(|a| (a.table, a.protocol)) != config.announce.map(|a| (a.table, a.protocol)),
            ),
        ];
        let changed: Vec<&str> = fixed.iter().filter(|(_, c)| *c).map(|(k, _)| *k).collect();
        if !changed.is_empty() {
            return Err(format!("{} cannot change while running; restart mim-lb to change it", changed.join(", ")));
        }
        let report = director.apply_config(&config).map_err(|e| e.to_string())?;
        for change in &report.changes {
            info!("reload: {change}");
        }
        self.config = config;
        if let Some(sync) = self.sync.as_mut() {
            sync.set_idle(self.config.tcp_idle_timeout, self.config.udp_idle_timeout);
        }
        self.refresh_watchers(director);
        Ok(format!(
            "applied {}: {} services; changed tables: {}; removed services: {}",
            self.config_path.display(),
            director.desired().len(),
            if report.changed_services.is_empty() { "none".to_owned() } else { report.changed_services.join(", ") },
            if report.removed_services.is_empty() { "none".to_owned() } else { report.removed_services.join(", ") },
        ))
    }

    fn status(&self, director: &Director) -> Result<status::Status, crate::dataplane::DataplaneError> {
        let now = Instant::now();
        let checks: BTreeMap<(ServiceKey, IpAddr), CheckStatus> = self
            .checks
            .iter()
            .map(|(k, (o, at))| {
                (
                    *k,
                    CheckStatus {
                        ok: o.ok,
                        detail: o.detail.clone(),
                        latency_ms: o.latency.as_secs_f64() * 1e3,
                        age_s: now.duration_since(*at).as_secs_f64(),
                    },
                )
            })
            .collect();
        let mut status = status::collect(
            director,
            &DaemonFacts {
                interface: &self.config.interface,
                xdp_mode: self.mode.to_string(),
                pin_dir: self.config.pin_dir.display().to_string(),
                uptime: self.started.elapsed(),
                checks: &checks,
                held: self.held.as_ref().map(|(at, counts)| (now.duration_since(*at), counts)),
            },
        )?;
        if let (Some(sync), Some(config)) = (&self.sync, &self.config.sync) {
            status.sync = Some(sync.status(director, config.listen));
        }
        status.announce = self.announcer.as_ref().map(|a| a.status());
        Ok(status)
    }
}

fn admin_word(admin: Admin) -> &'static str {
    match admin {
        Admin::Enabled => "enabled",
        Admin::Drained => "drained",
        Admin::Disabled => "disabled",
    }
}

/// Relays the program's rare log events (aya-log) to our logger.
async fn forward_program_log(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns its ring buffer's fd and keeps it open, unchanged, for as long
    // as the AsyncFd owns the logger.
    let registered = unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let Ok(mut fd) = registered else {
        warn!("cannot watch the XDP program's log");
        return;
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else { return };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}
