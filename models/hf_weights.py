"""Hugging Face tensor names ↔ our parameter paths, with the layout change between them.

HF linear weights are [out, in]; ours are [in, out] with heads split out, so that each
logical axis is its own dimension and can be sharded by name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from models.config import ModelConfig

# Buffers some exporters write that carry no weights.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class WeightMapping:
    hf_name: str
    path: str  # our dotted parameter path, e.g. "layers.3.attn.q_proj"
    hf_shape: tuple[int, ...]
    transform: Callable[[np.ndarray], np.ndarray]


def _linear_in_heads(heads: int, dim: int) -> Callable[[np.ndarray], np.ndarray]:
    # [heads*dim, embed] → [embed, heads, dim]
    return lambda w: w.T.reshape(w.shape[1], heads, dim)


def _linear_out_heads(heads: int, dim: int) -> Callable[[np.ndarray], np.ndarray]:
    # [embed, heads*dim] → [heads, dim, embed]
    return lambda w: w.T.reshape(heads, dim, w.shape[0])


def _identity(w: np.ndarray) -> np.ndarray:
    return w


def _transpose(w: np.ndarray) -> np.ndarray:
    return w.T


def layer_item(layer: int) -> str:
    return f"layer_{layer:04d}"


def item_of(path: str) -> str:
    """Checkpoint item (one Orbax tree) a parameter path belongs to."""
    parts = path.split(".")
    if parts[0] == "layers":
        return layer_item(int(parts[1]))
    return "embed" if parts[0] == "embed" else "head"


def weight_mappings(cfg: ModelConfig) -> list[WeightMapping]:
    e, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    h, k, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    out = [WeightMapping("model.embed_tokens.weight", "embed", (v, e), _identity)]
    for n in range(cfg.num_layers):
        hf, ours = f"model.layers.{n}", f"layers.{n}"
        out += [
            WeightMapping(
                f"{hf}.input_layernorm.weight", f"{ours}.input_norm.weight", (e,), _identity
            ),
            WeightMapping(
                f"{hf}.self_attn.q_proj.weight",
                f"{ours}.attn.q_proj",
                (h * d, e),
                _linear_in_heads(h, d),
            ),
            WeightMapping(
                f"{hf}.self_attn.k_proj.weight",
                f"{ours}.attn.k_proj",
                (k * d, e),
                _linear_in_heads(k, d),
            ),
            WeightMapping(
                f"{hf}.self_attn.v_proj.weight",
                f"{ours}.attn.v_proj",
                (k * d, e),
                _linear_in_heads(k, d),
            ),
            WeightMapping(
                f"{hf}.self_attn.o_proj.weight",
                f"{ours}.attn.o_proj",
                (e, h * d),
                _linear_out_heads(h, d),
            ),
            WeightMapping(
                f"{hf}.post_attention_layernorm.weight",
                f"{ours}.post_attn_norm.weight",
                (e,),
                _identity,
            ),
            WeightMapping(
                f"{hf}.mlp.gate_proj.weight", f"{ours}.mlp.gate_proj", (i, e), _transpose
            ),
            WeightMapping(f"{hf}.mlp.up_proj.weight", f"{ours}.mlp.up_proj", (i, e), _transpose),
            WeightMapping(
                f"{hf}.mlp.down_proj.weight", f"{ours}.mlp.down_proj", (e, i), _transpose
            ),
        ]
        if cfg.qkv_bias:
            for proj, heads in (("q", h), ("k", k), ("v", k)):
                out.append(
                    WeightMapping(
                        f"{hf}.self_attn.{proj}_proj.bias",
                        f"{ours}.attn.{proj}_bias",
                        (heads * d,),
                        lambda b, heads=heads: b.reshape(heads, d),
                    )
                )
        if cfg.qk_norm:
            out += [
                WeightMapping(
                    f"{hf}.self_attn.q_norm.weight", f"{ours}.attn.q_norm.weight", (d,), _identity
                ),
                WeightMapping(
                    f"{hf}.self_attn.k_norm.weight", f"{ours}.attn.k_norm.weight", (d,), _identity
                ),
            ]
    out.append(WeightMapping("model.norm.weight", "final_norm.weight", (e,), _identity))
    if not cfg.tie_word_embeddings:
        out.append(WeightMapping("lm_head.weight", "lm_head", (v, e), _transpose))
    return out


def unexpected_names(cfg: ModelConfig, names: list[str]) -> list[str]:
    """Names in a checkpoint that the model has no place for."""
    known = {m.hf_name for m in weight_mappings(cfg)}
    tied_head = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    return sorted(
        n
        for n in names
        if n not in known and n not in tied_head and not n.endswith(IGNORED_SUFFIXES)
    )
