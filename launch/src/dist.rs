//! Where this process stands in a multi-process run, read from the environment the way the
//! launchers set it: torchrun (and `oxclip launch`) export `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`; SLURM's `srun` exports `SLURM_PROCID`,
//! `SLURM_NTASKS`, `SLURM_LOCALID`, `SLURM_NTASKS_PER_NODE` and `SLURM_JOB_NODELIST`, whose
//! first host serves the rendezvous. Under torchrun's static rendezvous its agent already
//! listens on `MASTER_PORT` (`TORCHELASTIC_USE_AGENT_STORE=True`), so ours takes the next port.
//!
//! The job token, which keeps other processes out of the rendezvous, is `OXCLIP_RDZV_TOKEN`
//! (`oxclip launch` on one node sets a fresh random one), else derived from the ids the job's
//! launcher gives every rank alike: torchrun's `TORCHELASTIC_RUN_ID` and restart count, or
//! SLURM's `SLURM_JOB_ID` and `SLURM_STEP_ID`.

use anyhow::{bail, Context};

use oxclip_trainer::collectives::WorldEnv;

/// The port rank 0 serves on under SLURM when `MASTER_PORT` is not set: derived from the job
/// id, so two jobs on one node do not collide.
fn slurm_port(job_id: Option<&str>) -> u16 {
    let id: u64 = job_id.and_then(|j| j.parse().ok()).unwrap_or(0);
    20000 + (id % 20000) as u16
}

/// The variable a job's ranks share their rendezvous token through.
pub const TOKEN_ENV: &str = "OXCLIP_RDZV_TOKEN";

/// The job token and where it came from; empty when nothing names the job.
fn job_token(var: &impl Fn(&str) -> Option<String>) -> (String, &'static str) {
    if let Some(token) = var(TOKEN_ENV) {
        return (token, TOKEN_ENV);
    }
    if let Some(run) = var("TORCHELASTIC_RUN_ID") {
        // A restarted attempt is a new world: a rank left over from the last one stays out.
        let attempt = var("TORCHELASTIC_RESTART_COUNT").unwrap_or_else(|| "0".into());
        return (format!("torchelastic:{run}:{attempt}"), "TORCHELASTIC_RUN_ID");
    }
    if let Some(job) = var("SLURM_JOB_ID") {
        let step = var("SLURM_STEP_ID").unwrap_or_else(|| "0".into());
        return (format!("slurm:{job}.{step}"), "SLURM_JOB_ID");
    }
    (String::new(), "")
}

/// Whether this process's environment already names its job for the rendezvous.
pub fn names_its_job() -> bool {
    !job_token(&|name: &str| std::env::var(name).ok().filter(|v| !v.is_empty())).0.is_empty()
}

/// The world this process belongs to, or `None` for a single process.
pub fn world_from_env() -> anyhow::Result<Option<WorldEnv>> {
    world_from(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
}

fn world_from(var: impl Fn(&str) -> Option<String>) -> anyhow::Result<Option<WorldEnv>> {
    let world = world_without_token(&var)?;
    Ok(world.map(|world| {
        let (job_token, source) = job_token(&var);
        match source {
            "" if world.world_size > 1 && world.rank == 0 => tracing::warn!(
                "the rendezvous has no job token (none of {TOKEN_ENV}, TORCHELASTIC_RUN_ID, \
                 SLURM_JOB_ID is set): any oxclip process of the same world size that reaches \
                 {}:{} may join it; set {TOKEN_ENV} to one secret shared by every rank",
                world.master_addr,
                world.master_port
            ),
            "" => {}
            source => tracing::debug!("rendezvous job token from {source}"),
        }
        WorldEnv { job_token, ..world }
    }))
}

fn world_without_token(var: &impl Fn(&str) -> Option<String>) -> anyhow::Result<Option<WorldEnv>> {
    let number = |name: &str| -> anyhow::Result<Option<usize>> {
        var(name)
            .map(|v| {
                v.trim().parse::<usize>().with_context(|| format!("{name}={v:?} is not a number"))
            })
            .transpose()
    };
    if let Some(world_size) = number("WORLD_SIZE")? {
        let rank = number("RANK")?.context("WORLD_SIZE is set but RANK is not")?;
        let local_rank = number("LOCAL_RANK")?.unwrap_or(rank);
        let local_world_size = number("LOCAL_WORLD_SIZE")?.unwrap_or(world_size);
        let master_addr = var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        let mut master_port = match number("MASTER_PORT")? {
            Some(p) => u16::try_from(p).context("MASTER_PORT is not a port number")?,
            None if world_size > 1 => bail!("WORLD_SIZE={world_size} but MASTER_PORT is not set"),
            None => 29500,
        };
        // torchrun's agent already serves its own store on MASTER_PORT (static rendezvous);
        // ours goes on the next port.
        if var("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            master_port = master_port
                .checked_add(1)
                .context("MASTER_PORT is the last port; torchrun needs the one after it free")?;
        }
        return checked(WorldEnv {
            rank,
            world_size,
            local_rank,
            local_world_size,
            master_addr,
            master_port,
            job_token: String::new(),
        });
    }
    if let Some(world_size) = number("SLURM_NTASKS")? {
        let rank =
            number("SLURM_PROCID")?.context("SLURM_NTASKS is set but SLURM_PROCID is not")?;
        let local_rank = number("SLURM_LOCALID")?.unwrap_or(0);
        // "8" or "8(x4)": tasks per node.
        let local_world_size = var("SLURM_NTASKS_PER_NODE")
            .and_then(|v| v.split('(').next().and_then(|n| n.trim().parse().ok()))
            .unwrap_or(world_size);
        let master_addr = match var("MASTER_ADDR") {
            Some(a) => a,
            None => {
                let nodes = var("SLURM_JOB_NODELIST")
                    .or_else(|| var("SLURM_NODELIST"))
                    .context("SLURM_JOB_NODELIST is not set")?;
                first_host(&nodes).with_context(|| {
                    format!("cannot read the first host of SLURM_JOB_NODELIST={nodes:?}")
                })?
            }
        };
        let master_port = match number("MASTER_PORT")? {
            Some(p) => u16::try_from(p).context("MASTER_PORT is not a port number")?,
            None => slurm_port(var("SLURM_JOB_ID").as_deref()),
        };
        return checked(WorldEnv {
            rank,
            world_size,
            local_rank,
            local_world_size,
            master_addr,
            master_port,
            job_token: String::new(),
        });
    }
    Ok(None)
}

fn checked(world: WorldEnv) -> anyhow::Result<Option<WorldEnv>> {
    if world.world_size == 0 || world.rank >= world.world_size {
        bail!(
            "rank {} is not in 0..{} (the launcher's RANK / WORLD_SIZE)",
            world.rank,
            world.world_size
        );
    }
    if world.local_rank >= world.local_world_size.max(1) {
        bail!(
            "local rank {} is not below the local world size {}",
            world.local_rank,
            world.local_world_size
        );
    }
    Ok(Some(world))
}

/// The first host of a SLURM node list: `node[01-04,07],gpu5` -> `node01`, `a,b` -> `a`.
pub fn first_host(list: &str) -> Option<String> {
    let list = list.trim();
    let first_end = {
        // The first comma outside brackets ends the first entry.
        let mut depth = 0;
        list.char_indices()
            .find(|&(_, c)| {
                match c {
                    '[' => depth += 1,
                    ']' => depth -= 1,
                    _ => {}
                }
                c == ',' && depth == 0
            })
            .map_or(list.len(), |(i, _)| i)
    };
    let entry = &list[..first_end];
    match entry.split_once('[') {
        None => (!entry.is_empty()).then(|| entry.to_owned()),
        Some((prefix, rest)) => {
            let range = rest.strip_suffix(']')?.split(',').next()?;
            let first = range.split('-').next()?;
            (!first.is_empty()).then(|| format!("{prefix}{first}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> =
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn torchrun_variables() {
        let w = world_from(env(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "n0"),
            ("MASTER_PORT", "29400"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (
                w.rank,
                w.world_size,
                w.local_rank,
                w.local_world_size,
                w.master_addr.as_str(),
                w.master_port
            ),
            (3, 8, 1, 2, "n0", 29400)
        );
        assert!(world_from(env(&[])).unwrap().is_none());
        // Under torchrun's agent store, the port after MASTER_PORT.
        let w = world_from(env(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_PORT", "29400"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(w.master_port, 29401);
        assert!(
            world_from(env(&[("RANK", "8"), ("WORLD_SIZE", "8"), ("MASTER_PORT", "1")])).is_err()
        );
        assert!(world_from(env(&[("RANK", "0"), ("WORLD_SIZE", "2")]))
            .unwrap_err()
            .to_string()
            .contains("MASTER_PORT"));
        assert!(world_from(env(&[("RANK", "x"), ("WORLD_SIZE", "2")]))
            .unwrap_err()
            .to_string()
            .contains("RANK"));
    }

    #[test]
    fn slurm_variables() {
        let w = world_from(env(&[
            ("SLURM_PROCID", "9"),
            ("SLURM_NTASKS", "32"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NTASKS_PER_NODE", "8(x4)"),
            ("SLURM_JOB_NODELIST", "gpu[012-015]"),
            ("SLURM_JOB_ID", "123456"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((w.rank, w.world_size, w.local_rank, w.local_world_size), (9, 32, 1, 8));
        assert_eq!(
            (w.master_addr.as_str(), w.master_port),
            ("gpu012", 20000 + (123456 % 20000) as u16)
        );
    }

    #[test]
    fn job_tokens() {
        let token = |pairs: &[(&str, &str)]| {
            let mut all = vec![("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "29400")];
            all.extend_from_slice(pairs);
            world_from(env(&all)).unwrap().unwrap().job_token
        };
        assert_eq!(token(&[]), "");
        assert_eq!(
            token(&[("TORCHELASTIC_RUN_ID", "r7"), ("TORCHELASTIC_RESTART_COUNT", "2")]),
            "torchelastic:r7:2"
        );
        assert_eq!(token(&[("SLURM_JOB_ID", "99"), ("SLURM_STEP_ID", "3")]), "slurm:99.3");
        assert_eq!(token(&[("SLURM_JOB_ID", "99"), (TOKEN_ENV, "s3cret")]), "s3cret");
        let slurm = world_from(env(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_JOB_NODELIST", "n1"),
            ("SLURM_JOB_ID", "5"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(slurm.job_token, "slurm:5.0");
    }

    #[test]
    fn first_hosts() {
        assert_eq!(first_host("node[01-04,07],gpu5").as_deref(), Some("node01"));
        assert_eq!(first_host("a,b").as_deref(), Some("a"));
        assert_eq!(first_host("solo").as_deref(), Some("solo"));
        assert_eq!(first_host("gpu[7]").as_deref(), Some("gpu7"));
        assert_eq!(first_host("").as_deref(), None);
    }
}
