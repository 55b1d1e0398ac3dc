//! A local launcher, like torchrun's standalone mode: N copies of this executable as the
//! ranks of one process group, supervised together.

use std::ffi::OsString;
use std::io;
use std::net::TcpListener;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::PEER_FAILED_EXIT_STATUS;

/// After the first failure, how long the other ranks get between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// When the first rank to exit only stopped because another failed (its watchdog's
/// `PEER_FAILED_EXIT_STATUS`), the rank that failed is usually exiting by itself: it gets
/// this long before everyone is stopped, so that the error names it.
const CULPRIT_GRACE: Duration = Duration::from_secs(1);

/// Spawns `nproc` copies of this executable (`std::env::current_exe()`) with `args`, each
/// with `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR=127.0.0.1`
/// and `MASTER_PORT` (a free port), and `CUDA_VISIBLE_DEVICES=gpus_visible[rank]` when
/// given (one entry per rank; left as it is when `None`).
///
/// The ranks run in their own process group, with stdin closed: SIGINT and SIGTERM reach
/// the launcher only, which forwards each to every rank once (so one Ctrl-C is one Ctrl-C
/// for every rank). On Linux a rank gets SIGTERM if the launcher dies.
///
/// Waits for all of them. When one exits non-zero or by a signal, the others are stopped
/// (SIGTERM, then SIGKILL after 5 s) and the error names the rank that failed first, with
/// its exit status or signal; ranks that only stopped because of it (exit status
/// `PEER_FAILED_EXIT_STATUS`) are named only when no other rank failed. `Ok` when every
/// rank exits 0.
pub fn launch(
    nproc: usize,
    args: &[OsString],
    gpus_visible: Option<Vec<String>>,
) -> anyhow::Result<()> {
    if nproc == 0 {
        bail!("launch: the number of processes must be at least 1");
    }
    if args.is_empty() {
        bail!("launch: no command to run (give a convnets command after `--`)");
    }
    if let Some(gpus) = &gpus_visible {
        if gpus.len() != nproc {
            bail!(
                "launch: {} GPU(s) ({}) for {nproc} ranks: give one per rank",
                gpus.len(),
                gpus.join(",")
            );
        }
    }
    let exe = std::env::current_exe().context("launch: finding this executable")?;
    let port = TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .context("launch: finding a free port for the rendezvous")?
        .port();
    // Before the first rank starts, so that no Ctrl-C falls in between.
    let signals =
        ForwardedSignals::install().context("launch: installing the SIGINT/SIGTERM handlers")?;
    let mut children: Vec<Child> = Vec::with_capacity(nproc);
    for rank in 0..nproc {
        let mut command = Command::new(&exe);
        command
            .args(args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", nproc.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("LOCAL_WORLD_SIZE", nproc.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .stdin(Stdio::null())
            .process_group(0);
        if let Some(gpus) = &gpus_visible {
            command.env("CUDA_VISIBLE_DEVICES", &gpus[rank]);
        }
        #[cfg(target_os = "linux")]
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        match command.spawn() {
            Ok(child) => children.push(child),
            Err(e) => {
                for child in &mut children {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                return Err(e)
                    .with_context(|| format!("launch: starting rank {rank} ({})", exe.display()));
            }
        }
    }
    supervise(children, &signals)
}

/// Why a rank exited non-zero, in the order of which one to name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Cause {
    /// It failed by itself.
    Own,
    /// It exited after the launcher had signalled it (forwarded, or stopping everyone).
    Signalled,
    /// Its watchdog stopped it because another rank had failed.
    PeerFailed,
}

/// Waits for every rank (one waiting thread each, so exits are seen in the order they
/// happen), forwards signals, and stops everyone after the first failure.
fn supervise(children: Vec<Child>, signals: &ForwardedSignals) -> anyhow::Result<()> {
    let pids: Vec<libc::pid_t> = children.iter().map(|c| c.id() as libc::pid_t).collect();
    let mut running = vec![true; children.len()];
    let signal_running = |running: &[bool], signal: libc::c_int| {
        for (&pid, _) in pids.iter().zip(running).filter(|(_, &r)| r) {
            // SAFETY: plain syscall; the pid is a child not yet reaped.
            unsafe { libc::kill(pid, signal) };
        }
    };
    // (cause, order, rank, description) of every rank that failed.
    let mut failures: Vec<(Cause, usize, usize, String)> = Vec::new();
    let mut forwarded: Option<libc::c_int> = None;
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel();
        for (rank, mut child) in children.into_iter().enumerate() {
            let tx = tx.clone();
            scope.spawn(move || {
                let status = child.wait();
                let _ = tx.send((rank, status));
            });
        }
        drop(tx);
        let mut signalled = false;
        let mut terminate_at: Option<Instant> = None;
        let mut kill_at: Option<Instant> = None;
        while running.iter().any(|&r| r) {
            for signal in signals.take() {
                signalled = true;
                if failures.is_empty() {
                    signal_running(&running, signal);
                    forwarded = Some(signal);
                } else {
                    // Already stopping: another Ctrl-C means now.
                    signal_running(&running, libc::SIGKILL);
                }
            }
            let now = Instant::now();
            if terminate_at.is_some_and(|t| now >= t) {
                terminate_at = None;
                signalled = true;
                signal_running(&running, libc::SIGTERM);
                kill_at = Some(now + STOP_GRACE);
            }
            if kill_at.is_some_and(|t| now >= t) {
                kill_at = None;
                signal_running(&running, libc::SIGKILL);
            }
            let (rank, status) = match rx.recv_timeout(Duration::from_millis(20)) {
                Ok(exit) => exit,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            running[rank] = false;
            if matches!(&status, Ok(s) if s.success()) {
                continue;
            }
            let cause = if matches!(&status, Ok(s) if s.code() == Some(PEER_FAILED_EXIT_STATUS)) {
                Cause::PeerFailed
            } else if signalled {
                Cause::Signalled
            } else {
                Cause::Own
            };
            if failures.is_empty() {
                let wait = if cause == Cause::PeerFailed {
                    CULPRIT_GRACE
                } else {
                    Duration::ZERO
                };
                terminate_at = Some(now + wait);
            }
            failures.push((cause, failures.len(), rank, describe(&status)));
        }
    });
    let Some((_, _, rank, how)) = failures.iter().min() else {
        return Ok(());
    };
    let after = match forwarded {
        Some(signal) => format!(" after the launcher forwarded {}", signal_name(signal)),
        None => String::new(),
    };
    let others = if pids.len() > 1 {
        "; stopped the other ranks"
    } else {
        ""
    };
    bail!("rank {rank} failed ({how}){after}{others}")
}

/// `exit status 1`, `killed by SIGKILL`, `killed by signal 42`.
fn describe(status: &io::Result<ExitStatus>) -> String {
    match status {
        Err(e) => format!("could not be waited for: {e}"),
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exit status {code}"),
            (None, Some(signal)) => format!("killed by {}", signal_name(signal)),
            _ => s.to_string(),
        },
    }
}

fn signal_name(signal: libc::c_int) -> String {
    let name = match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        _ => return format!("signal {signal}"),
    };
    name.to_string()
}

static PENDING_SIGINT: AtomicU32 = AtomicU32::new(0);
static PENDING_SIGTERM: AtomicU32 = AtomicU32::new(0);

/// While it lives, SIGINT and SIGTERM are counted for forwarding instead of acted on
/// (signal-hook's handlers replace the default action); dropping it unregisters them.
struct ForwardedSignals {
    registered: Vec<signal_hook::SigId>,
}

impl ForwardedSignals {
    fn install() -> io::Result<Self> {
        PENDING_SIGINT.store(0, Ordering::SeqCst);
        PENDING_SIGTERM.store(0, Ordering::SeqCst);
        let mut installed = ForwardedSignals {
            registered: Vec::new(),
        };
        for (signal, pending) in [
            (libc::SIGINT, &PENDING_SIGINT),
            (libc::SIGTERM, &PENDING_SIGTERM),
        ] {
            // SAFETY: the action only increments an atomic, which is async-signal-safe.
            let id = unsafe {
                signal_hook::low_level::register(signal, move || {
                    pending.fetch_add(1, Ordering::SeqCst);
                })
            }?; // on error, drop unregisters those installed
            installed.registered.push(id);
        }
        Ok(installed)
    }

    /// The signals received since the last call (at most two of each kind: a second
    /// Ctrl-C means something to a rank, a tenth does not).
    fn take(&self) -> Vec<libc::c_int> {
        let mut signals = Vec::new();
        for (signal, pending) in [
            (libc::SIGINT, &PENDING_SIGINT),
            (libc::SIGTERM, &PENDING_SIGTERM),
        ] {
            let n = pending.swap(0, Ordering::SeqCst).min(2) as usize;
            signals.extend(std::iter::repeat_n(signal, n));
        }
        signals
    }
}

impl Drop for ForwardedSignals {
    fn drop(&mut self) {
        for id in self.registered.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}
