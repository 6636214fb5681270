"""Hugging Face tensor names ↔ our parameter paths, with the layout change between them.

HF linear weights are [out, in]; ours are [in, out] with heads split out, so that each
logical axis is its own dimension and can be sharded by name.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np

from meshserve.models.config import ModelConfig

# Buffers some exporters write that carry no weights.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class ConversionError(ValueError):
    """The source model cannot be converted; the message names every problem found."""


class TensorSource(Protocol):
    """Tensors under their Hugging Face names and in HF layout, read one at a time: what
    conversion streams from, whatever the file format (safetensors, GGUF)."""

    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> np.dtype:
        """The dtype `read` returns for this tensor."""
        ...

    def read(self, name: str) -> np.ndarray: ...

    def read_transposed(self, name: str, dtype) -> np.ndarray: ...

    def describe(self, name: str) -> str:
        """How error messages name a tensor, present or missing (with its name in the
        file, where that differs)."""
        ...


@dataclasses.dataclass(frozen=True)
class WeightMapping:
    hf_name: str
    path: str  # our dotted parameter path, e.g. "layers.3.attn.q_proj"
    hf_shape: tuple[int, ...]
    shape: tuple[int, ...]  # ours: the (transposed) tensor reshaped to split heads out
    transpose: bool = False  # HF linear weights are [out, in]
    # MoE: HF stores one tensor per expert; ours stacks them, this one at index `expert`
    # (`shape` is then the shape of one slice).
    expert: int | None = None


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
    W = WeightMapping
    out = [W("model.embed_tokens.weight", "embed", (v, e), (v, e))]
    for n in range(cfg.num_layers):
        hf, ours = f"model.layers.{n}", f"layers.{n}"
        att, mlp = f"{hf}.self_attn", f"{hf}.mlp"
        out += [
            W(f"{hf}.input_layernorm.weight", f"{ours}.input_norm.weight", (e,), (e,)),
            W(f"{att}.q_proj.weight", f"{ours}.attn.q_proj", (h * d, e), (e, h, d), True),
            W(f"{att}.k_proj.weight", f"{ours}.attn.k_proj", (k * d, e), (e, k, d), True),
            W(f"{att}.v_proj.weight", f"{ours}.attn.v_proj", (k * d, e), (e, k, d), True),
            W(f"{att}.o_proj.weight", f"{ours}.attn.o_proj", (e, h * d), (h, d, e), True),
            W(f"{hf}.post_attention_layernorm.weight", f"{ours}.post_attn_norm.weight",
              (e,), (e,)),
        ]
        if cfg.is_moe(n):
            out += _expert_mappings(cfg, hf, f"{ours}.mlp")
        else:
            out += [
                W(f"{mlp}.gate_proj.weight", f"{ours}.mlp.gate_proj", (i, e), (e, i), True),
                W(f"{mlp}.up_proj.weight", f"{ours}.mlp.up_proj", (i, e), (e, i), True),
                W(f"{mlp}.down_proj.weight", f"{ours}.mlp.down_proj", (e, i), (i, e), True),
            ]
        if cfg.qkv_bias:
            for proj, heads in (("q", h), ("k", k), ("v", k)):
                out.append(W(f"{att}.{proj}_proj.bias", f"{ours}.attn.{proj}_bias",
                             (heads * d,), (heads, d)))
        if cfg.qk_norm:
            out += [
                W(f"{att}.q_norm.weight", f"{ours}.attn.q_norm.weight", (d,), (d,)),
                W(f"{att}.k_norm.weight", f"{ours}.attn.k_norm.weight", (d,), (d,)),
            ]
    out.append(W("model.norm.weight", "final_norm.weight", (e,), (e,)))
    if not cfg.tie_word_embeddings:
        out.append(W("lm_head.weight", "lm_head", (v, e), (e, v), True))
    return out


def _expert_mappings(cfg: ModelConfig, hf: str, ours: str) -> list[WeightMapping]:
    """Router and per-expert tensors of one sparse layer, under each family's HF names
    (Mixtral: block_sparse_moe.experts.j.w1/w3/w2; Qwen3-MoE: mlp.experts.j.gate/up/down)."""
    e, n, i = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
    W = WeightMapping
    if cfg.family == "mixtral":
        block, names = f"{hf}.block_sparse_moe", ("w1", "w3", "w2")
    else:
        block, names = f"{hf}.mlp", ("gate_proj", "up_proj", "down_proj")
    out = [W(f"{block}.gate.weight", f"{ours}.router", (n, e), (e, n), True)]
    for j in range(n):
        g, u, d = (f"{block}.experts.{j}.{name}.weight" for name in names)
        out += [
            W(g, f"{ours}.gate_proj", (i, e), (e, i), True, j),
            W(u, f"{ours}.up_proj", (i, e), (e, i), True, j),
            W(d, f"{ours}.down_proj", (e, i), (i, e), True, j),
        ]
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
