"""Tiny random Hugging Face models for parity tests (no downloads).

Weights are drawn with a large initializer range and norm weights far from 1, so greedy
choices have clear margins and every weight matters.
"""

from __future__ import annotations

import functools
import os

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# Mixture-of-experts models: 8 experts, top 2. qwen3_moe: layer 0 dense (mlp_only_layers),
# top-k weights not renormalised; qwen3_moe_norm: renormalised, every 2nd layer sparse.
MOE_FAMILIES = ("mixtral", "qwen3_moe", "qwen3_moe_norm")
_MOE = dict(num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2)

_COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    max_position_embeddings=512,
    initializer_range=0.3,
    bos_token_id=1,
    eos_token_id=2,
)


def hf_config(family: str, **sizes):
    """The family's tiny config; `sizes` overrides the shared fields (hidden_size, ...)."""
    import transformers as T

    common = {**_COMMON, **sizes}
    if family == "llama":  # GQA 4:2 and llama3 rope scaling
        return T.LlamaConfig(
            **common,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        )
    if family == "mistral":  # MQA and a sliding window shorter than the test prompts
        return T.MistralConfig(
            **common, num_attention_heads=4, num_key_value_heads=1, sliding_window=12
        )
    if family == "qwen2":  # q/k/v bias, tied embeddings
        return T.Qwen2Config(
            **common, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True
        )
    if family == "qwen3":  # q/k RMSNorm and head_dim != hidden/heads
        return T.Qwen3Config(**common, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    if family == "mixtral":  # every layer sparse, experts of intermediate_size
        return T.MixtralConfig(**{**common, "intermediate_size": 32}, **_MOE,
                               num_local_experts=8, sliding_window=None)
    if family.startswith("qwen3_moe"):
        norm = family == "qwen3_moe_norm"
        return T.Qwen3MoeConfig(
            **{**common, "intermediate_size": 96, "num_hidden_layers": 3}, **_MOE,
            num_experts=8, moe_intermediate_size=32, head_dim=32, norm_topk_prob=norm,
            decoder_sparse_step=2 if norm else 1, mlp_only_layers=[] if norm else [0],
        )
    raise ValueError(family)


@functools.cache
def build_model(family: str, seed: int = 0, **sizes):
    import torch

    torch.manual_seed(seed)
    cfg = hf_config(family, **sizes)
    cls = {
        "llama": "LlamaForCausalLM",
        "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "qwen3": "Qwen3ForCausalLM",
        "mixtral": "MixtralForCausalLM",
        "qwen3_moe": "Qwen3MoeForCausalLM",
        "qwen3_moe_norm": "Qwen3MoeForCausalLM",
    }[family]
    import transformers

    model = getattr(transformers, cls)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn_like(p))
    return model


def save_tiny_model(family: str, out_dir: str, **save_kwargs) -> str:
    build_model(family).save_pretrained(out_dir, **save_kwargs)
    assert os.path.exists(os.path.join(out_dir, "config.json"))
    return out_dir


def hf_logits(family: str, prompt: list[int], **sizes):
    import torch

    with torch.no_grad():
        return build_model(family, **sizes)(torch.tensor([prompt])).logits[0].numpy()


def hf_greedy(family: str, prompt: list[int], new_tokens: int, **sizes) -> list[int]:
    import torch
    import transformers

    model = build_model(family, **sizes)
    # No EOS at all (not min_new_tokens, which masks EOS and changes greedy choices).
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    config = transformers.GenerationConfig(
        max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    try:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), generation_config=config)
    finally:
        model.generation_config.eos_token_id = saved
    return out[0, len(prompt) :].tolist()
