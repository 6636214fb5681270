"""A GGUF file (llama.cpp's format) seen as a Hugging Face model: an HF `config.json`
dict built from its metadata, and its tensors under HF names, in HF layout, dequantized.

Conversion then runs exactly as it does for safetensors (`hf_weights.TensorSource`).
Metadata and tensor offsets come from the `gguf` package's reader; tensor bytes are read
with plain file reads, one tensor at a time, so the process never maps the whole file.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from meshserve.models.hf_weights import ConversionError

# GGUF `general.architecture` → (HF architecture, HF model_type).
ARCHITECTURES: Mapping[str, tuple[str, str]] = {
    "llama": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "qwen3moe": ("Qwen3MoeForCausalLM", "qwen3_moe"),
}
# llama.cpp files Mixtral under "llama", told apart by its expert count.
MIXTRAL = ("MixtralForCausalLM", "mixtral")
# llama.cpp's converter reorders the q/k rows of these for its rotary kernel (each head's
# two rotary halves interleaved); the Qwen models it leaves in HF order.
PERMUTED_ARCHITECTURES = frozenset({"llama", "mistral"})

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Sparse blocks: the router, and each projection of all experts stacked in one tensor
# (experts outermost, so one expert's rows are one contiguous run of the file).
_ROUTER = "ffn_gate_inp.weight"
_STACKED_EXPERTS = {"ffn_gate_exps.weight": 0, "ffn_up_exps.weight": 1,
                    "ffn_down_exps.weight": 2}
# HF names of (router block, per-expert gate/up/down) by family.
_EXPERT_NAMES = {"mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
                 "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj"))}
_EXPERT_NAME = re.compile(r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\."
                          r"(w1|w3|w2|gate_proj|up_proj|down_proj)\.weight")
# softmax over the router's logits; llama.cpp's other gating (sigmoid) has no HF family here.
_SOFTMAX_GATING = 1

# llama.cpp's spelling of Llama 3 rope scaling: one divisor per rotary frequency.
ROPE_FREQS = "rope_freqs.weight"


def hf_tensor_name(gguf_name: str) -> str | None:
    """The HF name of a GGUF tensor, or None for a tensor with no HF counterpart."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        suffix = _BLOCK_NAMES.get(parts[2])
        if suffix is not None:
            return f"model.layers.{int(parts[1])}.{suffix}"
    return None


def gguf_tensor_name(hf_name: str) -> str | None:
    """The GGUF name of an HF tensor name (for messages about tensors a file lacks)."""
    expert = _EXPERT_NAME.fullmatch(hf_name)
    if expert:
        layer, j, proj = expert.groups()
        which = ("w1", "w3", "w2").index(proj) if proj.startswith("w") else (
            "gate_proj", "up_proj", "down_proj").index(proj)
        return f"blk.{layer}.{list(_STACKED_EXPERTS)[which]}[{j}]"
    if re.fullmatch(r"model\.layers\.\d+\.(block_sparse_moe|mlp)\.gate\.weight", hf_name):
        return f"blk.{hf_name.split('.')[2]}.{_ROUTER}"
    for gguf_name, name in _GLOBAL_NAMES.items():
        if name == hf_name:
            return gguf_name
    parts = hf_name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        for gguf_suffix, suffix in _BLOCK_NAMES.items():
            if suffix == parts[3]:
                return f"blk.{parts[2]}.{gguf_suffix}"
    return None


def undo_rotary_permutation(weight: np.ndarray, heads: int) -> np.ndarray:
    """HF row order for a q/k projection stored by llama.cpp: it keeps each head's rotary
    pairs (i, i + d/2) side by side, HF keeps the two halves apart."""
    rows = weight.shape[0]
    if rows % (2 * heads):
        raise ConversionError(f"{rows} q/k rows do not split into {heads} heads of pairs")
    half = rows // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


@dataclasses.dataclass(frozen=True)
class _Tensor:
    gguf_name: str
    type_name: str
    shape: tuple[int, ...]  # numpy order: GGUF lists dimensions innermost first
    offset: int  # absolute, in bytes
    nbytes: int


def _field_value(field) -> Any:
    """A metadata value as plain Python (strings decoded, arrays as lists)."""
    from gguf import GGUFValueType

    def scalar(part, kind):
        if kind == GGUFValueType.STRING:
            return bytes(part).decode("utf-8", errors="replace")
        return part.tolist()[0]

    kinds = list(field.types)
    if kinds and kinds[0] == GGUFValueType.ARRAY:
        return [scalar(field.parts[i], kinds[-1]) for i in field.data]
    return scalar(field.parts[field.data[0]], kinds[0])


def _read_header(path: str) -> tuple[dict[str, Any], list[_Tensor]]:
    """Metadata and tensor directory; the reader (and its map of the file) ends here."""
    try:
        import gguf
    except ImportError:
        raise ConversionError("reading GGUF files needs the gguf package: "
                              "pip install 'gguf>=0.10'") from None
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader reports bad files with assorted exceptions
        raise ConversionError(
            f"{path} is not a readable GGUF file (truncated or corrupt?): {e}") from None
    if reader.byte_order != "I":
        raise ConversionError(f"{path}: big-endian GGUF files are not supported")
    metadata = {name: _field_value(field) for name, field in reader.fields.items()
                if not name.startswith("GGUF.")}
    size = os.path.getsize(path)
    tensors = []
    for t in reader.tensors:
        tensor = _Tensor(t.name, t.tensor_type.name,
                         tuple(int(d) for d in reversed(t.shape.tolist())),
                         int(t.data_offset), int(t.n_bytes))
        if tensor.offset + tensor.nbytes > size:
            raise ConversionError(f"{path} is truncated: tensor {t.name} ends at byte "
                                  f"{tensor.offset + tensor.nbytes}, the file has {size}")
        tensors.append(tensor)
    return metadata, tensors


class GGUFModel:
    """The tensors and metadata of one GGUF file (a `TensorSource` under HF names)."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        if not os.path.isfile(self.path):
            raise ConversionError(f"{path}: no such GGUF file")
        self.metadata, tensors = _read_header(self.path)
        unsupported = sorted({t.type_name for t in tensors} - set(SUPPORTED_TYPES))
        if unsupported:
            named = [f"{t.gguf_name} ({t.type_name})" for t in tensors
                     if t.type_name in unsupported]
            raise ConversionError(
                f"{path}: tensor type {', '.join(unsupported)} is not supported "
                f"(supported: {', '.join(SUPPORTED_TYPES)}); tensors: "
                + ", ".join(named[:5]) + (f" (+{len(named) - 5} more)" if len(named) > 5 else ""))
        self.architecture = str(self.metadata.get("general.architecture", ""))
        if self.architecture not in ARCHITECTURES:
            raise ConversionError(
                f"{path}: GGUF architecture {self.architecture or '(none)'!r} is not "
                f"supported; supported: {', '.join(ARCHITECTURES)}")
        self.num_experts = int(self._key("expert_count", 0) or 0)
        if self.architecture == "qwen3moe" and not self.num_experts:
            raise ConversionError(f"{path}: a qwen3moe file without expert_count")
        self._tensors: dict[str, _Tensor] = {}
        self._config: dict[str, Any] | None = None
        self._rope_freqs: _Tensor | None = None
        for t in tensors:
            if t.gguf_name == ROPE_FREQS:
                self._rope_freqs = t
            elif self.num_experts and self._add_sparse(t):
                pass
            else:
                # Names with no HF counterpart stay as they are, reported as unexpected.
                self._tensors[hf_tensor_name(t.gguf_name) or t.gguf_name] = t

    @property
    def family(self) -> str:
        """The HF model_type this file converts to."""
        if self.num_experts and self.architecture == "llama":
            return MIXTRAL[1]
        return ARCHITECTURES[self.architecture][1]

    def _add_sparse(self, t: _Tensor) -> bool:
        """Register a sparse block's router or stacked experts under HF names (one entry
        per expert, each a view of its rows in the file); False for any other tensor."""
        parts = t.gguf_name.split(".", 2)
        if len(parts) != 3 or parts[0] != "blk" or not parts[1].isdigit():
            return False
        block, projections = _EXPERT_NAMES[self.family]
        prefix = f"model.layers.{int(parts[1])}.{block}"
        if parts[2] == _ROUTER:
            self._tensors[f"{prefix}.gate.weight"] = t
            return True
        if parts[2] not in _STACKED_EXPERTS:
            return False
        if len(t.shape) != 3 or t.shape[0] != self.num_experts:
            raise ConversionError(
                f"{self.path}: {t.gguf_name} has shape {list(t.shape)}, expected "
                f"[{self.num_experts}, rows, columns] for {self.num_experts} experts")
        step = t.nbytes // self.num_experts
        name = projections[_STACKED_EXPERTS[parts[2]]]
        for j in range(self.num_experts):
            self._tensors[f"{prefix}.experts.{j}.{name}.weight"] = dataclasses.replace(
                t, gguf_name=f"{t.gguf_name}[{j}]", shape=t.shape[1:],
                offset=t.offset + j * step, nbytes=step)
        return True

    # -- metadata → HF config ---------------------------------------------------------

    def _key(self, name: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.architecture}.{name}", default)

    def hf_config(self) -> dict[str, Any]:
        """The model's `config.json`, as Hugging Face would write it for this model."""
        if self._config is None:
            self._config = self._build_config()
        return dict(self._config)

    def _build_config(self) -> dict[str, Any]:
        required = ("embedding_length", "feed_forward_length", "block_count",
                    "attention.head_count")
        missing = [f"{self.architecture}.{k}" for k in required if self._key(k) is None]
        if missing:
            raise ConversionError(f"{self.path}: metadata lacks {', '.join(missing)}")
        hidden, heads = int(self._key("embedding_length")), int(self._key("attention.head_count"))
        kv_heads = self._key("attention.head_count_kv", heads)
        if isinstance(kv_heads, list):  # per layer in some files
            if len(set(kv_heads)) != 1:
                raise ConversionError(f"{self.path}: per-layer KV head counts {kv_heads} "
                                      "are not supported")
            kv_heads = kv_heads[0]
        head_dim = int(self._key("attention.key_length", hidden // heads))
        problems = []
        if int(self._key("attention.value_length", head_dim)) != head_dim:
            problems.append("value_length differs from key_length")
        if int(self._key("rope.dimension_count", head_dim)) != head_dim:
            problems.append("partial rotary embeddings (rope.dimension_count != head size)")
        scaling = str(self._key("rope.scaling.type", "none") or "none")
        if scaling != "none":
            problems.append(f"rope scaling type {scaling!r}")
        if int(self._key("expert_shared_count", 0) or 0):
            problems.append("shared experts")
        if int(self._key("expert_gating_func", _SOFTMAX_GATING) or _SOFTMAX_GATING) \
                != _SOFTMAX_GATING:
            problems.append("expert gating other than softmax")
        if problems:
            raise ConversionError(f"{self.path}: not supported: {'; '.join(problems)}")
        arch = self.architecture
        name = str(self.metadata.get("general.name", ""))
        if arch == "llama" and "mistral" in name.lower():
            arch = "mistral"  # llama.cpp files Mistral models under "llama"
        hf_arch, model_type = MIXTRAL if self.family == "mixtral" else ARCHITECTURES[arch]
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        embed = self._tensors.get("model.embed_tokens.weight")
        vocab = self._key("vocab_size") or (len(tokens) if tokens else None) or (
            embed.shape[0] if embed else None)
        if vocab is None:
            raise ConversionError(f"{self.path}: cannot tell the vocabulary size")
        eos_ids = [self.metadata[k] for k in ("tokenizer.ggml.eos_token_id",
                                              "tokenizer.ggml.eot_token_id")
                   if k in self.metadata]
        eos_ids = list(dict.fromkeys(int(i) for i in eos_ids))
        bos = self.metadata.get("tokenizer.ggml.bos_token_id")
        config: dict[str, Any] = {
            "architectures": [hf_arch],
            "model_type": model_type,
            "vocab_size": int(vocab),
            "hidden_size": hidden,
            "intermediate_size": int(self._key("feed_forward_length")),
            "num_hidden_layers": int(self._key("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(kv_heads),
            "head_dim": head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": float(self._key("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(self._key("rope.freq_base", 10000.0)),
            "max_position_embeddings": int(self._key("context_length", 4096)),
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "bos_token_id": None if bos is None else int(bos),
            "eos_token_id": (eos_ids[0] if len(eos_ids) == 1 else eos_ids) if eos_ids else None,
        }
        if self.num_experts:
            config.update(self._moe_config(config))
        if model_type == "mistral":
            window = self._key("attention.sliding_window")
            config["sliding_window"] = int(window) if window else None
        if self._rope_freqs is not None:
            config["rope_scaling"] = self._llama3_rope(config)
        return config

    def _moe_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """The HF config keys of a sparse model: its dense layers are those with plain
        ffn tensors (transformers' `mlp_only_layers`)."""
        used = self._key("expert_used_count")
        if not used:
            raise ConversionError(f"{self.path}: metadata lacks {self.architecture}."
                                  "expert_used_count")
        if self.family == "mixtral":
            return {"num_local_experts": self.num_experts, "num_experts_per_tok": int(used)}
        inner = self._key("expert_feed_forward_length")
        if not inner:
            raise ConversionError(f"{self.path}: metadata lacks {self.architecture}."
                                  "expert_feed_forward_length")
        dense = sorted(int(name.split(".")[2]) for name in self._tensors
                       if name.endswith(".mlp.gate_proj.weight"))
        return {"num_experts": self.num_experts, "num_experts_per_tok": int(used),
                "moe_intermediate_size": int(inner), "decoder_sparse_step": 1,
                "mlp_only_layers": dense,
                # llama.cpp renormalises Qwen3-MoE's top-k weights unless told otherwise.
                "norm_topk_prob": bool(self._key("expert_weights_norm", True))}

    def _llama3_rope(self, config: dict[str, Any]) -> dict[str, Any]:
        """Llama 3 rope scaling parameters that reproduce the file's per-frequency divisors.

        The divisors depend on the parameters only through the two wavelength bounds and a
        line between them, so the low-frequency factor can be fixed at 1 and the rest fit.
        """
        from meshserve.models.config import config_from_hf, rope_inverse_frequencies

        theta, head_dim = config["rope_theta"], config["head_dim"]
        factors = self._read(self._rope_freqs).astype(np.float64).reshape(-1)
        if factors.size != head_dim // 2:
            raise ConversionError(f"{self.path}: {ROPE_FREQS} has {factors.size} entries, "
                                  f"expected {head_dim // 2}")
        base = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        wavelen = 2 * math.pi / base
        factor = float(factors.max())
        params = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        if factor <= 1.0:
            raise ConversionError(f"{self.path}: {ROPE_FREQS} does not scale any frequency")
        middle = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
        smooth = (1 / factors[middle] - 1 / factor) / (1 - 1 / factor)
        x = 1 / wavelen[middle]
        if middle.sum() >= 2:  # smooth = a * x - b, with a = orig / (hi - 1), b = 1 / (hi - 1)
            (a, b), *_ = np.linalg.lstsq(np.stack([x, -np.ones_like(x)], 1), smooth, rcond=None)
            if b > 0:
                params.update(high_freq_factor=round(float(1 + 1 / b), 6),
                              original_max_position_embeddings=round(a / b))
        elif middle.sum() == 1:
            params["original_max_position_embeddings"] = round((3 * smooth[0] + 1) / x[0])
        else:
            short, long = wavelen[factors <= 1 + 1e-6], wavelen[factors >= factor * (1 - 1e-6)]
            if short.size and long.size:
                params["original_max_position_embeddings"] = round(
                    math.sqrt(4 * short.max() * long.min()))
        # The fit is only accepted if the model's own frequency code reproduces the file.
        ours = rope_inverse_frequencies(config_from_hf({**config, "rope_scaling": params}))
        if not np.allclose(ours, base / factors, rtol=1e-5, atol=0):
            raise ConversionError(f"{self.path}: {ROPE_FREQS} does not follow Llama 3 rope "
                                  "scaling, the only per-frequency scaling supported")
        return params

    # -- tensors ----------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._tensors[name].shape

    def dtype(self, name: str) -> np.dtype:
        kind = self._tensors[name].type_name
        return np.dtype({"F16": np.float16, "BF16": ml_dtypes.bfloat16}.get(kind, np.float32))

    def describe(self, name: str) -> str:
        stored = self._tensors[name].gguf_name if name in self._tensors else None
        stored = stored or gguf_tensor_name(name)
        return f"{stored} ({name})" if stored and stored != name else name

    def _read(self, t: _Tensor) -> np.ndarray:
        with open(self.path, "rb") as f:
            f.seek(t.offset)
            raw = np.fromfile(f, dtype=np.uint8, count=t.nbytes)
        if raw.size != t.nbytes:
            raise ConversionError(f"{self.path}: tensor {t.gguf_name} is truncated")
        if t.type_name == "F32":
            return raw.view(np.float32).reshape(t.shape)
        if t.type_name == "F16":
            return raw.view(np.float16).reshape(t.shape)
        if t.type_name == "BF16":
            return raw.view(ml_dtypes.bfloat16).reshape(t.shape)
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        rows = math.prod(t.shape[:-1])
        return dequantize(raw.reshape(rows, -1), GGMLQuantizationType[t.type_name]).reshape(
            t.shape)

    def read(self, name: str) -> np.ndarray:
        tensor = self._read(self._tensors[name])
        proj = name.rsplit(".", 2)[-2] if name.endswith(".weight") else ""
        if self.architecture in PERMUTED_ARCHITECTURES and proj in ("q_proj", "k_proj"):
            config = self.hf_config()
            heads = config["num_attention_heads" if proj == "q_proj" else "num_key_value_heads"]
            tensor = undo_rotary_permutation(tensor, heads)
        return tensor

    def read_transposed(self, name: str, dtype) -> np.ndarray:
        return np.ascontiguousarray(self.read(name).T, dtype=dtype)
