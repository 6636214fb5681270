"""The embedded default model: a small random Llama with a sentencepiece tokenizer.

It is created locally (no download) the first time it is needed and cached, so that
`meshserve serve` and `meshserve generate` work on a fresh machine. Its weights are
random: it demonstrates the server, not language.
"""

from __future__ import annotations

import io
import os

import jax.numpy as jnp

from meshserve.models.checkpoint import MANIFEST, read_manifest
from meshserve.models.config import ModelConfig

DEMO_CONFIG = ModelConfig(
    family="llama",
    architecture="LlamaForCausalLM",
    vocab_size=512,
    hidden_size=256,
    intermediate_size=512,
    num_layers=4,
    num_heads=8,
    num_kv_heads=4,
    head_dim=32,
    rms_norm_eps=1e-5,
    max_position_embeddings=2048,
    bos_token_id=1,
    eos_token_ids=(2,),
)
DEMO_LABEL = "meshserve-demo (random weights, for trying the server; not a language model)"
_CORPUS = os.path.join(os.path.dirname(__file__), "demo", "corpus.txt")


def train_demo_tokenizer(vocab_size: int = DEMO_CONFIG.vocab_size) -> bytes:
    """A BPE sentencepiece model trained on the shipped corpus (deterministic, ~20 ms).

    Byte fallback lets it encode any text, emoji included.
    """
    import sentencepiece as spm

    with open(_CORPUS, encoding="utf-8") as f:
        lines = f.read().splitlines()
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
    )
    return model.getvalue()


def cache_base() -> str:
    """meshserve's per-user cache: $MESHSERVE_CACHE, else $XDG_CACHE_HOME/meshserve,
    else ~/.cache/meshserve."""
    return os.environ.get("MESHSERVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "meshserve"
    )


def default_cache_dir() -> str:
    return os.path.join(cache_base(), "demo-v2")


def ensure_demo_checkpoint(path: str | None = None) -> str:
    """Create the demo checkpoint at `path` (default: the user cache) unless it exists."""
    path = path or default_cache_dir()
    if os.path.exists(os.path.join(path, MANIFEST)):
        read_manifest(path)
        return path
    import sentencepiece

    from meshserve.meshes import make_mesh, parse_layout
    from meshserve.models.loading import init_random, save_model

    model = init_random(DEMO_CONFIG, make_mesh(parse_layout("")), jnp.float32, seed=0,
                        init_std=0.05)
    tokenizer = train_demo_tokenizer()
    # Random weights pick byte-fallback pieces as often as words, and random bytes are
    # rarely valid UTF-8. Zeroing their output columns lets greedy decoding (the default)
    # choose word pieces from the corpus, so the demo's text is at least readable.
    sp = sentencepiece.SentencePieceProcessor(model_proto=tokenizer)
    silent = [i for i in range(sp.get_piece_size())
              if sp.IsByte(i) or sp.IsUnknown(i) or sp.IsControl(i)]
    head = model.params["lm_head"]
    head.set_value(head[...].at[:, jnp.asarray(silent)].set(0.0))
    try:
        save_model(model, path, demo=True, label=DEMO_LABEL, files={"tokenizer.model": tokenizer})
    except (OSError, ValueError):
        # Another process may have published it first; theirs is as good as ours.
        if not os.path.exists(os.path.join(path, MANIFEST)):
            raise
    return path
