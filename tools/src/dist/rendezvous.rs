//! The TCP rendezvous of a process group and its control channel.
//!
//! Rank 0 listens on `MASTER_ADDR:MASTER_PORT`; every other rank connects to it (a star),
//! says hello, and receives the payload rank 0 made (the NCCL unique id; opaque here). The
//! connections then stay open as a control channel: a rank that dies closes its socket,
//! which its watchdog's peer sees at once, and failures are announced explicitly.
//!
//! Wire protocol (version 1). Every message is a frame: a little-endian u32 length `n`
//! (1 to 64 MiB), then `n` bytes whose first is the kind:
//!
//! | kind | name    | rest of the frame                                  | direction       |
//! |------|---------|----------------------------------------------------|-----------------|
//! | 1    | HELLO   | magic `CNVR`, u16 version, u32 rank, u32 world size | peer -> rank 0  |
//! | 2    | PAYLOAD | the payload bytes                                  | rank 0 -> peer  |
//! | 3    | REFUSE  | UTF-8: why rank 0 ends the rendezvous              | rank 0 -> peer  |
//! | 4    | FAILURE | u32 failed rank, UTF-8 message naming it           | both ways       |
//! | 5    | DONE    | nothing: the sender finished in order              | both ways       |
//!
//! A connection that closes after DONE is an orderly end; one that closes without it means
//! the process died. Rank 0 relays every failure it learns of to the other peers, so each
//! rank only ever watches its connection(s) to the star's centre.

use std::io::{self, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs,
};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

use super::env::DistEnv;

const MAGIC: [u8; 4] = *b"CNVR";
/// Bumped whenever a frame changes meaning; ranks of different versions refuse each other.
pub const PROTOCOL_VERSION: u16 = 1;
const MAX_FRAME: usize = 64 << 20;

const HELLO: u8 = 1;
const PAYLOAD: u8 = 2;
const REFUSE: u8 = 3;
const FAILURE: u8 = 4;
const DONE: u8 = 5;

/// How long rank 0 waits for the hello of a connection before taking it for a stranger.
const HELLO_WAIT: Duration = Duration::from_secs(10);
/// Peers wait this much longer than their timeout for the payload, so that rank 0's own
/// timeout (which names the missing ranks) reaches them first.
const PAYLOAD_GRACE: Duration = Duration::from_secs(5);
/// A control message that cannot be written in this time is given up (the peer is stuck).
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// At `finish`, how long to wait for the other side's own end of the connection.
const FINISH_DRAIN: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Message {
    Hello {
        version: u16,
        rank: u32,
        world_size: u32,
    },
    Payload(Vec<u8>),
    Refuse(String),
    Failure {
        rank: u32,
        message: String,
    },
    Done,
}

impl Message {
    /// The whole frame, length included, so that one `write_all` sends it.
    fn frame(&self) -> Vec<u8> {
        let mut body = Vec::new();
        match self {
            Message::Hello {
                version,
                rank,
                world_size,
            } => {
                body.push(HELLO);
                body.extend_from_slice(&MAGIC);
                body.extend_from_slice(&version.to_le_bytes());
                body.extend_from_slice(&rank.to_le_bytes());
                body.extend_from_slice(&world_size.to_le_bytes());
            }
            Message::Payload(p) => {
                body.push(PAYLOAD);
                body.extend_from_slice(p);
            }
            Message::Refuse(why) => {
                body.push(REFUSE);
                body.extend_from_slice(why.as_bytes());
            }
            Message::Failure { rank, message } => {
                body.push(FAILURE);
                body.extend_from_slice(&rank.to_le_bytes());
                body.extend_from_slice(message.as_bytes());
            }
            Message::Done => body.push(DONE),
        }
        let mut frame = Vec::with_capacity(4 + body.len());
        frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
        frame.extend_from_slice(&body);
        frame
    }

    /// A frame's body (kind byte first).
    fn decode(body: &[u8]) -> Result<Message, String> {
        let (&kind, rest) = body.split_first().ok_or("empty frame")?;
        let u32_at = |i: usize| -> Result<u32, String> {
            rest.get(i..i + 4)
                .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
                .ok_or_else(|| format!("frame of kind {kind} too short"))
        };
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        Ok(match kind {
            HELLO => {
                if rest.get(..4) != Some(&MAGIC[..]) {
                    return Err("not a convnets rank (bad magic)".into());
                }
                let version = rest.get(4..6).ok_or("hello too short")?;
                Message::Hello {
                    version: u16::from_le_bytes([version[0], version[1]]),
                    rank: u32_at(6)?,
                    world_size: u32_at(10)?,
                }
            }
            PAYLOAD => Message::Payload(rest.to_vec()),
            REFUSE => Message::Refuse(text(rest)),
            FAILURE => Message::Failure {
                rank: u32_at(0)?,
                message: text(&rest[4..]),
            },
            DONE => Message::Done,
            k => return Err(format!("unknown frame kind {k}")),
        })
    }
}

fn frame_length(prefix: [u8; 4]) -> io::Result<usize> {
    let n = u32::from_le_bytes(prefix) as usize;
    if n == 0 || n > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame length {n} out of range"),
        ));
    }
    Ok(n)
}

/// One message from a blocking stream (read timeouts surface as `WouldBlock`/`TimedOut`).
fn read_message(mut stream: &TcpStream) -> io::Result<Message> {
    let mut prefix = [0; 4];
    stream.read_exact(&mut prefix)?;
    let mut body = vec![0; frame_length(prefix)?];
    stream.read_exact(&mut body)?;
    Message::decode(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Bytes read so far from a control connection, cut into messages as they complete.
#[derive(Default)]
struct FrameBuffer {
    bytes: Vec<u8>,
}

impl FrameBuffer {
    fn next(&mut self) -> Option<Result<Message, String>> {
        let prefix: [u8; 4] = self.bytes.get(..4)?.try_into().expect("4 bytes");
        let n = match frame_length(prefix) {
            Ok(n) => n,
            Err(e) => return Some(Err(e.to_string())),
        };
        if self.bytes.len() < 4 + n {
            return None;
        }
        let message = Message::decode(&self.bytes[4..4 + n]);
        self.bytes.drain(..4 + n);
        Some(message)
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// `60 s`, `0.5 s`.
fn seconds(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0} s")
    } else {
        format!("{s} s")
    }
}

/// A socket to another rank. Writes hold the lock so frames from two threads (the
/// watchdog relaying, the training loop reporting) never interleave.
struct Link {
    rank: usize,
    stream: TcpStream,
    write: Mutex<()>,
}

impl Link {
    fn new(rank: usize, stream: TcpStream) -> io::Result<Link> {
        stream.set_nodelay(true)?;
        stream.set_read_timeout(None)?;
        stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
        Ok(Link {
            rank,
            stream,
            write: Mutex::new(()),
        })
    }

    fn send(&self, message: &Message) -> io::Result<()> {
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        (&self.stream).write_all(&message.frame())
    }
}

/// What the group's threads share.
struct Shared {
    /// Rank 0: one link per peer, by rank. Other ranks: the link to rank 0.
    links: Vec<Link>,
    /// Set once this rank has finished or failed by itself: from then on the watchdog
    /// reports nothing (and `on_failure` runs at most once).
    quiet: AtomicBool,
}

struct Watchdog {
    thread: JoinHandle<()>,
    /// Written to (or dropped) to stop the thread.
    wake: UnixStream,
}

/// A process group after its rendezvous: the control connections to the other ranks.
/// Dropping it without [`Group::finish`] closes them, which the other ranks take as this
/// rank's failure.
pub struct Group {
    pub env: DistEnv,
    shared: Arc<Shared>,
    watchdog: Option<Watchdog>,
}

/// Meets the other ranks of `env`'s group and shares `payload` (called on rank 0 only,
/// once every rank is there) with them. Rank 0 listens on `MASTER_ADDR:MASTER_PORT` (on
/// that address when it is a loopback one, else on every interface) and waits up to
/// `timeout` for all ranks; the others retry connecting for up to `timeout`. Errors say
/// which ranks did not come, or which rank disagrees about the group, and why.
pub fn rendezvous(
    env: &DistEnv,
    payload: impl FnOnce() -> anyhow::Result<Vec<u8>>,
    timeout: Duration,
) -> anyhow::Result<(Vec<u8>, Group)> {
    if env.rank >= env.world_size {
        bail!(
            "rank {} of a group of {}: no such rank",
            env.rank,
            env.world_size
        );
    }
    let (payload, links) = if env.rank == 0 {
        serve(env, payload, timeout)?
    } else {
        join(env, timeout)?
    };
    let shared = Arc::new(Shared {
        links,
        quiet: AtomicBool::new(false),
    });
    Ok((
        payload,
        Group {
            env: env.clone(),
            shared,
            watchdog: None,
        },
    ))
}

pub(crate) fn address(env: &DistEnv) -> String {
    if env.master_addr.contains(':') {
        format!("[{}]:{}", env.master_addr, env.master_port)
    } else {
        format!("{}:{}", env.master_addr, env.master_port)
    }
}

/// Where rank 0 listens: MASTER_ADDR itself when it is a loopback address (a local run
/// stays off the network), else every interface, as MASTER_ADDR may name a NAT or alias.
pub(crate) fn listen_address(env: &DistEnv) -> SocketAddr {
    let resolved: Vec<SocketAddr> = (env.master_addr.as_str(), env.master_port)
        .to_socket_addrs()
        .map(|a| a.collect())
        .unwrap_or_default();
    if let Some(loopback) = resolved.iter().find(|a| a.ip().is_loopback()) {
        return *loopback;
    }
    let any: IpAddr = if !resolved.is_empty() && resolved.iter().all(|a| a.is_ipv6()) {
        Ipv6Addr::UNSPECIFIED.into()
    } else {
        Ipv4Addr::UNSPECIFIED.into()
    };
    SocketAddr::new(any, env.master_port)
}

/// Tells every connected peer why the rendezvous ends (best effort) and returns the error.
fn refuse_all(
    peers: &[Option<TcpStream>],
    extra: Option<&TcpStream>,
    why: String,
) -> anyhow::Error {
    let frame = Message::Refuse(why.clone()).frame();
    for mut stream in peers.iter().flatten().chain(extra) {
        let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
        let _ = stream.write_all(&frame);
    }
    anyhow!(why)
}

/// Rank 0's side.
fn serve(
    env: &DistEnv,
    payload: impl FnOnce() -> anyhow::Result<Vec<u8>>,
    timeout: Duration,
) -> anyhow::Result<(Vec<u8>, Vec<Link>)> {
    let addr = address(env);
    let local = listen_address(env);
    let listener = TcpListener::bind(local).with_context(|| {
        format!("rendezvous at {addr}: rank 0 cannot listen on {local} (is another run using MASTER_PORT?)")
    })?;
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    // peers[r]: rank r's connection (r >= 1) and where it came from.
    let mut peers: Vec<Option<TcpStream>> = (0..env.world_size).map(|_| None).collect();
    let mut origins: Vec<Option<SocketAddr>> = vec![None; env.world_size];
    let mut missing = env.world_size - 1;
    while missing > 0 {
        let (stream, from) = match listener.accept() {
            Ok(s) => s,
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                if Instant::now() >= deadline {
                    let absent: Vec<usize> = (1..env.world_size)
                        .filter(|&r| peers[r].is_none())
                        .collect();
                    let why = format!(
                        "rendezvous at {addr}: ranks {absent:?} did not connect within {}",
                        seconds(timeout)
                    );
                    return Err(refuse_all(&peers, None, why));
                }
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(e) => {
                return Err(refuse_all(
                    &peers,
                    None,
                    format!("rendezvous at {addr}: accepting a connection: {e}"),
                ))
            }
        };
        // Accepted sockets may inherit non-blocking mode on some systems.
        stream.set_nonblocking(false)?;
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_millis(100), HELLO_WAIT);
        stream.set_read_timeout(Some(wait))?;
        let (version, rank, world_size) = match read_message(&stream) {
            Ok(Message::Hello {
                version,
                rank,
                world_size,
            }) => (version, rank as usize, world_size as usize),
            Ok(other) => {
                eprintln!(
                    "rendezvous at {addr}: ignoring {from}: sent {other:?} instead of a hello"
                );
                continue;
            }
            Err(e) => {
                eprintln!("rendezvous at {addr}: ignoring {from}: no hello from it ({e})");
                continue;
            }
        };
        let problem = if version != PROTOCOL_VERSION {
            Some(format!(
                "rank {rank} speaks rendezvous protocol {version}, rank 0 speaks {PROTOCOL_VERSION} (different convnets builds?)"
            ))
        } else if world_size != env.world_size {
            Some(format!(
                "rank {rank} says the world has {world_size} processes, rank 0 has {}",
                env.world_size
            ))
        } else if rank == 0 || rank >= env.world_size {
            Some(format!(
                "the process at {from} says it is rank {rank}; besides rank 0 the world of {} has ranks 1 to {}",
                env.world_size,
                env.world_size - 1
            ))
        } else if peers[rank].is_some() {
            Some(format!(
                "two processes say they are rank {rank} (at {} and at {from})",
                origins[rank].map_or("?".to_string(), |a| a.to_string())
            ))
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(refuse_all(
                &peers,
                Some(&stream),
                format!("rendezvous at {addr}: {problem}"),
            ));
        }
        peers[rank] = Some(stream);
        origins[rank] = Some(from);
        missing -= 1;
    }
    drop(listener);

    let payload = match payload() {
        Ok(p) if p.len() < MAX_FRAME => p,
        Ok(p) => {
            return Err(refuse_all(
                &peers,
                None,
                format!("rendezvous payload of {} bytes is too large", p.len()),
            ))
        }
        Err(e) => {
            let _ = refuse_all(
                &peers,
                None,
                format!("rank 0 could not make the rendezvous payload: {e:#}"),
            );
            return Err(e.context("rank 0 could not make the rendezvous payload"));
        }
    };
    let frame = Message::Payload(payload.clone()).frame();
    let mut links = Vec::with_capacity(env.world_size - 1);
    for (rank, stream) in peers.into_iter().enumerate().skip(1) {
        let link = Link::new(rank, stream.expect("every rank joined"))?;
        (&link.stream)
            .write_all(&frame)
            .with_context(|| format!("rendezvous at {addr}: sending the payload to rank {rank}"))?;
        links.push(link);
    }
    Ok((payload, links))
}

/// A peer's side.
fn join(env: &DistEnv, timeout: Duration) -> anyhow::Result<(Vec<u8>, Vec<Link>)> {
    let addr = address(env);
    let rank = env.rank;
    let deadline = Instant::now() + timeout;
    let stream = loop {
        let attempt = (env.master_addr.as_str(), env.master_port)
            .to_socket_addrs()
            .and_then(|addrs| {
                let mut last =
                    io::Error::new(io::ErrorKind::NotFound, "the name resolves to no address");
                for a in addrs {
                    let wait = deadline
                        .saturating_duration_since(Instant::now())
                        .clamp(Duration::from_millis(10), Duration::from_secs(2));
                    match TcpStream::connect_timeout(&a, wait) {
                        Ok(s) => return Ok(s),
                        Err(e) => last = e,
                    }
                }
                Err(last)
            });
        match attempt {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => {
                bail!(
                    "rank {rank}: rank 0 was not reachable at {addr} within {} (last error: {e})",
                    seconds(timeout)
                )
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    stream.set_nodelay(true)?;
    let hello = Message::Hello {
        version: PROTOCOL_VERSION,
        rank: rank as u32,
        world_size: env.world_size as u32,
    };
    (&stream)
        .write_all(&hello.frame())
        .with_context(|| format!("rank {rank}: saying hello to rank 0 at {addr}"))?;
    // Rank 0 answers once the last rank is there, or when its own timeout ends.
    stream.set_read_timeout(Some(timeout + PAYLOAD_GRACE))?;
    let payload = match read_message(&stream) {
        Ok(Message::Payload(p)) => p,
        Ok(Message::Refuse(why)) => bail!("rank {rank}: rank 0 ended the rendezvous: {why}"),
        Ok(other) => bail!("rank {rank}: unexpected {other:?} from rank 0 at {addr} during the rendezvous"),
        Err(e) if is_timeout(&e) => bail!(
            "rank {rank}: connected to rank 0 at {addr}, but the rendezvous did not complete within {}",
            seconds(timeout + PAYLOAD_GRACE)
        ),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            bail!("rank {rank}: rank 0 at {addr} closed the connection during the rendezvous (did it fail?)")
        }
        Err(e) => bail!("rank {rank}: rendezvous with rank 0 at {addr}: {e}"),
    };
    Ok((payload, vec![Link::new(0, stream)?]))
}

impl Group {
    /// Starts a watchdog thread: when the control connection of a rank it watches closes
    /// without a DONE (the process died) or that rank reports a failure, `on_failure` is
    /// called once with a message naming the failed rank ("rank 1 exited or lost its
    /// connection", "rank 1 failed: REASON"). Rank 0 watches every peer and first tells
    /// the others which rank failed; the others watch rank 0 (and hear from it about the
    /// rest). Nothing is reported after this rank's own `finish` or `report_failure`. The
    /// intended `on_failure` aborts NCCL and exits the process.
    pub fn watch(&mut self, on_failure: impl Fn(&str) + Send + 'static) -> anyhow::Result<()> {
        if self.watchdog.is_some() {
            bail!("the group's watchdog is already running");
        }
        let (wake, wake_rx) = UnixStream::pair().context("watchdog wake-up socket")?;
        let shared = self.shared.clone();
        let me = self.env.rank;
        let thread = std::thread::Builder::new()
            .name("dist-watchdog".into())
            .spawn(move || watchdog(me, &shared, &wake_rx, on_failure))
            .context("starting the group's watchdog thread")?;
        self.watchdog = Some(Watchdog { thread, wake });
        Ok(())
    }

    /// Tells every other rank that this rank failed with `reason` (best effort), e.g. on a
    /// NaN divergence, before exiting. They stop with a message naming this rank.
    pub fn report_failure(&self, reason: &str) {
        self.shared.quiet.store(true, Ordering::SeqCst);
        let rank = self.env.rank;
        let message = Message::Failure {
            rank: rank as u32,
            message: format!("rank {rank} failed: {reason}"),
        };
        for link in &self.shared.links {
            let _ = link.send(&message);
        }
    }

    /// Orderly shutdown at the end of a run: tells the other ranks this one is done, so
    /// that its closing connections are not taken for a failure. Waits briefly (up to 2 s)
    /// for the other side to close too, so neither close turns into a reset.
    pub fn finish(mut self) {
        self.shared.quiet.store(true, Ordering::SeqCst);
        self.stop_watchdog();
        for link in &self.shared.links {
            let _ = link.send(&Message::Done);
            let _ = link.stream.shutdown(Shutdown::Write);
        }
        drain(&self.shared.links, Instant::now() + FINISH_DRAIN);
    }

    fn stop_watchdog(&mut self) {
        if let Some(Watchdog { thread, wake }) = self.watchdog.take() {
            let _ = (&wake).write_all(&[1]);
            drop(wake);
            let _ = thread.join();
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.stop_watchdog();
    }
}

/// Reads and discards what the other sides send until each closes, or until `deadline`.
fn drain(links: &[Link], deadline: Instant) {
    let mut open: Vec<&Link> = links.iter().collect();
    let mut chunk = [0u8; 4096];
    while !open.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        let mut fds: Vec<libc::pollfd> = open
            .iter()
            .map(|l| libc::pollfd {
                fd: l.stream.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of pollfd of the given length.
        let n = unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                left.as_millis().max(1) as i32,
            )
        };
        if n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return;
        }
        let mut still = Vec::with_capacity(open.len());
        for (link, fd) in open.iter().zip(&fds) {
            if fd.revents == 0 {
                still.push(*link);
                continue;
            }
            match (&link.stream).read(&mut chunk) {
                Ok(0) => {}
                Ok(_) => still.push(*link),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => still.push(*link),
                Err(_) => {}
            }
        }
        open = still;
    }
}

/// The watchdog thread: polls the control connections and the wake-up socket.
fn watchdog(me: usize, shared: &Shared, wake: &UnixStream, on_failure: impl Fn(&str)) {
    let links = &shared.links;
    let mut buffers: Vec<FrameBuffer> = links.iter().map(|_| FrameBuffer::default()).collect();
    let mut done = vec![false; links.len()];
    let mut chunk = [0u8; 4096];
    loop {
        // Everyone watched has finished in order: nothing left to watch.
        if done.iter().all(|&d| d) {
            return;
        }
        let watched: Vec<usize> = (0..links.len()).filter(|&i| !done[i]).collect();
        let mut fds: Vec<libc::pollfd> = watched
            .iter()
            .map(|&i| libc::pollfd {
                fd: links[i].stream.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        fds.push(libc::pollfd {
            fd: wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        // SAFETY: `fds` is a valid array of pollfd of the given length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if fds.last().is_some_and(|w| w.revents != 0) {
            return; // stopped by finish or drop
        }
        let mut failure: Option<(usize, String)> = None;
        for (&i, fd) in watched.iter().zip(&fds) {
            if fd.revents == 0 || failure.is_some() {
                continue;
            }
            let rank = links[i].rank;
            match (&links[i].stream).read(&mut chunk) {
                Ok(0) => {
                    failure = Some((rank, format!("rank {rank} exited or lost its connection")))
                }
                Ok(n) => {
                    buffers[i].bytes.extend_from_slice(&chunk[..n]);
                    // Each message ends the watch of this link: DONE (the close that
                    // follows is expected) or a failure; until one is whole, keep polling.
                    failure = match buffers[i].next() {
                        None => None,
                        Some(Ok(Message::Done)) => {
                            done[i] = true;
                            None
                        }
                        Some(Ok(Message::Failure {
                            rank: failed,
                            message,
                        })) => Some((failed as usize, message)),
                        Some(Ok(other)) => Some((
                            rank,
                            format!(
                                "rank {rank} sent an unexpected {other:?} on the control channel"
                            ),
                        )),
                        Some(Err(e)) => Some((
                            rank,
                            format!("rank {rank} sent a malformed control message ({e})"),
                        )),
                    };
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted || is_timeout(&e) => {}
                Err(e) => {
                    failure = Some((
                        rank,
                        format!("rank {rank} exited or lost its connection ({e})"),
                    ))
                }
            }
        }
        if let Some((failed, message)) = failure {
            if me == 0 {
                let relay = Message::Failure {
                    rank: failed as u32,
                    message: message.clone(),
                };
                for link in links.iter().filter(|l| l.rank != failed) {
                    let _ = link.send(&relay);
                }
            }
            if !shared.quiet.swap(true, Ordering::SeqCst) {
                on_failure(&message);
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::thread;

    use super::*;

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port()
    }

    fn env(rank: usize, world_size: usize, port: u16) -> DistEnv {
        DistEnv {
            rank,
            world_size,
            local_rank: rank,
            local_world_size: Some(world_size),
            master_addr: "127.0.0.1".into(),
            master_port: port,
        }
    }

    fn payload() -> anyhow::Result<Vec<u8>> {
        Ok((0..128u8).collect())
    }

    /// Every rank of a world of `n` meets in its own thread; results by rank.
    fn meet(n: usize, timeout: Duration) -> Vec<anyhow::Result<(Vec<u8>, Group)>> {
        let port = free_port();
        let handles: Vec<_> = (0..n)
            .map(|r| thread::spawn(move || rendezvous(&env(r, n, port), payload, timeout)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    }

    /// A group of `n` whose every rank got rank 0's payload.
    fn groups(n: usize) -> Vec<Group> {
        let met = meet(n, Duration::from_secs(20))
            .into_iter()
            .map(|r| r.expect("rendezvous"));
        met.map(|(p, g)| {
            assert_eq!(p, payload().unwrap(), "rank {}", g.env.rank);
            g
        })
        .collect()
    }

    /// Watches `group`, sending each failure message to the returned receiver.
    fn watched(group: &mut Group) -> mpsc::Receiver<String> {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        group
            .watch(move |m| tx.lock().unwrap().send(m.to_string()).unwrap())
            .expect("watch");
        rx
    }

    #[test]
    fn frames_round_trip() {
        let messages = [
            Message::Hello {
                version: 1,
                rank: 3,
                world_size: 8,
            },
            Message::Payload(vec![0, 1, 2, 255]),
            Message::Payload(vec![]),
            Message::Refuse("no".into()),
            Message::Failure {
                rank: 2,
                message: "rank 2 failed: NaN".into(),
            },
            Message::Done,
        ];
        let mut buffer = FrameBuffer::default();
        for m in &messages {
            buffer.bytes.extend_from_slice(&m.frame());
        }
        for m in &messages {
            assert_eq!(buffer.next(), Some(Ok(m.clone())));
        }
        assert_eq!(buffer.next(), None);
        buffer.bytes.extend_from_slice(&[0, 0, 0, 0]);
        assert!(matches!(buffer.next(), Some(Err(_))));
    }

    #[test]
    fn every_rank_gets_rank_zeros_payload_and_finish_is_quiet() {
        let mut groups = groups(3);
        let failures: Vec<_> = groups.iter_mut().map(watched).collect();
        let finishing: Vec<_> = groups
            .into_iter()
            .map(|g| thread::spawn(move || g.finish()))
            .collect();
        for f in finishing {
            f.join().unwrap();
        }
        for (rank, rx) in failures.iter().enumerate() {
            assert_eq!(
                rx.recv_timeout(Duration::from_millis(300)).ok(),
                None,
                "rank {rank}"
            );
        }
    }

    #[test]
    fn a_rank_that_finishes_early_is_not_a_failure() {
        let mut groups = groups(3);
        let failures: Vec<_> = groups.iter_mut().map(watched).collect();
        let last = groups.pop().unwrap();
        let first_two: Vec<_> = groups
            .into_iter()
            .map(|g| thread::spawn(move || g.finish()))
            .collect();
        thread::sleep(Duration::from_millis(200));
        last.finish();
        for f in first_two {
            f.join().unwrap();
        }
        for rx in &failures {
            assert_eq!(rx.recv_timeout(Duration::from_millis(200)).ok(), None);
        }
    }

    #[test]
    fn a_dead_peer_is_named_to_every_rank() {
        let mut groups = groups(3);
        let failures: Vec<_> = groups.iter_mut().map(watched).collect();
        drop(groups.pop()); // rank 2 goes away without finishing
        for (rank, rx) in failures.iter().enumerate().take(2) {
            let m = rx.recv_timeout(Duration::from_secs(10)).expect("a failure");
            assert_eq!(m, "rank 2 exited or lost its connection", "rank {rank}");
        }
    }

    #[test]
    fn a_dead_rank_zero_is_named_to_every_rank() {
        let mut groups = groups(3);
        let failures: Vec<_> = groups.iter_mut().map(watched).collect();
        drop(groups.remove(0));
        for (rank, rx) in failures.iter().enumerate().skip(1) {
            let m = rx.recv_timeout(Duration::from_secs(10)).expect("a failure");
            assert_eq!(m, "rank 0 exited or lost its connection", "rank {rank}");
        }
    }

    #[test]
    fn a_reported_failure_reaches_every_rank_once() {
        let mut groups = groups(3);
        let failures: Vec<_> = groups.iter_mut().map(watched).collect();
        groups[1].report_failure("loss is NaN");
        drop(groups.remove(1));
        for rank in [0, 2] {
            let m = failures[rank]
                .recv_timeout(Duration::from_secs(10))
                .expect("a failure");
            assert_eq!(m, "rank 1 failed: loss is NaN", "rank {rank}");
            assert_eq!(
                failures[rank].recv_timeout(Duration::from_millis(200)).ok(),
                None,
                "only once"
            );
        }
        assert_eq!(
            failures[1].recv_timeout(Duration::from_millis(200)).ok(),
            None,
            "the reporter stays quiet"
        );
    }

    #[test]
    fn missing_ranks_are_named() {
        let port = free_port();
        let zero = thread::spawn(move || {
            rendezvous(&env(0, 4, port), payload, Duration::from_millis(1500))
        });
        let two =
            thread::spawn(move || rendezvous(&env(2, 4, port), payload, Duration::from_secs(20)));
        let e = format!("{:#}", zero.join().unwrap().err().expect("rank 0 fails"));
        assert_eq!(
            e,
            format!("rendezvous at 127.0.0.1:{port}: ranks [1, 3] did not connect within 1.5 s")
        );
        let e = format!(
            "{:#}",
            two.join().unwrap().err().expect("rank 2 is refused")
        );
        assert!(e.contains("ranks [1, 3] did not connect"), "{e}");
    }

    #[test]
    fn disagreeing_world_sizes_are_refused() {
        let port = free_port();
        let zero =
            thread::spawn(move || rendezvous(&env(0, 2, port), payload, Duration::from_secs(20)));
        let three =
            thread::spawn(move || rendezvous(&env(3, 4, port), payload, Duration::from_secs(20)));
        let e = format!("{:#}", zero.join().unwrap().err().expect("rank 0 fails"));
        assert!(
            e.ends_with("rank 3 says the world has 4 processes, rank 0 has 2"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            three.join().unwrap().err().expect("rank 3 is refused")
        );
        assert!(
            e.contains("rank 3 says the world has 4 processes, rank 0 has 2"),
            "{e}"
        );
    }

    #[test]
    fn duplicate_ranks_are_refused() {
        let port = free_port();
        let zero =
            thread::spawn(move || rendezvous(&env(0, 3, port), payload, Duration::from_secs(20)));
        let ones: Vec<_> = (0..2)
            .map(|_| {
                thread::spawn(move || {
                    rendezvous(&env(1, 3, port), payload, Duration::from_secs(20))
                })
            })
            .collect();
        let e = format!("{:#}", zero.join().unwrap().err().expect("rank 0 fails"));
        assert!(e.contains("two processes say they are rank 1"), "{e}");
        for one in ones {
            assert!(one.join().unwrap().is_err());
        }
    }

    #[test]
    fn an_absent_rank_zero_is_reported() {
        let port = free_port();
        let e = rendezvous(&env(1, 2, port), payload, Duration::from_millis(300))
            .err()
            .expect("no rank 0");
        let e = format!("{e:#}");
        assert!(
            e.starts_with(&format!(
                "rank 1: rank 0 was not reachable at 127.0.0.1:{port} within 0.3 s"
            )),
            "{e}"
        );
    }

    #[test]
    fn a_payload_error_reaches_the_peers() {
        let port = free_port();
        let zero = thread::spawn(move || {
            rendezvous(
                &env(0, 2, port),
                || Err(anyhow!("no NCCL")),
                Duration::from_secs(20),
            )
        });
        let one =
            thread::spawn(move || rendezvous(&env(1, 2, port), payload, Duration::from_secs(20)));
        assert!(format!("{:#}", zero.join().unwrap().err().unwrap()).contains("no NCCL"));
        let e = format!("{:#}", one.join().unwrap().err().unwrap());
        assert!(
            e.contains("could not make the rendezvous payload: no NCCL"),
            "{e}"
        );
    }
}
