//! Caption generation for captioning models (CoCa): a port of open_clip 3.3's `CoCa.generate`
//! (beam search through transformers' `BeamSearchScorer`, or top-k / top-p sampling) that
//! gives open_clip's token ids, token for token, for the same next-token logits. The model is
//! a closure from the sequences so far to the logits of their next token
//! ([`generate`]); everything around it (the logits processors, the warpers, the beam
//! bookkeeping, the stopping rules, the padding of the output) is open_clip's, quirks
//! included, as transformers 4.56 implements the pieces open_clip takes from it.
//! tests/fixtures/make_generate_fixtures.py records open_clip's outputs over a toy model and
//! trainer/tests/generate_parity.rs checks these against them.
//!
//! What open_clip does that a reader might not expect, and this module does the same:
//!
//! - Beam search adds the processed *raw logits* to the beam scores, not log-probabilities:
//!   open_clip calls the scorer without a `log_softmax`. Scores can be positive, and the
//!   length normalisation (score / length, `length_penalty` 1.0) and the early-stopping test
//!   work on these sums.
//! - `num_beam_groups` splits the beams into groups that each keep their own
//!   `BeamSearchScorer` hypotheses, but no diversity penalty is applied: every group starts
//!   from the same state (beam scores 0 for its first beam, -1e9 for the others, so the first
//!   step does not pick one token in every beam) and sees the same logits, so every group runs
//!   the same search. 6 beams in 3 groups give what 2 beams in 1 group give.
//! - In each group the `2 * group_size` best (beam, token) pairs are ranked; an eos among the
//!   first `group_size` ends that beam as a hypothesis (stored without the eos, scored by its
//!   length with the eos and the sot), an eos ranked lower is dropped, and the first
//!   `group_size` other pairs are the next beams.
//! - An image whose hypotheses are done (`BeamHypotheses.is_done` with `early_stopping`
//!   False: `group_size` hypotheses, the worst at least as good as the best new score divided
//!   by the current length) keeps running with pad tokens and score 0, its beams all copies of
//!   the first image's first beam of the group (the scorer's index 0 is not offset by the
//!   image): only the model sees those. Search stops when every image is done or the
//!   sequences reach `seq_len` (`MaxLengthCriteria`).
//! - The output is each image's best hypothesis over all its groups (the last among equal
//!   scores), in a width of min(longest + 1, seq_len): an eos after each one shorter than that
//!   (hypotheses that ended in eos get it back; those cut at `seq_len` have none), then pad.
//!   `fixed_output_length` pads the width to `seq_len`.
//! - The logits processors are `MinLengthLogitsProcessor(min_seq_len, eos)` (eos is -inf
//!   while the sequence, sot included, is shorter than `min_seq_len`) and
//!   `RepetitionPenaltyLogitsProcessor(repetition_penalty)` (the logit of every token in the
//!   sequence, sot included, divided by the penalty if positive, multiplied if negative).
//!   Beam search ignores `temperature` and `max_seq_len`, and gives the model the whole
//!   sequence.
//! - Sampling gives the model, and the processors, only the last `max_seq_len` tokens. Then
//!   the top-k or top-p warper, then the temperature (dividing the warped logits before the
//!   softmax), then `torch.multinomial`; a row whose last token is eos *or pad* (pad is a
//!   token the model can sample) has ended and gets pad. When the window length + 1 equals
//!   `seq_len` the rows still running get eos instead of a draw; the window stops at
//!   `max_seq_len`, so with `seq_len > max_seq_len + 1` that never happens, and a
//!   `min_seq_len` above `max_seq_len` bans eos for good. Sampling stops when every row has
//!   ended (unless `fixed_output_length`, which pads on) or the rows reach `seq_len`.
//!
//! The draws are libtorch's `multinomial` on the probabilities open_clip draws from, on the
//! logits' device: after `tch::manual_seed(s)` they are those of Python's
//! `torch.manual_seed(s)` with the same libtorch (the parity test checks this on the CPU).
//! The searches' own tensor work (the processors, warpers, `topk`, `softmax`) runs through
//! libtorch too, on the logits' device, so ties break as torch breaks them.
//!
//! Not ported: open_clip's `text` argument (a prompt to continue; generation starts from sot)
//! and custom stopping criteria. Calls to the model differ from open_clip's only where their
//! result is unused: sampling does not call it once every row has ended, nor for the step
//! that forces eos.

use tch::{Device, Kind, Tensor};

use crate::error::{Result, TrainError};

/// How the next tokens are chosen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Strategy {
    /// open_clip's `generation_type="beam_search"`: `num_beams` beams per image (at least 2,
    /// as `BeamSearchScorer` requires) in `num_beam_groups` groups (dividing `num_beams`).
    BeamSearch { num_beams: usize, num_beam_groups: usize },
    /// `generation_type="top_k"`: sampling from the `k` largest logits (open_clip's default
    /// `top_k` is 1: greedy).
    TopK { k: usize },
    /// `generation_type="top_p"`: nucleus sampling as `TopPLogitsWarper` does it: with the
    /// tokens sorted smallest first, those whose cumulative probability is at most `1 - p` are
    /// dropped; the largest is always kept. `p` in [0, 1] (0 keeps the largest only), as
    /// transformers allows; open_clip's default is 0.1.
    TopP { p: f64 },
}

/// `CoCa.generate`'s arguments. [`Default`] gives open_clip's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateOptions {
    pub strategy: Strategy,
    /// The most tokens of a caption, sot and eos included (open_clip: 30).
    pub seq_len: usize,
    /// Sampling gives the model the last `max_seq_len` tokens only (77, the context of
    /// CLIP's text tower); beam search ignores it.
    pub max_seq_len: usize,
    /// Sampling divides the warped logits by it; beam search ignores it.
    pub temperature: f64,
    /// eos is banned while a sequence, sot included, is shorter than this. `seq_len` must be
    /// larger.
    pub min_seq_len: usize,
    /// 1.0: none.
    pub repetition_penalty: f64,
    pub sot_id: i64,
    pub eos_id: i64,
    /// What fills a caption after its end (open_clip takes the model's `pad_id`: 0).
    pub pad_id: i64,
    /// Pad every caption to `seq_len` tokens.
    pub fixed_output_length: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            strategy: Strategy::BeamSearch { num_beams: 6, num_beam_groups: 3 },
            seq_len: 30,
            max_seq_len: 77,
            temperature: 1.0,
            min_seq_len: 5,
            repetition_penalty: 1.0,
            sot_id: 49406,
            eos_id: 49407,
            pad_id: 0,
            fixed_output_length: false,
        }
    }
}

fn invalid(message: String) -> TrainError {
    TrainError::Input(format!("generate: {message}"))
}

impl GenerateOptions {
    /// Refuses what open_clip or transformers would refuse or fail on, and values that mean
    /// nothing here (a temperature of 0, an empty `max_seq_len` window, negative ids).
    pub fn validate(&self) -> Result<()> {
        if self.seq_len <= self.min_seq_len {
            return Err(invalid(format!(
                "seq_len ({}) must be larger than min_seq_len ({})",
                self.seq_len, self.min_seq_len
            )));
        }
        if self.max_seq_len == 0 {
            return Err(invalid("max_seq_len must be at least 1".into()));
        }
        if !(self.temperature > 0.0) || !self.temperature.is_finite() {
            return Err(invalid(format!(
                "temperature must be a positive number, not {}",
                self.temperature
            )));
        }
        if !(self.repetition_penalty > 0.0) || !self.repetition_penalty.is_finite() {
            return Err(invalid(format!(
                "repetition_penalty must be a positive number (1.0: none), not {}",
                self.repetition_penalty
            )));
        }
        for (name, id) in
            [("sot_id", self.sot_id), ("eos_id", self.eos_id), ("pad_id", self.pad_id)]
        {
            if id < 0 {
                return Err(invalid(format!("{name} must be a token id (>= 0), not {id}")));
            }
        }
        match self.strategy {
            Strategy::BeamSearch { num_beams, num_beam_groups } => {
                if num_beams < 2 {
                    return Err(invalid(format!(
                        "beam search needs at least 2 beams, not {num_beams} (top_k 1 is greedy \
                         search)"
                    )));
                }
                if num_beam_groups == 0
                    || num_beam_groups > num_beams
                    || num_beams % num_beam_groups != 0
                {
                    return Err(invalid(format!(
                        "num_beam_groups ({num_beam_groups}) must divide num_beams ({num_beams})"
                    )));
                }
                // BeamSearchScorer.finalize cannot fit the 2 tokens of the first step into
                // a width of 1.
                if self.seq_len < 2 {
                    return Err(invalid("beam search needs seq_len of at least 2".into()));
                }
            }
            Strategy::TopK { k } => {
                if k == 0 {
                    return Err(invalid("top_k must be at least 1".into()));
                }
            }
            Strategy::TopP { p } => {
                if !(0.0..=1.0).contains(&p) {
                    return Err(invalid(format!("top_p must be in [0, 1], not {p}")));
                }
            }
        }
        Ok(())
    }
}

/// Captions for `batch` images: each a list of token ids starting with `sot_id`, all of one
/// length (see the module docs for how they end and are padded).
///
/// `logits(rows, ids)` is the model: `rows` (R,) int64 names the image (0..batch) each
/// sequence belongs to, `ids` (R, L) int64 holds the sequences so far (both on the CPU); it
/// returns (R, V) float logits of each sequence's next token, on any device. It runs under
/// `no_grad`; putting the model in eval mode is the caller's (open_clip's beam search does not
/// do it either). Beam search calls it once per step with the `batch * num_beams` beams,
/// image by image (open_clip's `repeat_interleave`: `rows` lets the caller encode each image
/// once); sampling calls it once per step that draws, with the `batch` rows, ended rows
/// included.
pub fn generate(
    batch: usize,
    opts: &GenerateOptions,
    mut logits: impl FnMut(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Vec<Vec<i64>>> {
    opts.validate()?;
    if batch == 0 {
        return Ok(Vec::new());
    }
    let _no_grad = tch::no_grad_guard();
    match opts.strategy {
        Strategy::BeamSearch { num_beams, num_beam_groups } => {
            beam_search(batch, opts, num_beams, num_beam_groups, &mut logits)
        }
        Strategy::TopK { .. } | Strategy::TopP { .. } => sample(batch, opts, &mut logits),
    }
}

// --- the model and the tensors around it ----------------------------------------------------

/// `rows` as a CPU int64 tensor.
fn index_tensor(rows: &[usize]) -> Result<Tensor> {
    let rows: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
    Ok(Tensor::f_from_slice(&rows)?)
}

/// Sequences of one length as an (R, L) int64 tensor on `device`.
fn ids_tensor<S: AsRef<[i64]>>(seqs: &[S], device: Device) -> Result<Tensor> {
    let len = seqs.first().map_or(0, |s| s.as_ref().len());
    let flat: Vec<i64> = seqs.iter().flat_map(|s| s.as_ref().iter().copied()).collect();
    Ok(Tensor::f_from_slice(&flat)?.f_view([seqs.len() as i64, len as i64])?.f_to_device(device)?)
}

fn to_vec_i64(t: &Tensor) -> Result<Vec<i64>> {
    let flat = t.f_to_device(Device::Cpu)?.f_to_kind(Kind::Int64)?.f_contiguous()?.f_view([-1])?;
    Ok(Vec::<i64>::try_from(&flat)?)
}

fn to_vec_f64(t: &Tensor) -> Result<Vec<f64>> {
    let flat = t.f_to_device(Device::Cpu)?.f_to_kind(Kind::Double)?.f_contiguous()?.f_view([-1])?;
    Ok(Vec::<f64>::try_from(&flat)?)
}

/// Calls the model and checks that it gave one row of logits per sequence: (R, V).
fn call_model(
    model: &mut impl FnMut(&Tensor, &Tensor) -> Result<Tensor>,
    rows: &Tensor,
    ids: &Tensor,
) -> Result<(Tensor, i64)> {
    let out = model(rows, ids)?;
    let expected = ids.size().first().copied().unwrap_or(0);
    match out.size().as_slice() {
        &[r, v] if r == expected && v > 0 && out.is_floating_point() => Ok((out, v)),
        size => Err(TrainError::Input(format!(
            "generate: the model gave logits of shape {size:?} and kind {:?} for {expected} \
             sequences; expected [{expected}, vocabulary size], floating point",
            out.f_kind()?
        ))),
    }
}

/// `id` must index the logits' last dimension (the repetition penalty gathers it).
fn check_in_vocab(name: &str, id: i64, vocab: i64) -> Result<()> {
    if id >= vocab {
        return Err(TrainError::Input(format!(
            "generate: {name} {id} is not a token of the model's vocabulary of {vocab}"
        )));
    }
    Ok(())
}

/// open_clip's `LogitsProcessorList([MinLengthLogitsProcessor(min_seq_len, eos),
/// RepetitionPenaltyLogitsProcessor(repetition_penalty)])` on `scores` (N, V) for `ids`
/// (N, L), on the scores' device.
fn process(ids: &Tensor, scores: &Tensor, opts: &GenerateOptions) -> Result<Tensor> {
    let (_, vocab) = scores.size2()?;
    let len = ids.size().last().copied().unwrap_or(0);
    let mut scores = scores.shallow_clone();
    if len < opts.min_seq_len as i64 && opts.eos_id < vocab {
        let eos = Tensor::f_from_slice(&[opts.eos_id])?.f_to_device(scores.device())?;
        scores = scores.f_index_fill(1, &eos, f64::NEG_INFINITY)?;
    }
    let penalty = opts.repetition_penalty;
    let score = scores.f_gather(1, ids, false)?;
    let score = score
        .f_mul_scalar(penalty)?
        .f_where_self(&score.f_lt(0.0)?, &score.f_div_scalar(penalty)?)?;
    Ok(scores.f_scatter(1, ids, &score)?)
}

/// `TopKLogitsWarper(k)` or `TopPLogitsWarper(p)` (filter value -inf, one token kept at least).
fn warp(scores: &Tensor, strategy: Strategy) -> Result<Tensor> {
    let (_, vocab) = scores.size2()?;
    match strategy {
        Strategy::TopK { k } => {
            let k = (k as i64).min(vocab);
            let (values, _) = scores.f_topk(k, -1, true, true)?;
            let kth = values.f_narrow(-1, k - 1, 1)?;
            Ok(scores.f_masked_fill(&scores.f_lt_tensor(&kth)?, f64::NEG_INFINITY)?)
        }
        Strategy::TopP { p } => {
            let (sorted, order) = scores.f_sort(-1, false)?;
            let cumulative = sorted.f_softmax(-1, None)?.f_cumsum(-1, None)?;
            let remove = cumulative.f_le(1.0 - p)?;
            // The largest token is always kept (min_tokens_to_keep 1).
            let _ = remove.f_narrow(-1, vocab - 1, 1)?.f_fill_(0)?;
            let remove = remove.f_scatter(1, &order, &remove)?;
            Ok(scores.f_masked_fill(&remove, f64::NEG_INFINITY)?)
        }
        Strategy::BeamSearch { .. } => Ok(scores.shallow_clone()),
    }
}

// --- sampling ---------------------------------------------------------------------------

/// `CoCa.generate`'s top_k / top_p loop.
fn sample(
    batch: usize,
    opts: &GenerateOptions,
    model: &mut impl FnMut(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Vec<Vec<i64>>> {
    let rows = index_tensor(&(0..batch).collect::<Vec<_>>())?;
    let mut out: Vec<Vec<i64>> = vec![vec![opts.sot_id]; batch];
    loop {
        let len = out[0].len();
        let window: Vec<&[i64]> =
            out.iter().map(|s| &s[len.saturating_sub(opts.max_seq_len)..]).collect();
        let cur_len = window[0].len();
        let running: Vec<usize> = (0..batch)
            .filter(|&r| out[r].last().is_some_and(|&t| t != opts.eos_id && t != opts.pad_id))
            .collect();
        let mut next = vec![opts.pad_id; batch];
        if running.is_empty() {
            if !opts.fixed_output_length {
                break;
            }
        } else if cur_len + 1 == opts.seq_len {
            // open_clip processes and warps the logits here too, then uses none of them.
            for &r in &running {
                next[r] = opts.eos_id;
            }
        } else {
            let (logits, vocab) = call_model(model, &rows, &ids_tensor(&window, Device::Cpu)?)?;
            check_in_vocab("sot_id", opts.sot_id, vocab)?;
            let device = logits.device();
            let running_window: Vec<&[i64]> = running.iter().map(|&r| window[r]).collect();
            let ids = ids_tensor(&running_window, device)?;
            let logits = logits.f_index_select(0, &index_tensor(&running)?.f_to_device(device)?)?;
            let filtered = warp(&process(&ids, &logits, opts)?, opts.strategy)?;
            let probs = filtered.f_div_scalar(opts.temperature)?.f_softmax(-1, None)?;
            let drawn = to_vec_i64(&probs.f_multinomial(1, false)?)?;
            for (&r, &t) in running.iter().zip(&drawn) {
                next[r] = t;
            }
        }
        for (seq, t) in out.iter_mut().zip(next) {
            seq.push(t);
        }
        if out[0].len() >= opts.seq_len {
            break;
        }
    }
    Ok(out)
}

// --- beam search ----------------------------------------------------------------------------

/// transformers' `BeamHypotheses` with `length_penalty` 1.0 and `early_stopping` False: the
/// `num_beams` best finished sequences of one image in one group.
struct Hypotheses {
    num_beams: usize,
    /// (score, sequence), in the order `add` leaves them (it matters for ties).
    beams: Vec<(f64, Vec<i64>)>,
    worst_score: f64,
}

impl Hypotheses {
    fn new(num_beams: usize) -> Self {
        Self { num_beams, beams: Vec::new(), worst_score: 1e9 }
    }

    fn add(&mut self, hyp: Vec<i64>, sum_logprobs: f64, generated_len: usize) {
        // sum / generated_len ** length_penalty, with length_penalty 1.0.
        let score = sum_logprobs / generated_len as f64;
        if self.beams.len() < self.num_beams || score > self.worst_score {
            self.beams.push((score, hyp));
            if self.beams.len() > self.num_beams {
                // Python's sorted([(s, idx)]): the lowest score, the first of equal ones.
                let mut order: Vec<(f64, usize)> =
                    self.beams.iter().enumerate().map(|(i, (s, _))| (*s, i)).collect();
                order.sort_by(|a, b| {
                    a.0.partial_cmp(&b.0).unwrap_or(std::cmp::Ordering::Equal).then(a.1.cmp(&b.1))
                });
                self.beams.remove(order[0].1);
                self.worst_score = order[1].0;
            } else if !(self.worst_score < score) {
                // Python's min(score, worst_score).
                self.worst_score = score;
            }
        }
    }

    fn is_done(&self, best_sum_logprobs: f64, cur_len: usize) -> bool {
        self.beams.len() >= self.num_beams && self.worst_score >= best_sum_logprobs / cur_len as f64
    }
}

/// What `BeamSearchScorer.process` hands back for one group: per beam of the group (image by
/// image), its score, its next token and the group row it continues.
struct Step {
    scores: Vec<f64>,
    tokens: Vec<i64>,
    sources: Vec<usize>,
}

/// transformers' `BeamSearchScorer` (length_penalty 1.0, early stopping False, one
/// hypothesis kept) as `_generate_beamsearch` drives it.
struct BeamScorer {
    num_groups: usize,
    group_size: usize,
    /// hyps[image * num_groups + group].
    hyps: Vec<Hypotheses>,
    done: Vec<bool>,
}

impl BeamScorer {
    fn new(batch: usize, num_beams: usize, num_groups: usize) -> Self {
        let group_size = num_beams / num_groups;
        Self {
            num_groups,
            group_size,
            hyps: (0..batch * num_groups).map(|_| Hypotheses::new(group_size)).collect(),
            done: vec![false; batch * num_groups],
        }
    }

    fn is_done(&self) -> bool {
        self.done.iter().all(|&d| d)
    }

    /// `process` for `group`: `group_ids` are the group's sequences (image by image), `top`
    /// per image the `2 * group_size` best (score, token, group-local beam), best first.
    fn process(
        &mut self,
        group_ids: &[Vec<i64>],
        top: &[Vec<(f64, i64, usize)>],
        group: usize,
        opts: &GenerateOptions,
    ) -> Result<Step> {
        let gs = self.group_size;
        let cur_len = group_ids.first().map_or(0, Vec::len) + 1;
        let n = top.len() * gs;
        let mut step = Step { scores: vec![0.0; n], tokens: vec![0; n], sources: vec![0; n] };
        for (image, candidates) in top.iter().enumerate() {
            let bg = image * self.num_groups + group;
            if self.done[bg] {
                // Pad the finished image; source 0 is the group's first row of image 0.
                for k in 0..gs {
                    step.scores[image * gs + k] = 0.0;
                    step.tokens[image * gs + k] = opts.pad_id;
                    step.sources[image * gs + k] = 0;
                }
                continue;
            }
            let mut beam = 0;
            for (rank, &(score, token, index)) in candidates.iter().enumerate() {
                let source = image * gs + index;
                if token == opts.eos_id {
                    if rank >= gs {
                        continue;
                    }
                    self.hyps[bg].add(group_ids[source].clone(), score, cur_len);
                } else {
                    step.scores[image * gs + beam] = score;
                    step.tokens[image * gs + beam] = token;
                    step.sources[image * gs + beam] = source;
                    beam += 1;
                }
                if beam == gs {
                    break;
                }
            }
            if beam < gs {
                return Err(TrainError::Input(format!(
                    "generate: more than {gs} of the {} best next tokens of image {image} are \
                     eos",
                    candidates.len()
                )));
            }
            // torch's max: NaN if any is.
            let best = candidates.iter().map(|c| c.0).fold(f64::NEG_INFINITY, |m, s| {
                if m.is_nan() || s.is_nan() {
                    f64::NAN
                } else {
                    m.max(s)
                }
            });
            self.done[bg] = self.done[bg] || self.hyps[bg].is_done(best, cur_len);
        }
        Ok(step)
    }

    /// `finalize`: the open beams of unfinished images join their hypotheses, then each
    /// image's best hypothesis over its groups, eos-terminated where it fits, padded.
    fn finalize(
        mut self,
        input_ids: &[Vec<i64>],
        beam_scores: &[f32],
        opts: &GenerateOptions,
    ) -> Result<Vec<Vec<i64>>> {
        let gs = self.group_size;
        for (bg, hyps) in self.hyps.iter_mut().enumerate() {
            if self.done[bg] {
                continue;
            }
            for k in 0..gs {
                let row = bg * gs + k;
                hyps.add(input_ids[row].clone(), f64::from(beam_scores[row]), input_ids[row].len());
            }
        }
        let batch = self.hyps.len() / self.num_groups;
        let mut best = Vec::with_capacity(batch);
        for image in 0..batch {
            let mut candidates: Vec<&(f64, Vec<i64>)> = self.hyps
                [image * self.num_groups..(image + 1) * self.num_groups]
                .iter()
                .flat_map(|h| &h.beams)
                .collect();
            // Python's stable sorted() by score, then pop(): the last of the best.
            candidates.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(std::cmp::Ordering::Equal));
            let Some(&(_, hyp)) = candidates.last() else {
                return Err(TrainError::Input(format!(
                    "generate: beam search ended with no hypothesis for image {image}"
                )));
            };
            best.push(hyp.clone());
        }
        let longest = best.iter().map(Vec::len).max().unwrap_or(0);
        let width = (longest + 1).min(opts.seq_len);
        Ok(best
            .into_iter()
            .map(|mut hyp| {
                if hyp.len() < width {
                    hyp.push(opts.eos_id);
                }
                hyp.resize(width, opts.pad_id);
                hyp
            })
            .collect())
    }
}

/// `CoCa._generate_beamsearch`, then `generate`'s `fixed_output_length` padding.
fn beam_search(
    batch: usize,
    opts: &GenerateOptions,
    num_beams: usize,
    num_groups: usize,
    model: &mut impl FnMut(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Vec<Vec<i64>>> {
    let gs = num_beams / num_groups;
    let rows = index_tensor(&(0..batch * num_beams).map(|i| i / num_beams).collect::<Vec<_>>())?;
    let mut scorer = BeamScorer::new(batch, num_beams, num_groups);
    let mut input_ids: Vec<Vec<i64>> = vec![vec![opts.sot_id]; batch * num_beams];
    // 0 for the first beam of each group, -1e9 for the others (float32, as open_clip's).
    let mut beam_scores: Vec<f32> =
        (0..batch * num_beams).map(|i| if i % gs == 0 { 0.0 } else { -1e9 }).collect();
    loop {
        let (logits, vocab) = call_model(model, &rows, &ids_tensor(&input_ids, Device::Cpu)?)?;
        check_in_vocab("sot_id", opts.sot_id, vocab)?;
        check_in_vocab("pad_id", opts.pad_id, vocab)?;
        if vocab < 2 {
            return Err(TrainError::Input(
                "generate: beam search needs a vocabulary of at least 2 tokens".into(),
            ));
        }
        let device = logits.device();
        let mut current_tokens = vec![0i64; batch * num_beams];
        for group in 0..num_groups {
            let group_rows: Vec<usize> = (0..batch)
                .flat_map(|image| (0..gs).map(move |k| image * num_beams + group * gs + k))
                .collect();
            let group_ids: Vec<Vec<i64>> =
                group_rows.iter().map(|&r| input_ids[r].clone()).collect();
            let group_logits =
                logits.f_index_select(0, &index_tensor(&group_rows)?.f_to_device(device)?)?;
            let processed = process(&ids_tensor(&group_ids, device)?, &group_logits, opts)?;
            let group_scores: Vec<f32> = group_rows.iter().map(|&r| beam_scores[r]).collect();
            let group_scores = Tensor::f_from_slice(&group_scores)?.f_to_device(device)?;
            let scores = processed
                .f_add(&group_scores.f_unsqueeze(-1)?)?
                .f_view([batch as i64, gs as i64 * vocab])?;
            let (values, indices) = scores.f_topk(2 * gs as i64, 1, true, true)?;
            let (values, indices) = (to_vec_f64(&values)?, to_vec_i64(&indices)?);
            let top: Vec<Vec<(f64, i64, usize)>> = values
                .chunks(2 * gs)
                .zip(indices.chunks(2 * gs))
                .map(|(v, i)| {
                    v.iter().zip(i).map(|(&s, &i)| (s, i % vocab, (i / vocab) as usize)).collect()
                })
                .collect();
            let step = scorer.process(&group_ids, &top, group, opts)?;
            for (j, &r) in group_rows.iter().enumerate() {
                // Stored as float32, as open_clip's beam_scores.
                beam_scores[r] = step.scores[j] as f32;
                input_ids[r] = group_ids[step.sources[j]].clone();
                current_tokens[r] = step.tokens[j];
            }
        }
        for (seq, t) in input_ids.iter_mut().zip(current_tokens) {
            seq.push(t);
        }
        if scorer.is_done() || input_ids[0].len() >= opts.seq_len {
            break;
        }
    }
    let mut out = scorer.finalize(&input_ids, &beam_scores, opts)?;
    if opts.fixed_output_length {
        for seq in &mut out {
            if seq.len() < opts.seq_len {
                seq.resize(opts.seq_len, opts.pad_id);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(opts: GenerateOptions) -> String {
        let err = generate(1, &opts, |_, _| Ok(Tensor::zeros([1, 4], (Kind::Float, Device::Cpu))));
        match err {
            Err(e) => e.to_string(),
            Ok(out) => panic!("{opts:?} generated {out:?}"),
        }
    }

    fn with(strategy: Strategy) -> GenerateOptions {
        GenerateOptions { strategy, ..GenerateOptions::default() }
    }

    #[test]
    fn the_defaults_are_open_clips() {
        let d = GenerateOptions::default();
        assert_eq!(d.strategy, Strategy::BeamSearch { num_beams: 6, num_beam_groups: 3 });
        assert_eq!((d.seq_len, d.max_seq_len, d.min_seq_len), (30, 77, 5));
        assert_eq!((d.temperature, d.repetition_penalty), (1.0, 1.0));
        assert_eq!((d.sot_id, d.eos_id, d.pad_id, d.fixed_output_length), (49406, 49407, 0, false));
        d.validate().unwrap();
    }

    #[test]
    fn bad_options_are_refused_with_what_is_wrong() {
        let d = GenerateOptions::default;
        let cases = [
            (
                GenerateOptions { seq_len: 5, ..d() },
                "seq_len (5) must be larger than min_seq_len (5)",
            ),
            (GenerateOptions { max_seq_len: 0, ..d() }, "max_seq_len must be at least 1"),
            (GenerateOptions { temperature: 0.0, ..d() }, "temperature must be a positive"),
            (GenerateOptions { temperature: f64::NAN, ..d() }, "temperature must be a positive"),
            (GenerateOptions { temperature: f64::INFINITY, ..d() }, "temperature must be"),
            (GenerateOptions { repetition_penalty: -1.0, ..d() }, "repetition_penalty must be"),
            (GenerateOptions { repetition_penalty: f64::NAN, ..d() }, "repetition_penalty"),
            (GenerateOptions { sot_id: -1, ..d() }, "sot_id must be a token id"),
            (GenerateOptions { eos_id: -2, ..d() }, "eos_id must be a token id"),
            (GenerateOptions { pad_id: -1, ..d() }, "pad_id must be a token id"),
            (
                with(Strategy::BeamSearch { num_beams: 1, num_beam_groups: 1 }),
                "beam search needs at least 2 beams",
            ),
            (
                with(Strategy::BeamSearch { num_beams: 6, num_beam_groups: 4 }),
                "num_beam_groups (4) must divide num_beams (6)",
            ),
            (
                with(Strategy::BeamSearch { num_beams: 6, num_beam_groups: 0 }),
                "num_beam_groups (0) must divide",
            ),
            (
                with(Strategy::BeamSearch { num_beams: 2, num_beam_groups: 4 }),
                "num_beam_groups (4) must divide",
            ),
            (
                GenerateOptions { seq_len: 1, min_seq_len: 0, ..d() },
                "beam search needs seq_len of at least 2",
            ),
            (with(Strategy::TopK { k: 0 }), "top_k must be at least 1"),
            (with(Strategy::TopP { p: 1.5 }), "top_p must be in [0, 1], not 1.5"),
            (with(Strategy::TopP { p: -0.1 }), "top_p must be in [0, 1]"),
            (with(Strategy::TopP { p: f64::NAN }), "top_p must be in [0, 1]"),
        ];
        for (opts, expected) in cases {
            let message = error_of(opts.clone());
            assert!(message.contains(expected), "{opts:?}: {message}");
            assert!(message.starts_with("generate: "), "{message}");
        }
    }

    #[test]
    fn what_the_model_gives_is_checked() {
        let opts = GenerateOptions { sot_id: 1, eos_id: 2, seq_len: 8, ..Default::default() };
        let wrong_rows = generate(2, &opts, |_, ids| {
            Ok(Tensor::zeros([ids.size()[0] + 1, 4], (Kind::Float, Device::Cpu)))
        });
        assert!(wrong_rows.unwrap_err().to_string().contains("expected [12, vocabulary size]"));
        let ints = generate(1, &opts, |_, ids| {
            Ok(Tensor::zeros([ids.size()[0], 4], (Kind::Int64, Device::Cpu)))
        });
        assert!(ints.unwrap_err().to_string().contains("floating point"));
        let small = GenerateOptions { sot_id: 9, ..opts.clone() };
        let out_of_vocab = generate(1, &small, |_, ids| {
            Ok(Tensor::zeros([ids.size()[0], 4], (Kind::Float, Device::Cpu)))
        });
        let message = out_of_vocab.unwrap_err().to_string();
        assert!(message.contains("sot_id 9 is not a token of the model's vocabulary of 4"));
        let failing = generate(1, &opts, |_, _| Err(TrainError::Input("model broke".into())));
        assert_eq!(failing.unwrap_err().to_string(), "model broke");
    }

    #[test]
    fn no_images_give_no_captions() {
        let out = generate(0, &GenerateOptions::default(), |_, _| unreachable!()).unwrap();
        assert!(out.is_empty());
    }

    #[test]
    fn hypotheses_keep_the_best_and_drop_the_first_of_equal_worst() {
        let mut h = Hypotheses::new(2);
        h.add(vec![1], 4.0, 2); // 2.0
        h.add(vec![2], 2.0, 2); // 1.0
        assert_eq!(h.worst_score, 1.0);
        h.add(vec![3], 6.0, 2); // 3.0: [2] goes
        assert_eq!(h.beams.iter().map(|b| b.1[0]).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(h.worst_score, 2.0);
        h.add(vec![4], 4.0, 2); // 2.0, not better than the worst: refused
        assert_eq!(h.beams.len(), 2);
        assert!(h.is_done(5.0, 3)); // 2.0 >= 5/3
        assert!(!h.is_done(7.0, 3));
    }
}
