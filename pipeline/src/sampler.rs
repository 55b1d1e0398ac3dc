//! Which records each batch holds: a pure function of (seed, epoch, rank, world size),
//! so every rank computes its share without talking to the others, and a resumed run
//! recomputes exactly the batches an uninterrupted run would have seen.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// What happens to the samples that do not fill a last batch (DALI's last-batch policies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum LastBatch {
    /// Leave them out: every batch is full (training default).
    #[default]
    Drop,
    /// Fill the last batch with samples from the start of the rank's order, marked as
    /// padding so metrics can ignore them.
    Fill,
    /// Keep a smaller last batch.
    Partial,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerConfig {
    /// Seed of the per-epoch shuffle and of per-sample augmentation randomness.
    pub seed: u64,
    /// A fresh global permutation each epoch (training); false for evaluation order.
    pub shuffle: bool,
    pub batch_size: usize,
    pub rank: usize,
    pub world_size: usize,
    pub last_batch: LastBatch,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            shuffle: true,
            batch_size: 256,
            rank: 0,
            world_size: 1,
            last_batch: LastBatch::Drop,
        }
    }
}

/// One sample of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// Record index in the split.
    pub index: u32,
    /// A repeated sample added to fill the last batch; exclude it from metrics.
    pub padding: bool,
}

/// The sampler of one rank.
#[derive(Debug, Clone)]
pub struct Sampler {
    cfg: SamplerConfig,
    len: usize,
}

impl Sampler {
    pub fn new(len: usize, cfg: SamplerConfig) -> Result<Self> {
        if cfg.batch_size == 0 || cfg.world_size == 0 || cfg.rank >= cfg.world_size {
            return Err(Error::Config(format!(
                "sampler needs batch_size > 0 and rank < world_size (got batch_size {}, rank {}, world_size {})",
                cfg.batch_size, cfg.rank, cfg.world_size
            )));
        }
        if u32::try_from(len).is_err() {
            return Err(Error::Config(format!("{len} records is more than 2^32")));
        }
        if len < cfg.world_size {
            return Err(Error::Config(format!(
                "{len} records cannot be split across {} ranks",
                cfg.world_size
            )));
        }
        Ok(Self { cfg, len })
    }

    pub fn config(&self) -> &SamplerConfig {
        &self.cfg
    }

    /// This rank's samples for `epoch`, in order, before batching.
    ///
    /// Shuffled: a global permutation from (seed, epoch), padded by wrapping around (as
    /// PyTorch's DistributedSampler does) so it divides evenly by the world size, then
    /// dealt round-robin; every rank gets the same count. Not shuffled: contiguous
    /// chunks, every record exactly once across ranks (counts differ by at most one).
    pub fn rank_samples(&self, epoch: u64) -> Vec<Sample> {
        let (n, world, rank) = (self.len, self.cfg.world_size, self.cfg.rank);
        if !self.cfg.shuffle {
            let (start, end) = (rank * n / world, (rank + 1) * n / world);
            return (start..end).map(|i| sample(i, false)).collect();
        }
        let order = epoch_permutation(n, self.cfg.seed, epoch);
        let per_rank = n.div_ceil(world);
        (0..per_rank)
            .map(|k| {
                let pos = k * world + rank;
                sample(order[pos % n] as usize, pos >= n)
            })
            .collect()
    }

    /// Number of batches this rank yields per epoch.
    pub fn batches_per_epoch(&self) -> usize {
        let n = if self.cfg.shuffle {
            self.len.div_ceil(self.cfg.world_size)
        } else {
            // Ranks may differ by one sample; this is this rank's count.
            let (w, r) = (self.cfg.world_size, self.cfg.rank);
            (r + 1) * self.len / w - r * self.len / w
        };
        batch_count(n, self.cfg.batch_size, self.cfg.last_batch)
    }

    /// Every batch from batch `first_batch` of `epoch` on, epoch after epoch without end,
    /// numbered from 0 in the order a loader delivers them. Each epoch's batches are made
    /// when the stream reaches it.
    pub fn batches_from(
        &self,
        epoch: u64,
        first_batch: usize,
    ) -> impl Iterator<Item = PlannedBatch> + '_ {
        (epoch..)
            .flat_map(move |e| {
                let first = if e == epoch { first_batch } else { 0 };
                self.epoch_batches(e, first)
                    .into_iter()
                    .enumerate()
                    .map(move |(k, samples)| (e, first + k, samples))
            })
            .zip(0u64..)
            .map(|((epoch, index, samples), seq)| PlannedBatch {
                seq,
                epoch,
                index,
                samples,
            })
    }

    /// The batches of one epoch, from `first_batch` on (resume skips nothing else).
    pub fn epoch_batches(&self, epoch: u64, first_batch: usize) -> Vec<Vec<Sample>> {
        let samples = self.rank_samples(epoch);
        let b = self.cfg.batch_size;
        let count = batch_count(samples.len(), b, self.cfg.last_batch);
        (first_batch..count)
            .map(|k| {
                let start = k * b;
                let end = (start + b).min(samples.len());
                let mut batch = samples[start..end].to_vec();
                if self.cfg.last_batch == LastBatch::Fill {
                    let mut wrap = 0;
                    while batch.len() < b {
                        let s = samples[wrap % samples.len()];
                        batch.push(Sample { padding: true, ..s });
                        wrap += 1;
                    }
                }
                batch
            })
            .collect()
    }
}

fn sample(i: usize, padding: bool) -> Sample {
    Sample {
        index: i as u32,
        padding,
    }
}

fn batch_count(samples: usize, batch: usize, policy: LastBatch) -> usize {
    match policy {
        LastBatch::Drop => samples / batch,
        LastBatch::Fill | LastBatch::Partial => samples.div_ceil(batch),
    }
}

/// The global order of one epoch: a full Fisher-Yates shuffle of all records (not a
/// shuffle buffer), from a ChaCha8 stream seeded by (seed, epoch).
pub fn epoch_permutation(len: usize, seed: u64, epoch: u64) -> Vec<u32> {
    let mut order: Vec<u32> = (0..len as u32).collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(mix(seed, epoch));
    order.shuffle(&mut rng);
    order
}

/// One batch of a loader's stream ([`Sampler::batches_from`]).
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedBatch {
    /// Position in the stream, from 0.
    pub seq: u64,
    pub epoch: u64,
    /// Index of the batch within its epoch.
    pub index: usize,
    pub samples: Vec<Sample>,
}

/// Seed of one sample's augmentation: depends only on (seed, epoch, record index), so
/// it is the same whichever thread, rank or run processes the sample.
pub fn sample_seed(seed: u64, epoch: u64, index: u32) -> u64 {
    mix(mix(seed, epoch), u64::from(index))
}

/// SplitMix64-style mixing of two words.
fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn sampler(len: usize, rank: usize, world: usize, shuffle: bool, last: LastBatch) -> Sampler {
        Sampler::new(
            len,
            SamplerConfig {
                seed: 7,
                shuffle,
                batch_size: 4,
                rank,
                world_size: world,
                last_batch: last,
            },
        )
        .unwrap()
    }

    #[test]
    fn permutation_is_a_true_shuffle_and_changes_by_epoch() {
        let a = epoch_permutation(1000, 1, 0);
        let b = epoch_permutation(1000, 1, 1);
        assert_eq!(a.iter().copied().collect::<HashSet<_>>().len(), 1000);
        assert_ne!(a, b);
        assert_eq!(a, epoch_permutation(1000, 1, 0));
        // Not a shuffle buffer: the first positions draw from the whole range.
        assert!(a[..10].iter().any(|&i| i > 500));
    }

    #[test]
    fn train_ranks_get_equal_batches_and_cover_everything() {
        for last in [LastBatch::Drop, LastBatch::Fill, LastBatch::Partial] {
            let world = 3;
            let counts: Vec<usize> = (0..world)
                .map(|r| sampler(103, r, world, true, last).epoch_batches(5, 0).len())
                .collect();
            assert!(
                counts.iter().all(|&c| c == counts[0]),
                "{last:?}: {counts:?}"
            );
            assert_eq!(
                counts[0],
                sampler(103, 0, world, true, last).batches_per_epoch()
            );
        }
        let seen: HashSet<u32> = (0..3)
            .flat_map(|r| sampler(103, r, 3, true, LastBatch::Partial).rank_samples(5))
            .map(|s| s.index)
            .collect();
        assert_eq!(seen.len(), 103);
    }

    #[test]
    fn eval_order_sees_every_record_exactly_once() {
        let mut all = Vec::new();
        for r in 0..4 {
            for batch in sampler(10, r, 4, false, LastBatch::Partial).epoch_batches(0, 0) {
                all.extend(batch.iter().map(|s| s.index));
            }
        }
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn fill_marks_padding() {
        let batches = sampler(10, 0, 1, false, LastBatch::Fill).epoch_batches(0, 0);
        assert_eq!(batches.len(), 3);
        let last = &batches[2];
        assert_eq!(last.len(), 4);
        assert_eq!(last.iter().filter(|s| s.padding).count(), 2);
    }

    #[test]
    fn resume_from_a_batch_gives_the_rest() {
        let s = sampler(50, 1, 2, true, LastBatch::Drop);
        let all = s.epoch_batches(3, 0);
        assert_eq!(s.epoch_batches(3, 2), all[2..].to_vec());
    }

    #[test]
    fn the_stream_goes_on_into_the_next_epochs_numbered_in_order() {
        let s = sampler(50, 1, 2, true, LastBatch::Drop);
        let (e3, e4) = (s.epoch_batches(3, 2), s.epoch_batches(4, 0));
        let stream: Vec<PlannedBatch> =
            s.batches_from(3, 2).take(e3.len() + e4.len() + 1).collect();
        let expected = e3
            .iter()
            .enumerate()
            .map(|(k, b)| (3, k + 2, b))
            .chain(e4.iter().enumerate().map(|(k, b)| (4, k, b)));
        for (seq, (got, (epoch, index, samples))) in stream.iter().zip(expected).enumerate() {
            assert_eq!(
                (got.seq, got.epoch, got.index, &got.samples),
                (seq as u64, epoch, index, samples)
            );
        }
        assert_eq!(stream.last().map(|b| (b.epoch, b.index)), Some((5, 0)));
    }

    #[test]
    fn bad_configs_are_errors() {
        let cfg = |rank, world, batch| SamplerConfig {
            rank,
            world_size: world,
            batch_size: batch,
            ..Default::default()
        };
        assert!(Sampler::new(10, cfg(2, 2, 4)).is_err());
        assert!(Sampler::new(10, cfg(0, 1, 0)).is_err());
        assert!(Sampler::new(1, cfg(0, 2, 1)).is_err());
    }

    #[test]
    fn sample_seeds_differ() {
        assert_ne!(sample_seed(0, 0, 1), sample_seed(0, 0, 2));
        assert_ne!(sample_seed(0, 0, 1), sample_seed(0, 1, 1));
    }
}
