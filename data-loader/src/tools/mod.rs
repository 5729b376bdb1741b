//! The data commands: `oxclip data pack` ([`pack`]), `data stats` ([`stats`]), `data synth`
//! ([`synth`]). They use the floors below (formats, sources) and nothing below uses them.

pub mod pack;
pub mod stats;
pub mod synth;
