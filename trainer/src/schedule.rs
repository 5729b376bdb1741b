//! Learning-rate schedules, step for step open_clip's `scheduler.py` (warmup is
//! `base_lr * (step + 1) / warmup`, so step 0 already trains).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScheduleKind {
    /// Linear warmup, then cosine decay to 0 at the last step.
    Cosine,
    /// Linear warmup, then constant.
    Const,
    /// Linear warmup, constant, then a polynomial cooldown over the last `cooldown_steps`.
    ConstCooldown,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub base_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub cooldown_steps: u64,
    pub cooldown_power: f64,
    pub cooldown_end_lr: f64,
}

impl Schedule {
    /// The learning rate for the update at `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.base_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        match self.kind {
            ScheduleKind::Const => self.base_lr,
            ScheduleKind::Cosine => {
                let e = (step - self.warmup_steps) as f64;
                let es = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
                0.5 * (1.0 + (std::f64::consts::PI * e / es).cos()) * self.base_lr
            }
            ScheduleKind::ConstCooldown => {
                let start = self.total_steps.saturating_sub(self.cooldown_steps);
                if step < start {
                    return self.base_lr;
                }
                let e = (step - start) as f64;
                let es = (self.total_steps - start).max(1) as f64;
                let decay = (1.0 - e / es).max(0.0).powf(self.cooldown_power);
                decay * (self.base_lr - self.cooldown_end_lr) + self.cooldown_end_lr
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(kind: ScheduleKind) -> Schedule {
        Schedule {
            kind,
            base_lr: 1.0,
            warmup_steps: 10,
            total_steps: 110,
            cooldown_steps: 20,
            cooldown_power: 1.0,
            cooldown_end_lr: 0.0,
        }
    }

    #[test]
    fn warmup_is_linear_from_the_first_step() {
        let s = schedule(ScheduleKind::Cosine);
        assert!((s.lr(0) - 0.1).abs() < 1e-12);
        assert!((s.lr(4) - 0.5).abs() < 1e-12);
        assert!((s.lr(9) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn cosine_peaks_after_warmup_halves_midway_and_ends_near_zero() {
        let s = schedule(ScheduleKind::Cosine);
        assert!((s.lr(10) - 1.0).abs() < 1e-12);
        assert!((s.lr(60) - 0.5).abs() < 1e-12);
        assert!(s.lr(109) < 1e-3);
        for step in 10..109 {
            assert!(s.lr(step + 1) <= s.lr(step), "not monotone at {step}");
        }
    }

    #[test]
    fn const_cooldown_holds_then_decays_linearly() {
        let s = schedule(ScheduleKind::ConstCooldown);
        assert_eq!(s.lr(50), 1.0);
        assert_eq!(s.lr(89), 1.0);
        assert!((s.lr(90) - 1.0).abs() < 1e-12);
        assert!((s.lr(100) - 0.5).abs() < 1e-12);
        assert_eq!(schedule(ScheduleKind::Const).lr(109), 1.0);
    }
}
