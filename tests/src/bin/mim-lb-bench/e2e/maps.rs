//! The kernel memory of mim-lb's maps, as the running daemon pinned them: `bpftool -j map show
//! pinned PATH` for every pin in its directory (the kernel's own figure, `bytes_memlock`, which
//! since 6.x is what the map really holds).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use mim_lb_tests::output_within;
use serde_json::Value;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapMemory {
    pub name: String,
    pub kind: String,
    pub max_entries: u64,
    pub key: u64,
    pub value: u64,
    pub bytes: u64,
}

/// Every map pinned in `dir` (other pins, such as the XDP link's, are left out), by name.
pub fn pinned(dir: &Path) -> Result<Vec<MapMemory>> {
    let mut maps = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let mut cmd = Command::new("bpftool");
        cmd.args(["-j", "map", "show", "pinned"]).arg(&path);
        let out = output_within(&mut cmd, Duration::from_secs(20))?;
        if !out.status.success() {
            continue;
        }
        let text = String::from_utf8_lossy(&out.stdout);
        maps.push(parse_map_show(&text).with_context(|| format!("bpftool's answer for {}", path.display()))?);
    }
    maps.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(maps)
}

/// One map from `bpftool -j map show ...`.
pub fn parse_map_show(text: &str) -> Result<MapMemory> {
    let v: Value = serde_json::from_str(text.trim()).context("not JSON")?;
    let num = |k: &str| v.get(k).and_then(Value::as_u64).with_context(|| format!("no {k}"));
    if !v.is_object() {
        bail!("not one map: {}", text.trim());
    }
    let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned).with_context(|| format!("no {k}"));
    Ok(MapMemory {
        name: text("name")?,
        kind: text("type")?,
        max_entries: num("max_entries")?,
        key: num("bytes_key")?,
        value: num("bytes_value")?,
        bytes: num("bytes_memlock")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bpftool_map_json_gives_size_and_memory() {
        // `bpftool -j map show pinned ...` on this machine (bpftool 7.x, kernel 6.18).
        let text = r#"{"id":88580,"type":"percpu_array","name":"SYNC_STATS","flags":0,"bytes_key":4,"bytes_value":8,"max_entries":2,"bytes_memlock":360,"frozen":0,"btf_id":35501}"#;
        assert_eq!(
            parse_map_show(text).unwrap(),
            MapMemory { name: "SYNC_STATS".into(), kind: "percpu_array".into(), max_entries: 2, key: 4, value: 8, bytes: 360 }
        );
        assert!(parse_map_show(r#"{"id":1,"type":"hash"}"#).is_err());
        assert!(parse_map_show("[]").is_err());
        assert!(parse_map_show("Error: bpf obj get").is_err());
    }
}
