//! The `convnets` command-line tool. `main_with` is the whole program, so tests can run
//! any command in-process exactly as a user would type it.

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
pub mod bench_model;
pub mod checkpoint;
mod dataset_cmds;
pub mod device_arg;
mod devices;
pub mod dist;
pub mod gpu_loader_args;
pub mod memory;
mod pack;
mod page_cache;
mod plot;
pub mod predict;
pub mod source;
pub mod synth;
pub mod torch_ext;
pub mod train;
mod units;
mod weights_cmds;

#[derive(Debug, Parser)]
#[command(
    name = "convnets",
    version,
    about = "Train ResNet-family image classifiers on ImageNet-scale data"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Pack an ImageNet folder or TFRecord folder into a dataset folder of shards.
    PackImagenet(pack::PackArgs),
    /// Print a dataset's manifest summary.
    Inspect(dataset_cmds::InspectArgs),
    /// Check every checksum of a dataset; report damaged shards and records.
    Verify(dataset_cmds::VerifyArgs),
    /// List the GPUs this build can use (needs a build with `--features cuda`).
    Devices(devices::DevicesArgs),
    /// Train a model (the seed's recipe by default).
    Train(train::TrainCommand),
    /// Top-1/top-5 accuracy and loss of a checkpoint on a dataset's val split.
    Eval(train::EvalArgs),
    /// Top-k classes of JPEG files (or folders of them) under a trained checkpoint.
    Predict(predict::PredictArgs),
    /// Turn a torchvision/timm safetensors state_dict into a checkpoint folder.
    ImportWeights(weights_cmds::ImportArgs),
    /// Write a checkpoint's weights as a torchvision/timm safetensors state_dict.
    ExportWeights(weights_cmds::ExportArgs),
    /// Measure throughput (loader-only, ...), as a table or JSON.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Write a small synthetic ImageNet-like JPEG folder whose classes a small CNN can learn.
    Synth(synth::SynthArgs),
    /// Draw a run's training curves (RUN_DIR/log.jsonl) as a PNG.
    Plot(plot::PlotArgs),
    /// Run N local processes of a convnets command as one process group, like torchrun.
    Launch(dist::LaunchArgs),
    /// Self-test of a process group's rendezvous and watchdog (run it under `launch`).
    #[command(hide = true)]
    DistCheck(dist::DistCheckArgs),
}

/// Writes `line` and a newline to stderr in one write, so that the lines of several ranks
/// sharing a terminal or pipe do not interleave (`eprintln!` may write in pieces).
pub fn say(line: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
}

/// An error as the user reads it: the message with its causes, without the C++ stack trace
/// libtorch appends to its own (what `main` prints, and what a failed rank tells the others).
pub fn error_text(e: &anyhow::Error) -> String {
    memory::without_backtrace(&format!("{e:#}"))
}

/// The arguments of the running command (without the program name): what the launcher
/// gives each rank it starts.
static INVOCATION: std::sync::Mutex<Vec<OsString>> = std::sync::Mutex::new(Vec::new());

pub(crate) fn invocation() -> Vec<OsString> {
    INVOCATION.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Runs the tool on `args` (the first item is the program name).
pub fn run<I, T>(args: I) -> anyhow::Result<()>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    *INVOCATION.lock().unwrap_or_else(|p| p.into_inner()) = args.iter().skip(1).cloned().collect();
    // Recipes become flags in front of the user's, which then override them.
    let Some(args) = train::recipes::expand(args)? else {
        return Ok(());
    };
    let cli = Cli::try_parse_from(args)?;
    match cli.command {
        Command::PackImagenet(a) => pack::run(a),
        Command::Inspect(a) => dataset_cmds::inspect(a),
        Command::Verify(a) => dataset_cmds::verify(a),
        Command::Devices(a) => devices::run(a),
        Command::Bench(c) => bench::run(c),
        Command::Train(c) => train::train(c),
        Command::Eval(a) => train::eval(a),
        Command::Predict(a) => predict::run(a),
        Command::ImportWeights(a) => weights_cmds::import(a),
        Command::ExportWeights(a) => weights_cmds::export(a),
        Command::Synth(a) => synth::run(a),
        Command::Plot(a) => plot::run(a),
        Command::Launch(a) => dist::launch_command(a),
        Command::DistCheck(a) => dist::dist_check(a),
    }
}

/// `main`: runs, prints errors with their causes, and maps them to an exit code.
pub fn main_with<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<train::Interrupted>().is_some() => {
            say(&format!("{e}"));
            ExitCode::from(130)
        }
        Err(e) => match e.downcast_ref::<clap::Error>() {
            Some(clap_err) => {
                let _ = clap_err.print();
                ExitCode::from(clap_err.exit_code() as u8)
            }
            None => {
                say(&format!("error: {}", error_text(&e)));
                ExitCode::FAILURE
            }
        },
    }
}
