"""Model configuration built from a Hugging Face `config.json`."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

SUPPORTED_ARCHITECTURES: Mapping[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
# Families whose MLPs are (some or all) sparse mixture-of-experts blocks.
MOE_FAMILIES = frozenset({"mixtral", "qwen3_moe"})


class UnsupportedModelError(ValueError):
    """The checkpoint uses an architecture or config feature we do not implement."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    kind: str = "default"  # "default" or "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the decoder needs; one frozen object for all supported families."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    # Per layer: None for full attention, else the window size in tokens.
    sliding_windows: tuple[int | None, ...] = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    architecture: str = ""
    # Mixture of experts (0 experts: a dense model). `moe_layers` lists the layers whose
    # MLP is a sparse block; the others keep the dense MLP of `intermediate_size`.
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    # Renormalise the top-k router probabilities to sum to 1 (Mixtral always does).
    norm_topk_prob: bool = True
    moe_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if self.sliding_windows and len(self.sliding_windows) != self.num_layers:
            raise UnsupportedModelError("sliding window list length differs from layer count")
        if self.moe_layers and not 0 < self.experts_per_token <= self.num_experts:
            raise UnsupportedModelError(
                f"num_experts_per_tok={self.experts_per_token} must be in [1, "
                f"num_experts={self.num_experts}]"
            )

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def window(self, layer: int) -> int | None:
        return self.sliding_windows[layer] if self.sliding_windows else None

    def is_moe(self, layer: int) -> bool:
        return layer in self.moe_layers

    def num_parameters(self, active: bool = False) -> int:
        """All parameters; with `active`, those one token reads (its k experts only)."""
        e, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = e * d * (2 * self.num_heads + 2 * self.num_kv_heads)
        if self.qkv_bias:
            attn += d * (self.num_heads + 2 * self.num_kv_heads)
        if self.qk_norm:
            attn += 2 * d
        experts = self.experts_per_token if active else self.num_experts
        moe_mlp = e * self.num_experts + experts * 3 * e * self.moe_intermediate_size
        mlps = sum(moe_mlp if self.is_moe(n) else 3 * e * i for n in range(self.num_layers))
        head = 0 if self.tie_word_embeddings else self.vocab_size * e
        return self.vocab_size * e + self.num_layers * (attn + 2 * e) + mlps + e + head

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelConfig:
        data = dict(data)
        data["rope"] = RopeConfig(**data["rope"])
        data["sliding_windows"] = tuple(data.get("sliding_windows") or ())
        data["eos_token_ids"] = tuple(data.get("eos_token_ids") or ())
        data["moe_layers"] = tuple(data.get("moe_layers") or ())
        return cls(**data)


def _rope_from_hf(hf: Mapping[str, Any]) -> RopeConfig:
    # transformers >= 5 folds rope_theta into rope_parameters; older files keep both apart.
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind == "default":
        return RopeConfig(theta=float(theta))
    if kind == "llama3":
        return RopeConfig(
            theta=float(theta),
            kind="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position=int(params["original_max_position_embeddings"]),
        )
    raise UnsupportedModelError(
        f"rope scaling type {kind!r} is not supported (supported: default, llama3)"
    )


def _sliding_windows(hf: Mapping[str, Any], family: str, layers: int) -> tuple[int | None, ...]:
    window = hf.get("sliding_window")
    if family in ("mistral", "mixtral"):
        return (int(window),) * layers if window else ()
    if family in ("qwen2", "qwen3", "qwen3_moe"):
        if not hf.get("use_sliding_window") or not window:
            return ()
        types = hf.get("layer_types")
        if types is None:
            # Older Qwen configs: layers from max_window_layers onwards slide.
            first = int(hf.get("max_window_layers", layers))
            return tuple(None if i < first else int(window) for i in range(layers))
        return tuple(int(window) if t == "sliding_attention" else None for t in types)
    if window:
        raise UnsupportedModelError(f"sliding_window is not supported for {family}")
    return ()


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """Translate a Hugging Face config dict; unsupported features raise with their names."""
    archs = hf.get("architectures") or []
    family = hf.get("model_type")
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None and family not in SUPPORTED_ARCHITECTURES.values():
        raise UnsupportedModelError(
            f"architecture {archs or family!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    family = SUPPORTED_ARCHITECTURES.get(arch, family)
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"hidden_act={act!r} is not supported (only silu)")
    if hf.get("mlp_bias"):
        raise UnsupportedModelError("mlp_bias=true is not supported")
    if int(hf.get("pretraining_tp", 1) or 1) != 1:
        raise UnsupportedModelError("pretraining_tp != 1 is not supported")
    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    head_dim = hf.get("head_dim") or hidden // heads
    layers = int(hf["num_hidden_layers"])
    eos = hf.get("eos_token_id")
    eos_ids = tuple(
        int(x) for x in (eos if isinstance(eos, list) else [eos] if eos is not None else [])
    )
    qkv_bias = family == "qwen2" or bool(hf.get("attention_bias"))
    if hf.get("attention_bias") and family in ("llama", "mistral", "qwen3", *MOE_FAMILIES):
        # Our o_proj has no bias; HF adds one with attention_bias on these families.
        raise UnsupportedModelError(f"attention_bias=true is not supported for {family}")
    bos = hf.get("bos_token_id")
    return ModelConfig(
        family=family,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope=_rope_from_hf(hf),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        qk_norm=family in ("qwen3", "qwen3_moe"),
        sliding_windows=_sliding_windows(hf, family, layers),
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=eos_ids,
        architecture=arch or "",
        **_moe_from_hf(hf, family, layers),
    )


def _moe_from_hf(hf: Mapping[str, Any], family: str, layers: int) -> dict[str, Any]:
    if family not in MOE_FAMILIES:
        return {}
    # transformers 5 writes Qwen3-MoE's `num_experts` as `num_local_experts`.
    experts = int(hf.get("num_local_experts") or hf.get("num_experts") or 0)
    if experts <= 0:
        raise UnsupportedModelError(f"{family}: num_experts must be positive, got {experts}")
    if family == "mixtral":
        return dict(num_experts=experts, experts_per_token=int(hf["num_experts_per_tok"]),
                    moe_intermediate_size=int(hf["intermediate_size"]), norm_topk_prob=True,
                    moe_layers=tuple(range(layers)))
    if hf.get("shared_expert_intermediate_size"):
        raise UnsupportedModelError(f"{family}: shared experts are not supported")
    step = int(hf.get("decoder_sparse_step", 1) or 1)
    dense_only = {int(n) for n in hf.get("mlp_only_layers") or ()}
    # transformers' rule (Qwen3MoeDecoderLayer): sparse unless listed in mlp_only_layers,
    # on every `decoder_sparse_step`-th layer counting from 1.
    moe = tuple(n for n in range(layers) if n not in dense_only and (n + 1) % step == 0)
    return dict(num_experts=experts, experts_per_token=int(hf["num_experts_per_tok"]),
                moe_intermediate_size=int(hf["moe_intermediate_size"]),
                norm_topk_prob=bool(hf.get("norm_topk_prob", False)), moe_layers=moe)


GENERATION_CONFIG = "generation_config.json"


def generation_eos_ids(model_dir: str | os.PathLike) -> tuple[int, ...]:
    """The EOS ids of the directory's generation_config.json (an int or a list), if any."""
    path = os.path.join(model_dir, GENERATION_CONFIG)
    if not os.path.isfile(path):
        return ()
    with open(path) as f:
        eos = json.load(f).get("eos_token_id")
    values = eos if isinstance(eos, list) else [] if eos is None else [eos]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise UnsupportedModelError(
            f"{path}: eos_token_id must be an integer or a list of integers, got {eos!r}")
    return tuple(values)


def with_generation_eos(cfg: ModelConfig, model_dir: str | os.PathLike) -> ModelConfig:
    """`cfg` whose EOS ids also include generation_config.json's (what transformers'
    generate() stops at: e.g. Llama-3-Instruct's <|eot_id|> besides <|end_of_text|>)."""
    merged = tuple(dict.fromkeys((*cfg.eos_token_ids, *generation_eos_ids(model_dir))))
    return cfg if merged == cfg.eos_token_ids else dataclasses.replace(cfg, eos_token_ids=merged)


def load_hf_config(model_dir: str | os.PathLike) -> ModelConfig:
    """config.json, with generation_config.json's EOS ids added."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no config.json in {model_dir}")
    with open(path) as f:
        return with_generation_eos(config_from_hf(json.load(f)), model_dir)


def rope_inverse_frequencies(cfg: ModelConfig) -> list[float]:
    """Per-pair inverse frequencies, including llama3's wavelength-dependent scaling."""
    d = cfg.head_dim
    rope = cfg.rope
    inv = [1.0 / (rope.theta ** (2 * i / d)) for i in range(d // 2)]
    if rope.kind != "llama3":
        return inv
    low_wavelen = rope.original_max_position / rope.low_freq_factor
    high_wavelen = rope.original_max_position / rope.high_freq_factor
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / rope.factor)
        else:
            smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
                rope.high_freq_factor - rope.low_freq_factor
            )
            out.append((1 - smooth) * f / rope.factor + smooth * f)
    return out
