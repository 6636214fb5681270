"""GGUF files written the way llama.cpp's converter writes them, from tiny random HF
models, with every tensor type the converter reads.

Each writer also returns the weights a reader must recover: the dequantized values in HF
layout, decoded here by our own reference decoders (and, in the tests, checked against
`gguf.quants.dequantize`), so that a transformers model loaded with them is the reference
for the converted model's logits.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable

import ml_dtypes
import numpy as np

from tests import hf_models

QTYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")
# K-quant blocks hold 256 values: every matrix row (the input side) is a multiple of it.
SIZES = dict(hidden_size=256, intermediate_size=512, vocab_size=512)
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
             "mixtral": "llama", "qwen3_moe": "qwen3moe", "qwen3_moe_norm": "qwen3moe"}
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

_BLOCK = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",  # a sparse block's router
}
# transformers 5 keeps a sparse block's experts fused: gate_up_proj [experts, 2i, hidden]
# (gate rows first), down_proj [experts, hidden, i]; llama.cpp stacks each projection.
_EXPERTS = {"mlp.experts.gate_up_proj": ("ffn_gate_exps.weight", "ffn_up_exps.weight"),
            "mlp.experts.down_proj": ("ffn_down_exps.weight",)}


def gguf_name(hf_name: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
           "output_norm.weight", "lm_head.weight": "output.weight"}
    if hf_name in top:
        return top[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_BLOCK[rest]}"


def interleave_rotary_halves(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order: per head, rows i and i + d/2 next to each other."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


# -- block formats: encoders, and reference decoders written from the format's layout -----

def _f16(x) -> np.ndarray:
    return np.asarray(x, np.float32).astype(np.float16)


def _blocks(rows: np.ndarray, size: int) -> np.ndarray:
    return rows.astype(np.float32).reshape(-1, size)


def encode_q4_k(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K: per 256 values, f16 scale d and min dmin, 8 sub-blocks of 32 with 6-bit scale
    and min multipliers, 4-bit values: x = d*sc*q - dmin*m. Returns (bytes, decoded)."""
    x = _blocks(rows, 256).reshape(-1, 8, 32)
    n = x.shape[0]
    low = np.minimum(x.min(-1), 0.0)
    span = np.maximum(x.max(-1) - low, 1e-8) / 15
    d, dmin = _f16(span.max(-1) / 63), _f16(np.maximum(-low.min(-1), 1e-8) / 63)
    df, dminf = d.astype(np.float32), dmin.astype(np.float32)
    sc = np.clip(np.round(span / df[:, None]), 1, 63).astype(np.uint8)
    m = np.clip(np.round(-low / dminf[:, None]), 0, 63).astype(np.uint8)
    step = (df[:, None] * sc.astype(np.float32))[..., None]
    offset = (dminf[:, None] * m.astype(np.float32))[..., None]
    q = np.clip(np.round((x + offset) / step), 0, 15).astype(np.uint8)
    scales = np.zeros((n, 12), np.uint8)
    scales[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    scales[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    pairs = q.reshape(n, 4, 2, 32)  # sub-blocks 2k and 2k+1 share bytes: low, high nibble
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(n, 128)
    raw = np.concatenate([d.view(np.uint8).reshape(n, 2), dmin.view(np.uint8).reshape(n, 2),
                          scales, qs], axis=1)
    decoded = step * q.astype(np.float32) - offset
    return raw.reshape(rows.shape[0], -1), decoded.reshape(rows.shape)


def encode_q6_k(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q6_K: per 256 values, 16 int8 scales of 16 values, one f16 d, 6-bit values offset
    by 32 (low 4 bits in ql, high 2 bits in qh): x = d*sc*(q-32)."""
    x = _blocks(rows, 256).reshape(-1, 16, 16)
    n = x.shape[0]
    scale = np.abs(x).max(-1) / 31
    d = _f16(np.maximum(np.abs(scale).max(-1), 1e-8) / 127)
    df = d.astype(np.float32)
    sc = np.clip(np.round(scale / df[:, None]), 1, 127).astype(np.int8)
    step = (df[:, None] * sc.astype(np.float32))[..., None]
    q = np.clip(np.round(x / step), -32, 31).astype(np.int16)
    u = (q + 32).astype(np.uint8).reshape(n, 256)
    lo = (u & 0xF).reshape(n, 2, 2, 64)  # [half, nibble, 64]
    ql = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(n, 128)
    hi = (u >> 4).reshape(n, 2, 4, 32)  # [half, 2-bit slot, 32]
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6))
    raw = np.concatenate([ql, qh.reshape(n, 64), sc.view(np.uint8),
                          d.view(np.uint8).reshape(n, 2)], axis=1)
    decoded = step * q.astype(np.float32)
    return raw.reshape(rows.shape[0], -1), decoded.reshape(rows.shape)


def decode_q8_0(raw: np.ndarray) -> np.ndarray:
    b = raw.reshape(-1, 34)
    d = b[:, :2].copy().view(np.float16).astype(np.float32)
    return (d * b[:, 2:].view(np.int8).astype(np.float32)).reshape(raw.shape[0], -1)


def decode_q4_0(raw: np.ndarray) -> np.ndarray:
    b = raw.reshape(-1, 18)
    d = b[:, :2].copy().view(np.float16).astype(np.float32)
    q = np.concatenate([b[:, 2:] & 0xF, b[:, 2:] >> 4], axis=1).astype(np.float32) - 8
    return (d * q).reshape(raw.shape[0], -1)


def decode_q4_1(raw: np.ndarray) -> np.ndarray:
    b = raw.reshape(-1, 20)
    d = b[:, :2].copy().view(np.float16).astype(np.float32)
    m = b[:, 2:4].copy().view(np.float16).astype(np.float32)
    q = np.concatenate([b[:, 4:] & 0xF, b[:, 4:] >> 4], axis=1).astype(np.float32)
    return (d * q + m).reshape(raw.shape[0], -1)


def encode(rows: np.ndarray, qtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(what the file stores, the values a reader must decode) for a 2-D float tensor."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    rows = np.ascontiguousarray(rows, np.float32)
    if qtype == "F32":
        return rows, rows
    if qtype == "F16":
        return rows.astype(np.float16), rows.astype(np.float16).astype(np.float32)
    if qtype == "BF16":
        bf = rows.astype(ml_dtypes.bfloat16)
        return bf.view(np.uint8).reshape(rows.shape[0], -1), bf.astype(np.float32)
    if qtype == "Q4_K":
        return encode_q4_k(rows)
    if qtype == "Q6_K":
        return encode_q6_k(rows)
    raw = quantize(rows, GGMLQuantizationType[qtype])
    decoder = {"Q8_0": decode_q8_0, "Q4_0": decode_q4_0, "Q4_1": decode_q4_1}[qtype]
    return raw, decoder(raw)


# -- tokenizers ---------------------------------------------------------------------------

@functools.cache
def sentencepiece_vocab() -> dict:
    """The demo sentencepiece model's pieces as llama.cpp stores them (model "llama")."""
    import sentencepiece

    from meshserve.models.demo import train_demo_tokenizer

    sp = sentencepiece.SentencePieceProcessor(model_proto=train_demo_tokenizer())
    types = []
    for i in range(sp.get_piece_size()):
        types.append(2 if sp.IsUnknown(i) else 3 if sp.IsControl(i) else 6 if sp.IsByte(i)
                     else 5 if sp.IsUnused(i) else 1)
    return {"model": "llama", "tokens": [sp.IdToPiece(i) for i in range(sp.get_piece_size())],
            "scores": [sp.GetScore(i) for i in range(sp.get_piece_size())], "types": types,
            "bos": 1, "eos": 2, "unk": 0}


@functools.cache
def byte_level_vocab() -> dict:
    """A 512-token byte-level BPE trained on the demo corpus (model "gpt2", Qwen2 split)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    corpus = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "models", "demo", "corpus.txt")
    with open(corpus, encoding="utf-8") as f:
        lines = f.read().splitlines()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=512, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    import json

    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in merges]
    return {"model": "gpt2", "pre": "qwen2", "tokens": tokens, "merges": merges,
            "types": [3 if t in specials else 1 for t in tokens], "bos": 1, "eos": 2}


def _add_vocab(writer, vocab: dict, add_bos: bool | None) -> None:
    writer.add_tokenizer_model(vocab["model"])
    if "pre" in vocab:
        writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    if "scores" in vocab:
        writer.add_token_scores(vocab["scores"])
    if "merges" in vocab:
        writer.add_token_merges(vocab["merges"])
    writer.add_bos_token_id(vocab["bos"])
    writer.add_eos_token_id(vocab["eos"])
    if "unk" in vocab:
        writer.add_unk_token_id(vocab["unk"])
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    writer.add_chat_template(CHATML)


# -- whole files --------------------------------------------------------------------------

def _rope(cfg) -> dict:
    """The rope settings of an HF config (transformers 5 keeps them in rope_parameters)."""
    rope = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None)
                or {})
    rope.setdefault("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    return rope


def llama3_rope_factors(cfg) -> np.ndarray:
    """The per-frequency divisors llama.cpp writes as rope_freqs.weight for Llama 3."""
    scaling = _rope(cfg)
    d = cfg.head_dim
    theta = scaling["rope_theta"]
    factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    out = []
    for i in range(0, d, 2):
        wavelen = 2 * math.pi * theta ** (i / d)
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def write_gguf(
    path: str,
    family: str,
    qtype: str = "F32",
    *,
    arch: str | None = None,
    edit: Callable[[dict], None] | None = None,
    qtype_of: Callable[[str], str] | None = None,
    add_bos: bool | None = None,
) -> dict[str, np.ndarray]:
    """Write the tiny `family` model as a GGUF with its matrices in `qtype` (norms and
    biases F32, as llama.cpp keeps them). `edit` may change the {gguf name: (array, type)}
    dict before writing; `qtype_of(gguf_name)` picks a type per tensor. Returns the HF
    state dict a reader must recover (decoded weights, HF layout)."""
    import gguf

    model = hf_models.build_model(family, **SIZES)
    cfg = model.config
    arch = arch or GGUF_ARCH[family]
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    tensors, expected = {}, {}
    for name, value in state.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        stored, kind = value.astype(np.float32), "F32"
        if value.ndim == 3:
            _add_experts(tensors, expected, name, stored, qtype_of or (lambda _: qtype))
            continue
        if value.ndim == 2:
            if GGUF_ARCH[family] == "llama" and ("q_proj" in name or "k_proj" in name):
                heads = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
                stored = interleave_rotary_halves(stored, heads)
            kind = qtype_of(gguf_name(name)) if qtype_of else qtype
            stored, decoded = encode(stored, kind)
            if GGUF_ARCH[family] == "llama" and ("q_proj" in name or "k_proj" in name):
                # the decoded rows are in file order: back to HF order, by index arithmetic
                heads = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
                order = interleave_rotary_halves(np.arange(decoded.shape[0]), heads)
                restored = np.empty_like(decoded)
                restored[order] = decoded
                decoded = restored
            expected[name] = decoded
        else:
            expected[name] = stored
        tensors[gguf_name(name)] = (stored, kind)
    rope = _rope(cfg)
    if rope.get("rope_type") == "llama3":
        tensors["rope_freqs.weight"] = (llama3_rope_factors(cfg), "F32")
    if edit:
        edit(tensors)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(f"tiny-{family}")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if head_dim != cfg.hidden_size // cfg.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    if family == "mistral":
        writer.add_sliding_window(cfg.sliding_window)
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
        if family.startswith("qwen3_moe"):
            writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
            writer.add_expert_weights_norm(cfg.norm_topk_prob)
    _add_vocab(writer, sentencepiece_vocab() if GGUF_ARCH[family] == "llama"
               else byte_level_vocab(), add_bos)
    for name, (array, kind) in tensors.items():
        raw_dtype = None if kind in ("F32", "F16") else gguf.GGMLQuantizationType[kind]
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if cfg.tie_word_embeddings:
        expected["lm_head.weight"] = expected["model.embed_tokens.weight"]
    return expected


def _add_experts(tensors: dict, expected: dict, name: str, fused: np.ndarray,
                 qtype_of: Callable[[str], str]) -> None:
    """A fused expert tensor as llama.cpp's stacked ones, each quantized row by row."""
    prefix, _, rest = name.rpartition(".mlp.")
    layer = prefix.rsplit(".", 1)[1]
    parts = _EXPERTS[f"mlp.{rest}"]
    decoded_parts = []
    for part, array in zip(parts, np.split(fused, len(parts), axis=1), strict=True):
        gguf = f"blk.{layer}.{part}"
        kind = qtype_of(gguf)
        raw, decoded = encode(array.reshape(-1, array.shape[-1]), kind)
        tensors[gguf] = (raw.reshape(*array.shape[:2], -1), kind)
        decoded_parts.append(decoded.reshape(array.shape))
    expected[name] = np.concatenate(decoded_parts, axis=1)


def per_expert(family: str, expected: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`expected` with fused expert tensors split under the per-expert HF names that
    checkpoints on disk use (what conversion maps)."""
    block, names = (("block_sparse_moe", ("w1", "w3", "w2")) if family == "mixtral"
                    else ("mlp", ("gate_proj", "up_proj", "down_proj")))
    out = {}
    for name, value in expected.items():
        prefix, _, rest = name.rpartition(".mlp.")
        if rest == "gate.weight":
            out[f"{prefix}.{block}.gate.weight"] = value
        elif rest == "experts.gate_up_proj":
            gate, up = np.split(value, 2, axis=1)
            for j in range(value.shape[0]):
                out[f"{prefix}.{block}.experts.{j}.{names[0]}.weight"] = gate[j]
                out[f"{prefix}.{block}.experts.{j}.{names[1]}.weight"] = up[j]
        elif rest == "experts.down_proj":
            for j in range(value.shape[0]):
                out[f"{prefix}.{block}.experts.{j}.{names[2]}.weight"] = value[j]
        else:
            out[name] = value
    return out


def reference_logits(family: str, state: dict[str, np.ndarray], prompts) -> list[np.ndarray]:
    """transformers' logits for the tiny `family` model holding the weights `state`."""
    import torch

    model = type(hf_models.build_model(family, **SIZES))(
        hf_models.hf_config(family, **SIZES)).eval()
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, strict=False)
    assert not unexpected and all(k.endswith("inv_freq") for k in missing), (missing, unexpected)
    with torch.no_grad():
        return [model(torch.tensor([p])).logits[0].numpy() for p in prompts]
