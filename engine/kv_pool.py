"""Sizing the paged KV pool: pages per data shard, and why that many."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from meshserve.engine.config import EngineConfig
from meshserve.models.loading import ShardedModel, memory_plan


@dataclasses.dataclass(frozen=True)
class KVPoolPlan:
    """How many KV pages each data shard gets, and why."""

    pages: int
    budget_pages: int | None  # what the memory left after weights holds (None: not asked)
    use_pages: int  # what max_seqs sequences of max_model_len tokens can ever use
    chosen_by: str  # "memory", "use" or "config" (EngineConfig.num_pages)
    page_bytes: int  # one page on one device, all layers
    # Ways each data shard's pages are split (context parallelism): a device holds
    # pages / kv_split of them.
    kv_split: int = 1

    @property
    def bytes_per_device(self) -> int:
        return self.pages // self.kv_split * self.page_bytes

    def describe(self) -> str:
        budget = "-" if self.budget_pages is None else str(self.budget_pages)
        return (f"KV pool {self.pages} pages per data shard "
                f"({self.bytes_per_device / 2**20:.2f} MiB per device; memory allows "
                f"{budget}, max_seqs x max_model_len uses {self.use_pages}; "
                f"chosen by {self.chosen_by})")


def plan_num_pages(model: ShardedModel, cfg: EngineConfig, max_model_len: int) -> KVPoolPlan:
    """Pages per data shard: min(what the memory planner leaves after weights, pages for
    `max_seqs` sequences of `max_model_len` tokens), or `cfg.num_pages` when set.

    With the pages split S ways over `kv_split` each device holds 1/S of them: the memory
    allows S times the pages (so S times the max_model_len), and the count is a multiple
    of S so every device holds the same number."""
    mc = model.config
    per_page = (
        mc.num_layers
        * cfg.page_size
        * 2
        * mc.num_kv_heads
        * mc.head_dim
        * jnp.dtype(model.dtype).itemsize
    ) // model.rules.axis_size("kv_heads")
    need = math.ceil(max_model_len / cfg.page_size)
    split = model.rules.axis_size("kv_split")
    use = math.ceil(cfg.max_seqs * need / split) * split
    if cfg.num_pages is not None:
        if cfg.num_pages % split:
            raise ValueError(
                f"num_pages={cfg.num_pages} must be a multiple of the {split} devices each "
                f"sequence's pages are split over"
            )
        return KVPoolPlan(cfg.num_pages, None, use, "config", per_page, split)
    plan = memory_plan(
        model.source_config, model.rules.mesh, model.dtype, 0,
        max_step_tokens=cfg.max_step_tokens, capacity_bytes=cfg.device_memory_bytes,
    )
    budget = (
        plan.capacity_bytes - plan.weights_bytes - plan.reserve_bytes
    ) * cfg.kv_memory_fraction
    if cfg.max_kv_memory_bytes is not None:
        budget = min(budget, cfg.max_kv_memory_bytes)
    pages = int(budget // per_page) * split
    if pages < need:
        raise ValueError(
            f"KV cache room for {pages} pages of {cfg.page_size} tokens per device, but one "
            f"sequence of max_model_len={max_model_len} needs {need}: lower max_model_len "
            f"or use more tensor parallelism"
        )
    if use <= pages:
        return KVPoolPlan(use, pages, use, "use", per_page, split)
    return KVPoolPlan(pages, pages, use, "memory", per_page, split)
