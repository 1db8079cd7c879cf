//! The kernel memory of every map, at the daemon's defaults, next to the fixed sizes the maps
//! had before they followed the configuration, both loaded in this run: the program is loaded
//! and pinned as the daemon loads it (`daemon::load_options`, every setting at its default,
//! the connection table included), once per configuration, and each pin is read as `bpftool
//! -j map show pinned` reports it (`bytes_memlock`).

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};
use mim_lb::config::Config;
use mim_lb_tests::testrun::ProgramUnderTest;
use serde_json::json;

use crate::e2e::maps::{self, MapMemory};
use crate::report::Section;

/// One TCP service of three masters, every other setting at its default.
fn config(services: u32, head: &str) -> String {
    let mut text = format!("interface = \"lo\"\n{head}\n");
    for i in 0..services {
        text += &format!(
            "[[service]]\nname = \"s{i}\"\nvip = \"10.0.{}.{}\"\nport = 7000\n",
            i / 200,
            1 + i % 200
        );
        for m in 1..=3 {
            text += &format!("[[service.backend]]\naddress = \"10.1.0.{m}\"\nmac = \"02:00:00:00:00:{m:02x}\"\n");
        }
    }
    text
}

/// The maps of the program loaded for `text`, as the daemon would load it.
fn loaded(text: &str) -> Result<(u32, Vec<MapMemory>)> {
    let parsed = Config::parse(text).map_err(|e| anyhow::anyhow!("bench config: {e}"))?;
    let prog = ProgramUnderTest::pinned_with_flow_table(text, parsed.flow_table_size)?;
    let dir = prog.pin_dir().context("pinned")?;
    Ok((prog.director.dataplane().service_room(), maps::pinned(dir)?))
}

fn kib(bytes: u64) -> String {
    format!("{:.0}", bytes as f64 / 1024.0)
}

pub fn measure() -> Result<Section> {
    // (label, services configured, top-level keys)
    let runs: [(&str, u32, String); 3] = [
        ("default, 1 service", 1, String::new()),
        ("default, 10 services", 10, String::new()),
        (
            "old fixed sizes (room for 64 services), 1 service",
            1,
            format!("max_services = {}", mim_lb_common::limits::MAX_SERVICES),
        ),
    ];
    let mut measured = Vec::new();
    for (label, services, head) in &runs {
        let (room, maps) = loaded(&config(*services, head)).with_context(|| format!("loading for {label}"))?;
        measured.push((*label, room, maps));
    }
    let by_name = |maps: &[MapMemory]| -> BTreeMap<String, MapMemory> {
        maps.iter().map(|m| (m.name.clone(), m.clone())).collect()
    };
    let (default, ten, old) = (by_name(&measured[0].2), by_name(&measured[1].2), by_name(&measured[2].2));
    let mut section = Section::new(
        "map memory: sized from the configuration vs the old fixed sizes",
        &["map", "type", "entries (default, 1 service)", "KiB (default, 1 service)", "KiB (default, 10 services)", "KiB (old fixed sizes)"],
    );
    section.method = vec![format!(
        "The program loaded and pinned as the daemon loads it (`daemon::load_options`: flow_table_size {}, every other setting at its \
         default), for one TCP service of 3 masters (room for {} services by the default rule), for ten (room for {}), and for one \
         with max_services = 64, the fixed layout every config had before (MAGLEV, SLOT_SEEN and MAGLEV_OLD for 64 services of \
         65,537 slots). Kernel memory from `bpftool -j map show pinned` (bytes_memlock), all three loaded in this run.",
        mim_lb_common::limits::DEFAULT_FLOW_TABLE_SIZE,
        measured[0].1,
        measured[1].1,
    )];
    let missing = || MapMemory { name: String::new(), kind: String::new(), max_entries: 0, key: 0, value: 0, bytes: 0 };
    for (name, m) in &default {
        let t = ten.get(name).cloned().unwrap_or_else(missing);
        let o = old.get(name).cloned().unwrap_or_else(missing);
        section.row(vec![name.clone(), m.kind.clone(), m.max_entries.to_string(), kib(m.bytes), kib(t.bytes), kib(o.bytes)]);
    }
    let total = |maps: &BTreeMap<String, MapMemory>| maps.values().map(|m| m.bytes).sum::<u64>();
    section.row(vec![
        "all maps".into(),
        String::new(),
        String::new(),
        kib(total(&default)),
        kib(total(&ten)),
        kib(total(&old)),
    ]);
    section.notes.push(format!(
        "At the defaults with one service the maps hold {:.1} MiB; with the old fixed sizes {:.1} MiB ({:.2}x).",
        total(&default) as f64 / 1048576.0,
        total(&old) as f64 / 1048576.0,
        total(&default) as f64 / total(&old) as f64,
    ));
    section.json = json!(measured
        .iter()
        .map(|(label, room, maps)| json!({
            "config": label,
            "service_room": room,
            "total_bytes": maps.iter().map(|m| m.bytes).sum::<u64>(),
            "maps": maps.iter().map(|m| json!({"name": m.name, "type": m.kind, "max_entries": m.max_entries, "bytes": m.bytes})).collect::<Vec<_>>(),
        }))
        .collect::<Vec<_>>());
    Ok(section)
}
