"""`meshserve generate`: offline generation from a checkpoint on any layout."""

from __future__ import annotations

import json
import sys

from absl import flags

from tools.model_flags import capacity_bytes, checkpoint_dir, define_model_flags


def define_flags() -> None:
    define_model_flags()
    flags.DEFINE_string("prompt", None, "Prompt text (needs a tokenizer in the checkpoint).")
    flags.DEFINE_list("token_ids", None, "Prompt as comma-separated token ids.")
    flags.DEFINE_integer("max_tokens", 32, "Number of tokens to generate.", lower_bound=1)
    flags.DEFINE_float("temperature", 0.0, "0 = greedy.", lower_bound=0.0)
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_bool("ignore_eos", False, "Do not stop at the model's EOS tokens.")
    flags.DEFINE_bool("json", False, "Print one JSON object {token_ids, logprobs, text}.")


def _prompt_ids(tokenizer) -> list[int]:
    f = flags.FLAGS
    if (f.prompt is None) == (f.token_ids is None):
        raise ValueError("give exactly one of --prompt or --token-ids")
    if f.token_ids is not None:
        try:
            return [int(t) for t in f.token_ids]
        except ValueError:
            raise ValueError(f"--token-ids must be integers, got {f.token_ids}") from None
    if tokenizer is None:
        raise ValueError("the checkpoint has no tokenizer; use --token-ids")
    return tokenizer.encode(f.prompt)


def main(argv: list[str]) -> int:
    del argv
    import jax.numpy as jnp

    from engine.dense import DenseGenerator
    from meshes import default_compute_dtype, make_mesh, parse_layout
    from models.checkpoint import checkpoint_config
    from models.loading import load_checkpoint, memory_plan
    from models.tokenizer import find_tokenizer

    f = flags.FLAGS
    with checkpoint_dir() as ckpt:
        cfg = checkpoint_config(ckpt)
        tokenizer = find_tokenizer(ckpt, cfg)
        prompt = _prompt_ids(tokenizer)
        dtype = jnp.dtype(f.dtype or default_compute_dtype())
        mesh = make_mesh(parse_layout(f.mesh))
        plan = memory_plan(
            cfg, mesh, dtype, len(prompt) + f.max_tokens, capacity_bytes=capacity_bytes()
        ).check()
        print(plan.describe(), file=sys.stderr)
        model = load_checkpoint(ckpt, mesh, dtype)
    stops = () if f.ignore_eos else cfg.eos_token_ids
    result = DenseGenerator(model).generate(prompt, f.max_tokens, f.temperature, f.seed, stops)
    text = tokenizer.decode(result.token_ids) if tokenizer else ""
    if f.json:
        print(
            json.dumps(
                {
                    "token_ids": result.token_ids,
                    "logprobs": result.logprobs,
                    "text": text,
                    "finish_reason": result.finish_reason,
                }
            )
        )
    else:
        print(text if tokenizer else " ".join(map(str, result.token_ids)))
    return 0
