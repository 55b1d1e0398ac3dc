//! `convnets inspect` and `convnets verify`.

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;
use convnets_formats::verify::{verify as verify_dataset, VerifyOptions};
use convnets_formats::Dataset;

use crate::units::format_bytes;

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Dataset folder.
    pub dataset: PathBuf,
    /// Print the manifest as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn inspect(a: InspectArgs) -> anyhow::Result<()> {
    let ds = Dataset::open(&a.dataset)?;
    let m = ds.manifest();
    if a.json {
        println!("{}", serde_json::to_string_pretty(m)?);
        return Ok(());
    }
    println!("dataset   {}", a.dataset.display());
    println!("format    {} v{}", m.format, m.version);
    let preview: Vec<String> = m
        .classes
        .iter()
        .take(3)
        .map(|c| format!("{} ({})", c.wnid, c.name))
        .collect();
    println!(
        "classes   {}: {}{}",
        m.classes.len(),
        preview.join(", "),
        if m.classes.len() > 3 { ", ..." } else { "" }
    );
    for (name, split) in &m.splits {
        let bytes: u64 = split.shards.iter().map(|s| s.bytes).sum();
        println!(
            "split     {name}: {} records, {} shards, {}",
            split.records,
            split.shards.len(),
            format_bytes(bytes)
        );
    }
    if !m.created_by.is_null() {
        println!("made by   {}", m.created_by);
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Dataset folder.
    pub dataset: PathBuf,
    /// Also decode every image (slow).
    #[arg(long)]
    pub decode: bool,
    /// Worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn verify(a: VerifyArgs) -> anyhow::Result<()> {
    let report = verify_dataset(
        &a.dataset,
        &VerifyOptions {
            decode: a
                .decode
                .then_some(convnets_pack::sanitize::check_stored as _),
            threads: a.threads,
        },
    )?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for d in &report.damage {
            match d.record {
                Some(r) => println!("BAD {} {} record {r}: {}", d.split, d.file, d.reason),
                None => println!("BAD {} {}: {}", d.split, d.file, d.reason),
            }
        }
        println!(
            "checked {} shards, {} records, {}: {}",
            report.shards,
            report.records,
            format_bytes(report.bytes),
            if report.is_clean() {
                "all good".to_string()
            } else {
                format!("{} problems", report.damage.len())
            }
        );
    }
    if !report.is_clean() {
        bail!(
            "{} problems found in {}",
            report.damage.len(),
            a.dataset.display()
        );
    }
    Ok(())
}
