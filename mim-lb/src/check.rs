//! `mim-lb check`: validate a config and print the plan, without touching the kernel.

use std::fmt::Write as _;

use anyhow::{Context as _, Result};

use crate::{
    cli::CheckArgs,
    config::{Config, format_mac},
    director::maglev_key,
    maglev,
};

pub fn run(args: &CheckArgs) -> Result<()> {
    let config = Config::from_file(&args.config)
        .with_context(|| format!("{} is not a valid mim-lb config", args.config.display()))?;
    print!("{}", plan(&config));
    Ok(())
}

/// A human description of what `run` would set up, including each master's share of its
/// service's Maglev table (the share of new flows it will get).
pub fn plan(config: &Config) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "config OK: interface {} (xdp mode {}), maps pinned under {}, connection table {} flows",
        config.interface,
        config.xdp_mode,
        config.pin_dir.display(),
        config.flow_table_size
    );
    let _ = writeln!(
        out,
        "control socket {}; metrics {}; flows idle out after {} s (tcp) / {} s (udp)",
        config.control_socket.display(),
        config.metrics_listen.map_or("off".to_owned(), |a| format!("on http://{a}/metrics")),
        config.tcp_idle_timeout.as_secs(),
        config.udp_idle_timeout.as_secs()
    );
    if let Some(a) = &config.announce {
        let _ = writeln!(
            out,
            "announce: a route per VIP in kernel table {} (protocol {}) while ready and one of its masters is live; \
             a stop waits {} ms after withdrawing",
            a.table,
            a.protocol,
            a.withdraw_wait.as_millis()
        );
    }
    for service in &config.services {
        let _ = writeln!(
            out,
            "service {}: {} scheduler {} table {} slots",
            service.name,
            service.endpoint(),
            service.scheduler,
            service.table_size
        );
        let h = &service.health;
        let _ = match h.kind {
            crate::config::CheckKind::None => writeln!(out, "  health: none (backends are up once their MAC is known)"),
            _ => writeln!(
                out,
                "  health: {} on port {} every {} ms (timeout {} ms), up after {} passes, down after {} failures; \
                 backends start down until then",
                h.kind.name(),
                h.port_for(service.port),
                h.interval.as_millis(),
                h.timeout.as_millis(),
                h.rise,
                h.fall
            ),
        };
        let _ = writeln!(out, "  {}", describe_slow_start(service.slow_start));
        let _ = writeln!(out, "  {}", describe_flap_damping(&service.flap_damping));
        let keys: Vec<Vec<u8>> = service.backends.iter().map(|b| maglev_key(&b.address)).collect();
        let members: Vec<maglev::MaglevBackend> = service
            .backends
            .iter()
            .zip(&keys)
            .enumerate()
            .map(|(i, (b, k))| maglev::MaglevBackend { id: i as u32 + 1, key: k, weight: b.weight })
            .collect();
        // The share each backend will have once all are up.
        let table = maglev::build(&members, service.table_size);
        for (i, b) in service.backends.iter().enumerate() {
            let slots = table.iter().filter(|id| **id == i as u32 + 1).count();
            let mac = b.mac.as_ref().map(format_mac).unwrap_or_else(|| "from the neighbour table".into());
            let _ = writeln!(
                out,
                "  backend {} mac {} weight {}: {} slots ({:.1}% of new flows)",
                b.address,
                mac,
                b.weight,
                slots,
                100.0 * slots as f64 / service.table_size as f64
            );
        }
        if table.iter().all(|id| *id == 0) {
            let _ = writeln!(out, "  warning: no backend with weight > 0: packets to this service are dropped");
        }
    }
    out
}

fn describe_slow_start(slow_start: std::time::Duration) -> String {
    if slow_start.is_zero() {
        return "slow start: off (a master that comes up takes its full share at once)".into();
    }
    let steps = crate::director::slow_start::STEPS;
    format!(
        "slow start: a master that comes up takes 1/{steps} of its weight, 1/{steps} more every {:.1} s, all of it after {} s",
        slow_start.as_secs_f64() / f64::from(steps),
        slow_start.as_secs()
    )
}

fn describe_flap_damping(d: &crate::config::FlapDamping) -> String {
    if d.max_changes == 0 {
        return "flap damping: off".into();
    }
    format!(
        "flap damping: more than {} health changes within {} s hold a master down for at least {} s",
        d.max_changes,
        d.window.as_secs(),
        d.hold.as_secs()
    )
}
