"""What a prefill/decode handoff carries, as plain data: `KVHandoff` (the request and
its KV array) and `KVLayout` (the array's shape in numbers), with the JSON description
a transport sends beside the array. Nothing here touches an engine (engine/handoff.py
does): a transport may use it alone.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from meshserve.engine.sampling_params import InvalidRequestError, SamplingParams

# The finish reason of a prefill-only request's last chunk: its first token is out and
# its KV waits, parked, for export_kv (the client's stream goes on elsewhere).
PREFILLED = "prefilled"
# Logical axes of the handoff array: the kv channels stay split as the pool's are.
HANDOFF_AXES = (None, None, "page_slot", "kv_channels", "head_dim")
DESCRIPTION_VERSION = 1


class HandoffError(InvalidRequestError):
    """A handoff this engine cannot take (another model or pool layout, bad ids or
    lengths); the message says what differs."""


class NotParkedError(LookupError):
    """No parked request has this id (never prefill-only, already released or expired)."""


@dataclasses.dataclass(frozen=True)
class KVLayout:
    """What a handoff's KV array is, in plain numbers: a transport checks the metadata it
    received against the array it holds (and the decode engine against its pool) before
    anything is copied into pages."""

    num_layers: int
    page_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    pages: int  # pages holding the request's computed tokens, in order
    rows: int  # rows of the array (a power-of-two bucket >= pages; the rest are zeros)

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, self.rows, self.page_size, 2 * self.num_kv_heads,
                self.head_dim)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * jnp.dtype(self.dtype).itemsize

    def check_array(self, kv: Any) -> None:
        shape, dtype = tuple(np.shape(kv)), str(jnp.dtype(kv.dtype))
        if shape != self.shape or dtype != self.dtype:
            raise HandoffError(f"the KV array is {dtype}{list(shape)}, its layout says "
                               f"{self.dtype}{list(self.shape)}")

    def check_pool(self, pool: KVLayout) -> None:
        """Raise unless KV of this layout fits a pool described by `pool` (pages, rows
        ignored)."""
        keys = ("num_layers", "page_size", "num_kv_heads", "head_dim", "dtype")
        diff = [f"{k} {getattr(self, k)} != {getattr(pool, k)}" for k in keys
                if getattr(self, k) != getattr(pool, k)]
        if diff:
            raise HandoffError("the handoff's KV does not fit this engine's pool: "
                               + ", ".join(diff))
        if not 0 < self.pages <= self.rows:
            raise HandoffError(f"the layout has {self.pages} pages in {self.rows} rows")


@dataclasses.dataclass(frozen=True)
class KVHandoff:
    """A prefilled request, ready to decode elsewhere.

    `num_computed` tokens (the prompt) have their K/V in `kv`; `output_ids` (the first
    token, already streamed by the prefill side) are sampled but not yet fed. `seed` is
    the seed the prefill engine sampled with (drawn if the request had none): with it
    the decode side samples exactly what the prefill engine would have. `kv` lives on
    the prefill engine's mesh (None in a description sent ahead of the array)."""

    request_id: str
    prompt_ids: tuple[int, ...]
    output_ids: tuple[int, ...]
    params: SamplingParams
    seed: int
    num_computed: int
    priority: int
    cache_root: bytes  # the prefix-cache chain root (from the cache salt)
    cached_tokens: int  # prompt tokens the prefill engine found in its prefix cache
    layout: KVLayout
    kv: jax.Array | None = None
    queue_ms: float | None = None  # prefill side: arrival → first scheduled
    prefill_ms: float | None = None  # prefill side: first scheduled → first token

    def describe(self) -> dict[str, Any]:
        """Everything but the array, JSON-safe (for a side channel)."""
        return {
            "version": DESCRIPTION_VERSION,
            "request_id": self.request_id,
            "prompt_ids": list(self.prompt_ids),
            "output_ids": list(self.output_ids),
            "params": {**dataclasses.asdict(self.params), "stop": list(self.params.stop),
                       "stop_token_ids": list(self.params.stop_token_ids)},
            "seed": self.seed,
            "num_computed": self.num_computed,
            "priority": self.priority,
            "cache_root": self.cache_root.hex(),
            "cached_tokens": self.cached_tokens,
            "layout": dataclasses.asdict(self.layout),
            "queue_ms": self.queue_ms,
            "prefill_ms": self.prefill_ms,
        }

    @classmethod
    def from_description(cls, desc: Mapping[str, Any], kv: Any = None) -> KVHandoff:
        """The inverse of `describe` (with the array, if it is there); malformed input
        raises HandoffError, never anything else."""
        try:
            if desc["version"] != DESCRIPTION_VERSION:
                raise HandoffError(f"handoff description version {desc['version']!r}, "
                                   f"expected {DESCRIPTION_VERSION}")
            p = dict(desc["params"])
            params = SamplingParams(**{**p, "stop": tuple(str(s) for s in p["stop"])})
            layout = KVLayout(**{k: (str if k == "dtype" else int)(v)
                                 for k, v in dict(desc["layout"]).items()})
            out = cls(
                request_id=str(desc["request_id"]),
                prompt_ids=tuple(int(t) for t in desc["prompt_ids"]),
                output_ids=tuple(int(t) for t in desc["output_ids"]),
                params=params, seed=int(desc["seed"]), num_computed=int(desc["num_computed"]),
                priority=int(desc["priority"]), cache_root=bytes.fromhex(desc["cache_root"]),
                cached_tokens=int(desc["cached_tokens"]), layout=layout, kv=kv,
                queue_ms=_opt_float(desc.get("queue_ms")),
                prefill_ms=_opt_float(desc.get("prefill_ms")),
            )
        except HandoffError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise HandoffError(f"malformed handoff description: {type(e).__name__}: {e}"
                               ) from None
        if kv is not None:
            layout.check_array(kv)
        return out

    def with_kv(self, kv: Any) -> KVHandoff:
        self.layout.check_array(kv)
        return dataclasses.replace(self, kv=kv)


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def bucket_rows(pages: int, limit: int) -> int:
    """Powers of two (capped at a sequence's page count): few gather/scatter programs."""
    return min(1 << max(0, pages - 1).bit_length(), max(limit, pages))
