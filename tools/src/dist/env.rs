//! The process group this process belongs to, as launchers describe it in the environment.
//!
//! Sources, first match wins:
//! - torchrun and `convnets launch`: `RANK`, `WORLD_SIZE`, `LOCAL_RANK` (all required once
//!   `WORLD_SIZE` is set), `LOCAL_WORLD_SIZE` (optional), `MASTER_ADDR`, `MASTER_PORT`.
//! - SLURM (`srun`): `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`,
//!   `SLURM_NTASKS_PER_NODE` (optional); `MASTER_ADDR` is required (SLURM does not name a
//!   rank-0 host).
//! - Open MPI (`mpirun`): `OMPI_COMM_WORLD_RANK`, `OMPI_COMM_WORLD_SIZE`,
//!   `OMPI_COMM_WORLD_LOCAL_RANK`, `OMPI_COMM_WORLD_LOCAL_SIZE` (optional).
//!
//! `MASTER_PORT` defaults to 29500 (torchrun's default). `MASTER_ADDR` is required, except
//! that it defaults to 127.0.0.1 when torchrun's `LOCAL_WORLD_SIZE` (or Open MPI's
//! `OMPI_COMM_WORLD_LOCAL_SIZE`) equals the world size, i.e. every rank runs on this
//! machine. A world of one process is no group (`None`).

use anyhow::{anyhow, bail, Context};

/// Rank 0's rendezvous port when `MASTER_PORT` is not set (torchrun's default).
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// This process's place in a data-parallel process group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    /// This process's rank, `0..world_size`; rank 0 hosts the rendezvous.
    pub rank: usize,
    /// The number of processes in the group (at least 2).
    pub world_size: usize,
    /// This process's index among the group's processes on this machine (picks its GPU).
    pub local_rank: usize,
    /// How many of the group's processes run on this machine, when the launcher says
    /// (they share its cores).
    pub local_world_size: Option<usize>,
    /// Host name or address where rank 0 listens.
    pub master_addr: String,
    /// Port where rank 0 listens.
    pub master_port: u16,
}

/// Where a launcher puts the group's numbers.
struct Source {
    name: &'static str,
    rank: &'static str,
    world_size: &'static str,
    local_rank: &'static str,
    /// The number of ranks on this machine, when the launcher says.
    local_world_size: Option<&'static str>,
    /// Whether `MASTER_ADDR` may default to 127.0.0.1 when every rank is local.
    local_default_addr: bool,
}

const TORCHRUN: Source = Source {
    name: "torchrun-style",
    rank: "RANK",
    world_size: "WORLD_SIZE",
    local_rank: "LOCAL_RANK",
    local_world_size: Some("LOCAL_WORLD_SIZE"),
    local_default_addr: true,
};
const SLURM: Source = Source {
    name: "SLURM",
    rank: "SLURM_PROCID",
    world_size: "SLURM_NTASKS",
    local_rank: "SLURM_LOCALID",
    // Set by `--ntasks-per-node`.
    local_world_size: Some("SLURM_NTASKS_PER_NODE"),
    local_default_addr: false,
};
const OPEN_MPI: Source = Source {
    name: "Open MPI",
    rank: "OMPI_COMM_WORLD_RANK",
    world_size: "OMPI_COMM_WORLD_SIZE",
    local_rank: "OMPI_COMM_WORLD_LOCAL_RANK",
    local_world_size: Some("OMPI_COMM_WORLD_LOCAL_SIZE"),
    local_default_addr: true,
};

impl DistEnv {
    /// The GPU this rank uses: the only visible one when the launcher restricted
    /// `CUDA_VISIBLE_DEVICES` to it, else the one at `LOCAL_RANK` (torchrun's convention).
    pub fn device_index(&self) -> usize {
        match std::env::var("CUDA_VISIBLE_DEVICES") {
            Ok(v) if v.split(',').filter(|s| !s.trim().is_empty()).count() == 1 => 0,
            _ => self.local_rank,
        }
    }

    /// The process group this process belongs to, from the environment (see the module
    /// docs for the variables). `None` when there is no group or it has one process.
    pub fn from_env() -> anyhow::Result<Option<DistEnv>> {
        // A value that is not UTF-8 is kept (lossily) so that it is reported as malformed.
        Self::from_vars(|name| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned()))
    }

    /// `from_env` over any variable lookup (the testable core).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> anyhow::Result<Option<DistEnv>> {
        let source = if get(TORCHRUN.world_size).is_some() {
            TORCHRUN
        } else if get(SLURM.world_size).is_some() {
            SLURM
        } else if get(OPEN_MPI.world_size).is_some() {
            OPEN_MPI
        } else {
            return Ok(None);
        };
        let number = |name: &str| -> anyhow::Result<Option<usize>> {
            match get(name) {
                None => Ok(None),
                Some(v) => v.trim().parse().map(Some).map_err(|_| {
                    anyhow!(
                        "{name}={v:?} is not a whole number ({} process group)",
                        source.name
                    )
                }),
            }
        };
        let required = |name: &str| -> anyhow::Result<usize> {
            number(name)?.with_context(|| {
                format!(
                    "{} is set but {name} is not ({} process group)",
                    source.world_size, source.name
                )
            })
        };

        let world_size = required(source.world_size)?;
        match world_size {
            0 => bail!(
                "{}=0: a process group has at least one process",
                source.world_size
            ),
            1 => return Ok(None),
            _ => {}
        }
        let rank = required(source.rank)?;
        if rank >= world_size {
            bail!(
                "{}={rank} is not below {}={world_size}",
                source.rank,
                source.world_size
            );
        }
        let local_rank = required(source.local_rank)?;
        if local_rank >= world_size {
            bail!(
                "{}={local_rank} is not below {}={world_size}",
                source.local_rank,
                source.world_size
            );
        }
        let local_world_size = match source.local_world_size {
            Some(name) => number(name)?.map(|n| (name, n)),
            None => None,
        };
        if let Some((name, n)) = local_world_size {
            if n == 0 || n > world_size {
                bail!(
                    "{name}={n} must be between 1 and {}={world_size}",
                    source.world_size
                );
            }
            if local_rank >= n {
                bail!("{}={local_rank} is not below {name}={n}", source.local_rank);
            }
        }

        let all_local =
            source.local_default_addr && local_world_size.is_some_and(|(_, n)| n == world_size);
        let master_addr = match get("MASTER_ADDR") {
            Some(a) if a.trim().is_empty() => bail!("MASTER_ADDR is empty"),
            Some(a) => a.trim().to_string(),
            None if all_local => "127.0.0.1".to_string(),
            None => bail!(
                "{}={world_size} ({} process group) but MASTER_ADDR is not set: set it to the host of rank 0{}",
                source.world_size,
                source.name,
                if source.name == SLURM.name { " (e.g. the first host of SLURM_JOB_NODELIST)" } else { "" }
            ),
        };
        let master_port = match get("MASTER_PORT") {
            None => DEFAULT_MASTER_PORT,
            Some(p) => match p.trim().parse::<u16>() {
                Ok(0) | Err(_) => bail!("MASTER_PORT={p:?} is not a port number (1 to 65535)"),
                Ok(port) => port,
            },
        };
        let local_world_size = local_world_size.map(|(_, n)| n);
        Ok(Some(DistEnv {
            rank,
            world_size,
            local_rank,
            local_world_size,
            master_addr,
            master_port,
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn parse(vars: &[(&str, &str)]) -> anyhow::Result<Option<DistEnv>> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        DistEnv::from_vars(|k| vars.get(k).cloned())
    }

    fn error(vars: &[(&str, &str)]) -> String {
        match parse(vars) {
            Ok(env) => panic!("expected an error, got {env:?}"),
            Err(e) => format!("{e:#}"),
        }
    }

    fn env(
        rank: usize,
        world_size: usize,
        local_rank: usize,
        addr: &str,
        port: u16,
    ) -> Option<DistEnv> {
        Some(DistEnv {
            rank,
            world_size,
            local_rank,
            local_world_size: None,
            master_addr: addr.into(),
            master_port: port,
        })
    }

    fn with_local(env: Option<DistEnv>, n: usize) -> Option<DistEnv> {
        env.map(|e| DistEnv {
            local_world_size: Some(n),
            ..e
        })
    }

    #[test]
    fn no_group_without_variables_or_with_one_process() -> anyhow::Result<()> {
        assert_eq!(parse(&[])?, None);
        assert_eq!(parse(&[("WORLD_SIZE", "1"), ("RANK", "0")])?, None);
        assert_eq!(
            parse(&[("SLURM_NTASKS", "1"), ("SLURM_PROCID", "0")])?,
            None
        );
        assert_eq!(parse(&[("OMPI_COMM_WORLD_SIZE", "1")])?, None);
        Ok(())
    }

    #[test]
    fn torchrun_variables() -> anyhow::Result<()> {
        let vars = [
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "1234"),
        ];
        assert_eq!(parse(&vars)?, with_local(env(3, 8, 1, "node0", 1234), 2));
        Ok(())
    }

    #[test]
    fn master_addr_defaults_only_when_every_rank_is_local() -> anyhow::Result<()> {
        let local = [
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
        ];
        assert_eq!(
            parse(&local)?,
            with_local(env(1, 2, 1, "127.0.0.1", DEFAULT_MASTER_PORT), 2)
        );
        let e = error(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
        ]);
        assert!(e.contains("MASTER_ADDR is not set"), "{e}");
        let e = error(&[("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")]);
        assert!(e.contains("MASTER_ADDR is not set"), "{e}");
        Ok(())
    }

    #[test]
    fn slurm_variables_need_master_addr() -> anyhow::Result<()> {
        let slurm = [
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_LOCALID", "1"),
        ];
        let e = error(&slurm);
        assert!(
            e.contains("SLURM_NTASKS=16") && e.contains("MASTER_ADDR is not set"),
            "{e}"
        );
        let with_addr = [&slurm[..], &[("MASTER_ADDR", "gpu-017")]].concat();
        assert_eq!(
            parse(&with_addr)?,
            env(5, 16, 1, "gpu-017", DEFAULT_MASTER_PORT)
        );
        // torchrun's variables win over SLURM's (torchrun started inside an srun step).
        let both = [
            &with_addr[..],
            &[("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")],
        ]
        .concat();
        assert_eq!(parse(&both)?, env(0, 2, 0, "gpu-017", DEFAULT_MASTER_PORT));
        let per_node = [&with_addr[..], &[("SLURM_NTASKS_PER_NODE", "4")]].concat();
        assert_eq!(
            parse(&per_node)?,
            with_local(env(5, 16, 1, "gpu-017", DEFAULT_MASTER_PORT), 4)
        );
        Ok(())
    }

    #[test]
    fn open_mpi_variables() -> anyhow::Result<()> {
        let vars = [
            ("OMPI_COMM_WORLD_RANK", "2"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "2"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "4"),
            ("MASTER_PORT", "40000"),
        ];
        assert_eq!(
            parse(&vars)?,
            with_local(env(2, 4, 2, "127.0.0.1", 40000), 4)
        );
        Ok(())
    }

    #[test]
    fn errors_name_the_variable() {
        let base = [
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "0"),
            ("MASTER_ADDR", "h"),
        ];
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[("WORLD_SIZE", "two")],
                "WORLD_SIZE=\"two\" is not a whole number",
            ),
            (&[("WORLD_SIZE", "0")], "WORLD_SIZE=0"),
            (&base, "RANK is not"),
            (
                &[("RANK", "-1"), ("WORLD_SIZE", "2")],
                "RANK=\"-1\" is not a whole number",
            ),
            (
                &[("RANK", "2"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")],
                "RANK=2 is not below WORLD_SIZE=2",
            ),
            (&[("RANK", "1"), ("WORLD_SIZE", "2")], "LOCAL_RANK is not"),
            (
                &[
                    ("RANK", "1"),
                    ("WORLD_SIZE", "2"),
                    ("LOCAL_RANK", "1"),
                    ("LOCAL_WORLD_SIZE", "1"),
                ],
                "LOCAL_RANK=1 is not below LOCAL_WORLD_SIZE=1",
            ),
            (
                &[
                    ("RANK", "1"),
                    ("WORLD_SIZE", "2"),
                    ("LOCAL_RANK", "0"),
                    ("MASTER_ADDR", "h"),
                    ("MASTER_PORT", "http"),
                ],
                "MASTER_PORT=\"http\"",
            ),
            (
                &[
                    ("RANK", "1"),
                    ("WORLD_SIZE", "2"),
                    ("LOCAL_RANK", "0"),
                    ("MASTER_ADDR", "h"),
                    ("MASTER_PORT", "0"),
                ],
                "MASTER_PORT=\"0\"",
            ),
            (
                &[
                    ("RANK", "1"),
                    ("WORLD_SIZE", "2"),
                    ("LOCAL_RANK", "0"),
                    ("MASTER_ADDR", " "),
                ],
                "MASTER_ADDR is empty",
            ),
            (
                &[("SLURM_NTASKS", "4"), ("SLURM_PROCID", "x")],
                "SLURM_PROCID=\"x\"",
            ),
            (
                &[("OMPI_COMM_WORLD_SIZE", "4"), ("OMPI_COMM_WORLD_RANK", "1")],
                "OMPI_COMM_WORLD_LOCAL_RANK is not",
            ),
        ];
        for (vars, expected) in cases {
            let e = error(vars);
            assert!(
                e.contains(expected),
                "{vars:?}: {e:?} does not contain {expected:?}"
            );
        }
    }
}
