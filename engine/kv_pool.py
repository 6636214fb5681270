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

    @property
    def bytes_per_device(self) -> int:
        return self.pages * self.page_bytes

    def describe(self) -> str:
        budget = "-" if self.budget_pages is None else str(self.budget_pages)
        return (f"KV pool {self.pages} pages per data shard "
                f"({self.bytes_per_device / 2**20:.2f} MiB per device; memory allows "
                f"{budget}, max_seqs x max_model_len uses {self.use_pages}; "
                f"chosen by {self.chosen_by})")


def plan_num_pages(model: ShardedModel, cfg: EngineConfig, max_model_len: int) -> KVPoolPlan:
    """Pages per data shard: min(what the memory planner leaves after weights, pages for
    `max_seqs` sequences of `max_model_len` tokens), or `cfg.num_pages` when set."""
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
    use = cfg.max_seqs * need
    if cfg.num_pages is not None:
        return KVPoolPlan(cfg.num_pages, None, use, "config", per_page)
    plan = memory_plan(
        model.source_config, model.rules.mesh, model.dtype, 0,
        max_step_tokens=cfg.max_step_tokens, capacity_bytes=cfg.device_memory_bytes,
    )
    budget = (
        plan.capacity_bytes - plan.weights_bytes - plan.reserve_bytes
    ) * cfg.kv_memory_fraction
    if cfg.max_kv_memory_bytes is not None:
        budget = min(budget, cfg.max_kv_memory_bytes)
    pages = int(budget // per_page)
    if pages < need:
        raise ValueError(
            f"KV cache room for {pages} pages of {cfg.page_size} tokens per device, but one "
            f"sequence of max_model_len={max_model_len} needs {need}: lower max_model_len "
            f"or use more tensor parallelism"
        )
    if use <= pages:
        return KVPoolPlan(use, pages, use, "use", per_page)
    return KVPoolPlan(pages, pages, use, "memory", per_page)
