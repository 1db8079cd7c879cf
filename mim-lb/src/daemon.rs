//! `mim-lb run`: load, fill, attach, serve until a stop signal, clean up.

use std::path::Path;

use anyhow::{Context as _, Result};
use log::{info, warn};
use tokio::{io::unix::AsyncFd, signal::unix::{SignalKind, signal}};

use crate::{
    cli::{RunArgs, XdpModeArg},
    config::{Config, XdpMode},
    dataplane::{AttachMode, Dataplane, LoadOptions},
    director::Director,
};

pub fn run(args: RunArgs) -> Result<()> {
    let mut config = Config::from_file(&args.config)
        .with_context(|| format!("{} is not a valid mim-lb config", args.config.display()))?;
    if let Some(interface) = args.interface {
        config.interface = interface;
    }
    if let Some(mode) = args.xdp_mode {
        config.xdp_mode = match mode {
            XdpModeArg::Auto => XdpMode::Auto,
            XdpModeArg::Native => XdpMode::Native,
            XdpModeArg::Generic => XdpMode::Generic,
        };
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(serve(config))
}

async fn serve(config: Config) -> Result<()> {
    let gateway_mac = interface_mac(&config.interface)?;
    let dataplane = Dataplane::load(&LoadOptions {
        pin_dir: Some(config.pin_dir.clone()),
        flow_table_size: config.flow_table_size,
    })
    .context("loading the XDP program")?;
    info!("XDP program loaded; maps pinned under {}", config.pin_dir.display());
    // From here on the pins exist: every exit path removes them.
    let mut director = Director::new(dataplane, gateway_mac);
    let result = serve_loaded(&config, &mut director).await;
    let dataplane = director.dataplane_mut();
    if let Err(err) = dataplane.detach() {
        warn!("detaching: {err}");
    }
    if let Err(err) = dataplane.unpin() {
        warn!("removing pins: {err}");
    }
    info!("detached from {} and removed pins under {}", config.interface, config.pin_dir.display());
    result
}

async fn serve_loaded(config: &Config, director: &mut Director) -> Result<()> {
    let report = director.apply(config).context("filling the maps")?;
    info!("maps filled: {} services, {} Maglev entries written", director.services().len(), report.maglev_writes);
    for (key, svc) in director.services() {
        info!("service {} {} -> {} backends", svc.name, key, svc.backends.len());
    }
    let mode = match config.xdp_mode {
        XdpMode::Auto => None,
        XdpMode::Native => Some(AttachMode::Native),
        XdpMode::Generic => Some(AttachMode::Generic),
    };
    let used = director.dataplane_mut().attach(&config.interface, mode)?;
    let logger = director.dataplane_mut().take_logger();
    let log_task = logger.map(|logger| tokio::spawn(forward_program_log(logger)));
    info!(
        "ready: serving {} services on {} in {} mode",
        director.services().len(),
        config.interface,
        used
    );

    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: stopping"),
        _ = int.recv() => info!("SIGINT: stopping"),
    }
    if let Some(task) = log_task {
        task.abort();
    }
    Ok(())
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

/// The MAC address of a local interface, written as source address into forwarded frames.
fn interface_mac(interface: &str) -> Result<[u8; 6]> {
    let path = Path::new("/sys/class/net").join(interface).join("address");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("interface {interface} not found ({})", path.display()))?;
    crate::config::parse_mac(text.trim()).ok_or_else(|| {
        anyhow::anyhow!("interface {interface} has no Ethernet address ({})", text.trim())
    })
}
