//! `oxclip model list` and `oxclip model show`: the built-in architectures, and what a model
//! config builds (every state_dict name and shape), read from the config alone: nothing is
//! allocated, so ViT-e's 4.4 billion parameters list as fast as the tiny model's.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;

use anyhow::Context;
use clap::{Args, Subcommand};

use oxclip_trainer::config;
use oxclip_trainer::model::config::VisionTowerKind;
use oxclip_trainer::model::zoo::{self, Source};
use oxclip_trainer::model::{Clip, ModelConfig};

#[derive(Subcommand)]
pub enum ModelCommand {
    /// The built-in model names, one per line, with the image tower, the image size and the
    /// parameter count.
    List,
    /// A model's config and its parameters' names and shapes (open_clip's state_dict keys).
    Show(ModelShowArgs),
}

#[derive(Args)]
pub struct ModelShowArgs {
    /// A built-in name (`oxclip model list`), a model YAML, an open_clip model config JSON,
    /// or an `open_clip_config.json`.
    pub model: String,
    /// Print `{"config": ..., "parameters": {"<state_dict name>": [shape...]}}` instead of a
    /// summary.
    #[arg(long)]
    pub json: bool,
}

pub fn run(command: ModelCommand) -> anyhow::Result<()> {
    match command {
        ModelCommand::List => list(),
        ModelCommand::Show(args) => show(args),
    }
}

fn list() -> anyhow::Result<()> {
    let width = zoo::names().map(str::len).max().unwrap_or(0);
    let tower_width = zoo::names()
        .filter_map(|name| config::resolve_model(name).ok())
        .map(|cfg| tower(&cfg).len())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for name in zoo::names() {
        let cfg = config::resolve_model(name)?;
        // A tower this build does not construct still lists, without a count.
        let params = zoo::parameter_count(&cfg).map_or_else(|_| "-".to_owned(), millions);
        let source = match zoo::source(name) {
            Some(Source::OpenClip) => "open_clip",
            _ => "oxclip",
        };
        out += &format!(
            "{name:<width$}  {:<tower_width$}  {:>4} px  {params:>8}  {source}\n",
            tower(&cfg),
            cfg.vision_cfg.image_size
        );
    }
    emit(&out)
}

/// Writes `text` to stdout; a reader that stops early (`oxclip model list | head`) is not an error.
fn emit(text: &str) -> anyhow::Result<()> {
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn show(args: ModelShowArgs) -> anyhow::Result<()> {
    let cfg = config::resolve_model(&args.model)?;
    let shapes = Clip::shapes(&cfg).with_context(|| format!("model {}", args.model))?;
    if args.json {
        return emit(&json(&cfg, &shapes)?);
    }
    let count = zoo::parameter_count(&cfg)?;
    let origin = match zoo::source(&args.model) {
        Some(Source::OpenClip) => {
            format!("built-in, open_clip's model_configs/{}.json", args.model)
        }
        Some(Source::Oxclip) => format!("built-in, configs/models/{}.yaml", args.model),
        None => args.model.clone(),
    };
    let mut out = String::new();
    writeln!(out, "{} ({origin})", args.model)?;
    writeln!(out, "image tower: {}, {} px", tower(&cfg), cfg.vision_cfg.image_size)?;
    let t = &cfg.text_cfg;
    if let Some(name) = &t.hf_model_name {
        let arch = oxclip_trainer::model::hf_text::check(t)?;
        writeln!(
            out,
            "text tower:  {name} (Hugging Face {}): {} layers, width {}, {} heads, vocabulary {}, {} tokens, \
             padding id {}, {}, {} projection",
            arch.model_type(),
            arch.layers(),
            arch.width(),
            arch.heads(),
            arch.vocab_size(),
            t.context_length,
            arch.pad_token_id(),
            t.hf_pooler_type,
            t.hf_proj_type
        )?;
    } else {
        writeln!(
        out,
        "text tower:  {} layers, width {}, {} heads, {} tokens, vocabulary {}, {} attention, pooled at {}",
        t.layers,
        t.width,
        t.heads,
        t.context_length,
        t.vocab_size,
        if t.no_causal_mask { "bidirectional" } else { "causal" },
        if t.embed_cls {
            "an appended class token".to_owned()
        } else {
            serde_json::to_value(t.pool_type)?.as_str().unwrap_or("?").to_owned()
        }
    )?;
    }
    if let Some(m) = &cfg.multimodal_cfg {
        writeln!(
            out,
            "decoder:     CoCa, {} layers (self- and cross-attention), width {}, {} heads, vocabulary {}",
            m.layers, m.width, m.heads, t.vocab_size
        )?;
    }
    writeln!(out, "embedding:   {}", cfg.embed_dim)?;
    // Parameters per top-level module: the towers and the loss's scalars (buffers, such as
    // BatchNorm's statistics, are in the tensor count but not the parameter count).
    let params = Clip::parameter_shapes(&cfg)?;
    let mut groups: BTreeMap<&str, i64> = BTreeMap::new();
    for (name, shape) in &params {
        let group = name
            .split('.')
            .next()
            .filter(|g| ["visual", "text_decoder", "logit_scale", "logit_bias"].contains(g))
            .unwrap_or("text");
        *groups.entry(group).or_default() += shape.iter().product::<i64>();
    }
    let groups: Vec<String> =
        groups.iter().map(|(g, n)| format!("{g} {}", thousands(*n))).collect();
    writeln!(
        out,
        "parameters:  {} ({}), {} tensors",
        thousands(count),
        groups.join(", "),
        shapes.len()
    )?;
    writeln!(out, "config:")?;
    for line in serde_yaml::to_string(&cfg)?.lines() {
        writeln!(out, "  {line}")?;
    }
    emit(&out)
}

/// `{"config": ..., "parameters": {...}}`, the config indented, one parameter per line.
fn json(cfg: &ModelConfig, shapes: &[(String, Vec<i64>)]) -> anyhow::Result<String> {
    let config = serde_json::to_string_pretty(cfg)?.replace('\n', "\n  ");
    let params: Vec<String> = shapes
        .iter()
        .map(|(name, shape)| {
            Ok(format!("    {}: {}", serde_json::to_string(name)?, serde_json::to_string(shape)?))
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(format!(
        "{{\n  \"config\": {config},\n  \"parameters\": {{\n{}\n  }}\n}}\n",
        params.join(",\n")
    ))
}

/// `ViT`, `ModifiedResNet [3, 4, 6, 3]`, `timm vit_base_patch16_siglip_224`.
fn tower(cfg: &ModelConfig) -> String {
    let v = &cfg.vision_cfg;
    match v.tower() {
        VisionTowerKind::Vit if v.attentional_pool => format!(
            "ViT {}x{} patch {}, attentional pooler ({} queries)",
            v.vit_layers(),
            v.width,
            v.patch(),
            v.attn_pooler_queries
        ),
        VisionTowerKind::Vit => format!("ViT {}x{} patch {}", v.vit_layers(), v.width, v.patch()),
        VisionTowerKind::ResNet(stages) => format!("ModifiedResNet {stages:?}x{}", v.width),
        VisionTowerKind::Timm(name) => format!("timm {name}"),
    }
}

/// 151277313 -> `151.3M`.
fn millions(n: i64) -> String {
    format!("{:.1}M", n as f64 / 1e6)
}

/// 151277313 -> `151,277,313`.
fn thousands(n: i64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_valid_and_lists_every_tensor() {
        let cfg = zoo::builtin("tiny").unwrap();
        let shapes = Clip::shapes(&cfg).unwrap();
        let value: serde_json::Value = serde_json::from_str(&json(&cfg, &shapes).unwrap()).unwrap();
        assert_eq!(serde_json::from_value::<ModelConfig>(value["config"].clone()).unwrap(), cfg);
        assert_eq!(value["parameters"].as_object().unwrap().len(), shapes.len());
        assert_eq!(value["parameters"]["visual.proj"], serde_json::json!([64, 64]));
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(thousands(151_277_313), "151,277,313");
        assert_eq!(thousands(1), "1");
        assert_eq!(thousands(100_000), "100,000");
        assert_eq!(millions(151_277_313), "151.3M");
    }
}
