"""Helpers shared by the engine tests."""

from __future__ import annotations

from meshserve.engine.engine import Engine, EngineConfig
from meshserve.meshes import make_mesh, parse_layout
from meshserve.models.loading import load_checkpoint
from meshserve.models.tokenizer import find_tokenizer

# One token bucket and one sequence bucket: two compiled programs per engine, so the
# suite spends its time testing rather than compiling.
SMALL = EngineConfig(page_size=16, num_pages=48, max_seqs=16, max_step_tokens=64,
                     decode_steps=4, max_logprobs=4, min_token_bucket=64, min_seq_bucket=16)


def make_engine(ckpt: str, layout: str = "", config: EngineConfig = SMALL) -> Engine:
    model = load_checkpoint(ckpt, make_mesh(parse_layout(layout)))
    return Engine(model, config, find_tokenizer(ckpt, model.config))


def assert_idle(engine: Engine) -> None:
    """The invariant every engine test ends with: nothing running, every page free."""
    stats = engine.stats()
    assert stats.running == 0 and stats.waiting == 0
    assert stats.free_pages == stats.total_pages
    for allocator in engine.scheduler.allocators:
        allocator.check_all_free()


def tokens_of(chunks) -> list[int]:
    return [t for c in chunks for t in c.token_ids]
