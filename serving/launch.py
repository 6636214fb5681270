"""From a checkpoint directory to a running server (what `meshserve serve` does)."""

from __future__ import annotations

import asyncio
import dataclasses

from meshserve.engine.engine import EngineConfig
from meshserve.serving import logs
from meshserve.serving.server import MeshServeServer, ServerOptions
from meshserve.serving.slices import ModelInfo, Slice, build_slices, model_info


@dataclasses.dataclass
class LoadedModel:
    slices: list[Slice]
    tokenizer: object  # models.tokenizer.Tokenizer | None
    info: ModelInfo


def load(ckpt_dir: str, mesh: str, num_slices: int, dtype: str,
         engine_config: EngineConfig, source: str | None = None,
         warmup: bool = False) -> LoadedModel:
    """Tokenizer (sentencepiece or HF, BOS/EOS from the config) and one engine per slice."""
    from meshserve.models.checkpoint import checkpoint_config
    from meshserve.models.tokenizer import find_tokenizer

    if num_slices < 1:
        raise ValueError(f"--slices must be >= 1, got {num_slices}")
    cfg = checkpoint_config(ckpt_dir)
    tokenizer = find_tokenizer(ckpt_dir, cfg)
    info = model_info(ckpt_dir, dtype, source)
    slices = build_slices(ckpt_dir, mesh, num_slices, dtype, engine_config, tokenizer,
                          warmup)
    logs.event("model_loaded", model=info.name, dtype=dtype, slices=len(slices),
               layout=slices[0].layout, tokenizer=getattr(tokenizer, "path", None),
               max_model_len=slices[0].engine.max_model_len)
    return LoadedModel(slices, tokenizer, info)


def serve(model: LoadedModel, options: ServerOptions) -> int:
    """Serve until SIGTERM/SIGINT, drain within the grace period, return 0."""
    server = MeshServeServer(model.slices, model.tokenizer, model.info, options)
    try:
        asyncio.run(server.run_until_signal())
    finally:
        for s in model.slices:  # no-op after a clean stop; frees threads after an error
            s.engine.shutdown(timeout=5.0)
    return 0
