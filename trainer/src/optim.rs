//! AdamW (Loshchilov & Hutter), written out so its state is plain named tensors that a
//! checkpoint saves and restores exactly. The update follows `torch.optim.AdamW`
//! (decoupled decay first, then bias-corrected Adam), with open_clip's decay rule.

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use crate::error::{Result, TrainError};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
}

/// open_clip `main.py`: no weight decay on gains, biases, LayerNorms and the temperature
/// (`p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n`).
pub fn decays(name: &str, tensor: &Tensor) -> bool {
    let excluded = tensor.dim() < 2
        || name.contains("bn")
        || name.contains("ln")
        || name.contains("bias")
        || name.contains("logit_scale");
    !excluded
}

#[derive(Debug)]
struct Param {
    name: String,
    var: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    weight_decay: f64,
}

#[derive(Debug)]
pub struct AdamW {
    params: Vec<Param>,
    config: AdamWConfig,
    /// Updates taken so far (the bias-correction exponent).
    step: u64,
}

impl AdamW {
    /// Optimises the trainable variables given by name; state starts at zero.
    pub fn new(variables: BTreeMap<String, Tensor>, config: AdamWConfig) -> Self {
        let params = variables
            .into_iter()
            .filter(|(_, var)| var.requires_grad())
            .map(|(name, var)| {
                let weight_decay = if decays(&name, &var) { config.weight_decay } else { 0.0 };
                Param {
                    exp_avg: var.zeros_like(),
                    exp_avg_sq: var.zeros_like(),
                    name,
                    var,
                    weight_decay,
                }
            })
            .collect();
        AdamW { params, config, step: 0 }
    }

    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// Names of the parameters with weight decay, for inspection and tests.
    pub fn decayed(&self) -> Vec<&str> {
        self.params.iter().filter(|p| p.weight_decay > 0.0).map(|p| p.name.as_str()).collect()
    }

    pub fn variables(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.params.iter().map(|p| (p.name.as_str(), &p.var))
    }

    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            let mut grad = p.var.grad();
            if grad.defined() {
                let _ = grad.detach_().zero_();
            }
        }
    }

    /// Rescales gradients so their global L2 norm is at most `max_norm`; returns the norm
    /// before clipping (`torch.nn.utils.clip_grad_norm_`).
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        let _guard = tch::no_grad_guard();
        let grads: Vec<Tensor> =
            self.params.iter().map(|p| p.var.grad()).filter(|g| g.defined()).collect();
        if grads.is_empty() {
            return 0.0;
        }
        let norms: Vec<Tensor> =
            grads.iter().map(|g| g.to_kind(Kind::Float).norm().unsqueeze(0)).collect();
        let total = Tensor::cat(&norms, 0).norm().double_value(&[]);
        let coef = max_norm / (total + 1e-6);
        if coef < 1.0 {
            for mut g in grads {
                let _ = g.g_mul_scalar_(coef);
            }
        }
        total
    }

    /// One AdamW update at learning rate `lr`. `found_inf` (a 1-element fp32 tensor, the
    /// gradient scaler's) skips it when nonzero: no parameter, moment or step count changes, as
    /// in torch's fused AdamW.
    pub fn step(&mut self, lr: f64, found_inf: Option<&Tensor>) {
        let _guard = tch::no_grad_guard();
        // A host read of the flag, once a step under `precision: amp`: the fused AdamW kernel
        // (issue 24's optimizer lever) replaces this loop and takes `found_inf` on the device.
        if found_inf.is_some_and(|f| f.double_value(&[]) != 0.0) {
            return;
        }
        self.step += 1;
        let (beta1, beta2) = self.config.betas;
        let bias_correction1 = 1.0 - beta1.powi(self.step as i32);
        let bias_correction2_sqrt = (1.0 - beta2.powi(self.step as i32)).sqrt();
        let step_size = lr / bias_correction1;
        for p in &mut self.params {
            let grad = p.var.grad();
            if !grad.defined() {
                continue;
            }
            let grad = grad.to_kind(p.exp_avg.kind());
            let mut var = p.var.shallow_clone();
            if p.weight_decay != 0.0 {
                let _ = var.g_mul_scalar_(1.0 - lr * p.weight_decay);
            }
            // exp_avg += (1 - beta1) (grad - exp_avg); exp_avg_sq = beta2 exp_avg_sq + (1 - beta2) grad^2
            let _ = p.exp_avg.lerp_(&grad, 1.0 - beta1);
            let _ = p.exp_avg_sq.g_mul_scalar_(beta2).addcmul_(&grad, &(&grad * (1.0 - beta2)));
            // param -= step_size * exp_avg / (sqrt(exp_avg_sq) / sqrt(bias_correction2) + eps)
            let mut denom = p.exp_avg_sq.sqrt();
            let _ = denom.g_div_scalar_(bias_correction2_sqrt).g_add_scalar_(self.config.eps);
            let _ = var.addcdiv_(&(&p.exp_avg * (-step_size)), &denom);
        }
    }

    /// The state as named tensors: `exp_avg.<param>`, `exp_avg_sq.<param>`, and `step`.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.params.len() + 1);
        for p in &self.params {
            out.push((format!("exp_avg.{}", p.name), p.exp_avg.shallow_clone()));
            out.push((format!("exp_avg_sq.{}", p.name), p.exp_avg_sq.shallow_clone()));
        }
        out.push(("step".to_string(), Tensor::from(self.step as i64)));
        out
    }

    /// Restores what `state_tensors` saved; every parameter's state must be present.
    pub fn load_state_tensors(&mut self, state: &BTreeMap<String, Tensor>) -> Result<()> {
        let missing = |key: &str| TrainError::Config(format!("optimizer state lacks `{key}`"));
        let step = state.get("step").ok_or_else(|| missing("step"))?;
        let _guard = tch::no_grad_guard();
        for p in &mut self.params {
            for (key, dst) in [("exp_avg", &mut p.exp_avg), ("exp_avg_sq", &mut p.exp_avg_sq)] {
                let key = format!("{key}.{}", p.name);
                let src = state.get(&key).ok_or_else(|| missing(&key))?;
                if src.size() != dst.size() {
                    return Err(TrainError::Config(format!(
                        "optimizer state `{key}` has shape {:?}, the parameter {:?}",
                        src.size(),
                        dst.size()
                    )));
                }
                dst.f_copy_(&src.f_to_device(dst.device())?.f_to_kind(dst.kind())?)?;
            }
        }
        self.step = step.int64_value(&[]) as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn, Device};

    #[test]
    fn open_clip_decay_rule() {
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg: crate::model::ModelConfig =
            serde_yaml::from_str(include_str!("../../configs/models/tiny.yaml"))
                .expect("tiny.yaml parses");
        let _model = crate::model::Clip::new(&vs.root(), &cfg).expect("model builds");
        let opt = AdamW::new(
            vs.variables().into_iter().collect(),
            AdamWConfig { betas: (0.9, 0.98), eps: 1e-6, weight_decay: 0.2 },
        );
        let decayed: Vec<&str> = opt.decayed();
        for name in [
            "visual.conv1.weight",
            "visual.proj",
            "text_projection",
            "token_embedding.weight",
            "positional_embedding",
            "visual.positional_embedding",
            "transformer.resblocks.0.attn.in_proj_weight",
            "visual.transformer.resblocks.1.mlp.c_fc.weight",
        ] {
            assert!(decayed.contains(&name), "{name} should decay");
        }
        for name in [
            "logit_scale",
            "visual.class_embedding",
            "ln_final.weight",
            "visual.ln_pre.weight",
            "transformer.resblocks.0.attn.in_proj_bias",
            "transformer.resblocks.0.ln_1.weight",
            "transformer.resblocks.0.mlp.c_fc.bias",
        ] {
            assert!(!decayed.contains(&name), "{name} should not decay");
        }
    }

    #[test]
    fn matches_torch_adamw_update_by_hand() {
        // Two steps on one weight matrix, checked against the closed form of torch.optim.AdamW.
        let w = Tensor::from_slice(&[1.0f64, -2.0, 0.5, 3.0]).view([2, 2]).set_requires_grad(true);
        let mut opt = AdamW::new(
            [("w".to_string(), w.shallow_clone())].into(),
            AdamWConfig { betas: (0.9, 0.98), eps: 1e-6, weight_decay: 0.1 },
        );
        let g = Tensor::from_slice(&[0.1f64, -0.2, 0.3, 0.0]).view([2, 2]);
        let (mut p, mut m, mut v) = (w.detach().copy(), g.zeros_like(), g.zeros_like());
        for t in 1..=2 {
            opt.zero_grad();
            (&w * &g).sum(Kind::Double).backward();
            opt.step(0.01, None);
            p = &p * (1.0 - 0.01 * 0.1);
            m = &m * 0.9 + &g * 0.1;
            v = &v * 0.98 + &g * &g * 0.02;
            let mhat = &m / (1.0 - 0.9f64.powi(t));
            let vhat = &v / (1.0 - 0.98f64.powi(t));
            p = &p - mhat / (vhat.sqrt() + 1e-6) * 0.01;
        }
        let diff = (w.detach() - p).abs().max().double_value(&[]);
        assert!(diff < 1e-9, "diff {diff}");
        assert_eq!(opt.steps_taken(), 2);
    }

    #[test]
    fn clip_grad_norm_rescales_to_the_limit() {
        let w = Tensor::zeros([4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let mut opt = AdamW::new(
            [("w".to_string(), w.shallow_clone())].into(),
            AdamWConfig { betas: (0.9, 0.98), eps: 1e-6, weight_decay: 0.0 },
        );
        (&w * Tensor::from_slice(&[3.0f32, 4.0, 0.0, 0.0])).sum(Kind::Float).backward();
        let norm = opt.clip_grad_norm(1.0);
        assert!((norm - 5.0).abs() < 1e-5);
        let clipped = w.grad().norm().double_value(&[]);
        assert!((clipped - 1.0).abs() < 1e-4, "{clipped}");
    }
}
