"""`meshserve generate`: offline generation from a checkpoint on any layout."""

from __future__ import annotations

import json
import sys

from absl import flags

from meshserve.tools.model_flags import capacity_bytes, checkpoint_dir, define_model_flags


def define_flags() -> None:
    define_model_flags()
    flags.DEFINE_string("prompt", None, "Prompt text (needs a tokenizer in the checkpoint).")
    flags.DEFINE_list("token_ids", None, "Prompt as comma-separated token ids.")
    flags.DEFINE_string("chat", None, "One user message, rendered with the checkpoint's chat "
                        "template (the assistant's reply is generated).")
    flags.DEFINE_integer("max_tokens", 32, "Number of tokens to generate.", lower_bound=1)
    flags.DEFINE_float("temperature", 0.0, "0 = greedy.", lower_bound=0.0)
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_bool("ignore_eos", False, "Do not stop at the model's EOS tokens.")
    flags.DEFINE_bool("json", False, "Print one JSON object {token_ids, logprobs, text}.")
    flags.DEFINE_string("target", None, "HOST:PORT of a `meshserve serve` server: stream from "
                        "it instead of loading a model here.")
    flags.DEFINE_string("auth_token_file", None, "With --target: bearer token file.")
    flags.DEFINE_string("tls_ca", None, "With --target: use TLS, trusting this CA (PEM).")


def _check_one_input() -> None:
    f = flags.FLAGS
    if sum(x is not None for x in (f.prompt, f.token_ids, f.chat)) != 1:
        raise ValueError("give exactly one of --prompt, --token-ids or --chat")


def _token_ids() -> list[int] | None:
    f = flags.FLAGS
    if f.token_ids is None:
        return None
    try:
        return [int(t) for t in f.token_ids]
    except ValueError:
        raise ValueError(f"--token-ids must be integers, got {f.token_ids}") from None


def _prompt_ids(tokenizer) -> list[int]:
    from meshserve.models.chat import ChatTemplateError, NoChatTemplateError

    f = flags.FLAGS
    _check_one_input()
    if f.token_ids is not None:
        return _token_ids()
    if tokenizer is None:
        raise ValueError("the checkpoint has no tokenizer; use --token-ids")
    if f.chat is None:
        return tokenizer.encode(f.prompt)
    try:
        return tokenizer.encode_chat([{"role": "user", "content": f.chat}])
    except (ChatTemplateError, NoChatTemplateError) as e:
        raise ValueError(f"--chat: {e}") from None


def _remote() -> int:
    """--target: stream from a server, printing text as it arrives."""
    from meshserve.serving import client

    f = flags.FLAGS
    _check_one_input()
    request = client.build_request(
        prompt=f.prompt, token_ids=_token_ids(),
        messages=None if f.chat is None else [("user", f.chat)], max_tokens=f.max_tokens,
        temperature=f.temperature, seed=f.seed, ignore_eos=f.ignore_eos,
        logprobs=0 if f.json else None,
    )
    return client.stream_to(sys.stdout, f.target, request, as_json=f.json,
                            token=client.read_token(f.auth_token_file), tls_ca=f.tls_ca)


def main(argv: list[str]) -> int:
    del argv
    if flags.FLAGS.target:
        return _remote()
    import jax.numpy as jnp

    from meshserve.engine.engine import Engine, EngineConfig
    from meshserve.engine.sampling_params import SamplingParams
    from meshserve.meshes import default_compute_dtype, make_mesh, parse_layout
    from meshserve.models.checkpoint import checkpoint_config
    from meshserve.models.loading import load_checkpoint, memory_plan
    from meshserve.models.tokenizer import find_tokenizer

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
    # One request: a page pool just big enough for it, one sequence slot.
    total = len(prompt) + f.max_tokens
    engine = Engine(
        model,
        EngineConfig(num_pages=-(-total // 16) + 1, max_seqs=1, max_step_tokens=256,
                     decode_steps=16),
        tokenizer,
    )
    params = SamplingParams(max_tokens=f.max_tokens, temperature=f.temperature, seed=f.seed,
                            ignore_eos=f.ignore_eos)
    handle = engine.start().add_request(prompt, params)
    token_ids, logprobs, text = [], [], []
    for chunk in handle:  # printed as it arrives
        token_ids += chunk.token_ids
        logprobs += [lp.logprob for lp in chunk.logprobs]
        text.append(chunk.text)
        if not f.json:
            print(chunk.text if tokenizer else " ".join(map(str, chunk.token_ids)), end="",
                  flush=True)
    engine.shutdown()
    if chunk.error:
        raise RuntimeError(chunk.error)
    if f.json:
        print(json.dumps({"token_ids": token_ids, "logprobs": logprobs, "text": "".join(text),
                          "finish_reason": chunk.finish_reason}))
    else:
        print()
    return 0
