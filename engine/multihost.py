"""Multi-host serving: one engine over a mesh that spans several processes.

Process 0, the leader, runs the gRPC server, the router and the engine's scheduler. For
every step its engine first sends the step's host inputs (`StepInputs`, numpy) over the
step channel (engine/step_channel.py, which explains why a TCP channel of our own rather
than JAX's key-value store), then launches the jitted step. Each follower builds the same
`MultiHostEngine` over the same global mesh (same checkpoint, layout and config; the
channel's handshake compares them) and calls `execute(inputs, decode)` on every step it
receives, so all processes enter the same collectives in the same order. Warm-up and
precompiles go through `launch` as well, so they run everywhere. Step outputs are
sharded over data, so part of them lives on other processes: `launch` gathers them with
a jit whose outputs are replicated, and the leader reads them as before.

One slice spans the processes (`--slices 1`); several slices per process group are not
supported.

Failures are detected, never waited on: a collective whose peer died never returns, and
JAX's own heartbeat only aborts the survivors much later. The leader treats as a group
failure (1) a follower's connection closing (a killed process: at once), (2) a follower
silent past the heartbeat timeout (hung, or the network is cut), (3) a step not finished
within the step timeout (a longer one the first time a shape compiles), (4) an error a
follower reports, or an error in its own step. Then it ends every stream with an error
(UNAVAILABLE at the gRPC layer, after the tokens already sent), turns unhealthy (health
NOT_SERVING), tells the surviving followers to exit, and exits with EXIT_GROUP_FAILED
after a short delay, so that a supervisor restarts the whole group. A follower that
loses its leader exits with EXIT_GROUP_FAILED at once.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from meshserve.engine.batching import build_inputs
from meshserve.engine.config import EngineConfig
from meshserve.engine.engine import Engine, EngineDeadError
from meshserve.engine.kv_pool import plan_num_pages
from meshserve.engine.scheduler import StepPlan
from meshserve.engine.step import StepInputs, StepOutputs
from meshserve.engine.step_channel import (
    ChannelClosed,
    ChannelError,
    FollowerLink,
    LeaderLink,
    Message,
    pack_array,
    unpack_array,
)
from meshserve.meshes.distributed import EXIT_GROUP_FAILED, exit_now
from meshserve.models.loading import ShardedModel

STEP_DTYPES = ("bool", "int32", "uint32", "float32")
Log = Callable[..., None]


def _no_log(*_args: Any, **_fields: Any) -> None:
    pass


# -- steps on the wire ----------------------------------------------------------------


def encode_step(index: int, inputs: StepInputs, decode: bool) -> Message:
    leaves = jax.tree_util.tree_flatten_with_path(inputs)[0]
    return {
        "t": "step",
        "n": index,
        "decode": bool(decode),
        "inputs": {jax.tree_util.keystr(path): pack_array(x) for path, x in leaves},
    }


def decode_step(message: Message, template: StepInputs) -> tuple[int, StepInputs, bool]:
    """Rebuild a step from the wire: the same fields, dtypes, ranks and data-shard count
    as `template` (an empty step of this engine), or ChannelError."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    arrays, index, decode = message.get("inputs"), message.get("n"), message.get("decode")
    if not isinstance(arrays, dict) or not isinstance(index, int) or not isinstance(
            decode, bool):
        raise ChannelError("a step message needs inputs, n and decode")
    names = [jax.tree_util.keystr(path) for path, _ in flat]
    if set(arrays) != set(names):
        raise ChannelError(f"step fields {sorted(arrays)} are not {sorted(names)}")
    leaves = []
    for name, (_, ref) in zip(names, flat, strict=True):
        ref = np.asarray(ref)
        a = unpack_array(arrays[name], STEP_DTYPES)
        if a.dtype != ref.dtype or a.ndim != ref.ndim or (a.ndim and a.shape[0] != ref.shape[0]):
            raise ChannelError(f"step field {name}: {a.dtype}{list(a.shape)} does not match "
                               f"{ref.dtype}{list(ref.shape)}")
        leaves.append(a)
    return index, jax.tree_util.tree_unflatten(treedef, leaves), decode


def agree_config(model: ShardedModel, cfg: EngineConfig) -> EngineConfig:
    """Every process must allocate the same KV cache: with num_pages unset each sizes it
    from its own memory, and all take the smallest (a collective: call everywhere)."""
    if cfg.num_pages is not None:
        return cfg
    mc = model.config
    max_len = min(cfg.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
    pages = np.asarray(plan_num_pages(model, cfg, max_len).pages, np.int32)
    return dataclasses.replace(cfg, num_pages=int(np.min(multihost_utils.process_allgather(pages))))


# -- the engine -----------------------------------------------------------------------


@dataclasses.dataclass
class _Watch:
    index: int
    timeout: float
    launched: float
    arrays: list[jax.Array] | None = None  # the step's outputs, once launched


class MultiHostEngine(Engine):
    """An Engine on a mesh across processes. With a `link` (the leader) each launch is
    first broadcast to the followers and watched by a step watchdog; without one (a
    follower) it only runs what `run_follower` hands it."""

    def __init__(self, model: ShardedModel, config: EngineConfig | None = None,
                 tokenizer=None, attention_impl: str | None = None, *,
                 link: LeaderLink | None = None, step_timeout: float = 60.0,
                 compile_timeout: float = 900.0,
                 on_failure: Callable[[str], None] | None = None):
        super().__init__(model, config, tokenizer, attention_impl)
        self.overlap = False  # followers run exactly the calls the leader sends
        self._gather = jax.jit(lambda out: out,
                               out_shardings=model.rules.replicated_sharding())
        self._link = link
        self._step_timeout = step_timeout
        self._compile_timeout = compile_timeout
        self._on_failure = on_failure
        self._launched = 0
        self._shapes: set[tuple] = set()
        self._pending: collections.deque[_Watch] = collections.deque()
        self._failure: str | None = None
        if link is not None:
            threading.Thread(target=self._watchdog, name="meshserve-step-watchdog",
                             daemon=True).start()

    def launch(self, inputs: StepInputs, decode: bool) -> StepOutputs:
        if self._failure is not None:
            raise EngineDeadError(self._failure)
        index, self._launched = self._launched, self._launched + 1
        # A shape's first launch compiles (in every process: a follower may still be
        # compiling after the leader finished, see _watchdog).
        shape = (bool(decode), np.shape(inputs.tokens), np.shape(inputs.kv_lens))
        timeout = self._step_timeout if shape in self._shapes else self._compile_timeout
        self._shapes.add(shape)
        watch = None
        if self._link is not None:
            watch = _Watch(index, timeout, time.monotonic())
            self._pending.append(watch)
            try:
                self._link.broadcast(encode_step(index, inputs, decode))
            except ChannelClosed as e:
                raise EngineDeadError(f"could not send step {index}: {e}") from None
        out = self._gather(super().launch(inputs, decode))
        if watch is not None:
            watch.arrays = jax.tree.leaves(out)
        return out

    def fail(self, reason: str) -> None:
        """Stop serving from any thread: the engine turns unhealthy and every stream ends
        with `reason` as its error (tokens already streamed are not sent again)."""
        if self._failure is not None:
            return
        self._failure = self.error = reason
        try:
            self._fail_all(reason, reason="abort")
        except Exception:  # noqa: BLE001 - the step thread may be mid-update; exiting anyway
            pass

    def _watchdog(self) -> None:
        """Steps finish in order everywhere: watch the oldest unfinished one, finished
        when its outputs are ready here and every follower reported it done. Its time
        runs from when the step before it finished (a follower may still be compiling
        that one: a step without collectives finishes on the leader alone)."""
        last_done = time.monotonic()
        while self._failure is None and not self._stopping:
            time.sleep(0.05)
            if self.error is not None and self._failure is None:
                self._report(self.error)  # the leader's own step raised
                return
            while self._pending:
                w = self._pending[0]
                if (w.arrays is not None and all(a.is_ready() for a in w.arrays)
                        and self._link.finished(w.index)):
                    self._pending.popleft()
                    last_done = time.monotonic()
                    continue
                if time.monotonic() > max(w.launched, last_done) + w.timeout:
                    self._report(f"step {w.index} did not finish within {w.timeout:g}s (a "
                                 "process hung, or a collective waits on a dead peer)")
                    return
                break

    def _report(self, reason: str) -> None:
        if self._on_failure is not None:
            self._on_failure(reason)
        else:
            self.fail(reason)


# -- failure handling and the follower loop -------------------------------------------


class LeaderFailure:
    """The leader's reaction to a group failure; the first report wins.

    Fails the engine's streams at once, tells the surviving followers to stop, and exits
    the process with EXIT_GROUP_FAILED after `exit_delay` seconds (time for the errors
    and the NOT_SERVING health status to reach clients and probes)."""

    def __init__(self, exit_delay: float = 2.0, log: Log = _no_log):
        self.exit_delay = exit_delay
        self.log = log
        self.engine: MultiHostEngine | None = None
        self.link: LeaderLink | None = None
        self.reason: str | None = None
        self.at: float | None = None
        self._lock = threading.Lock()

    def __call__(self, reason: str) -> None:
        with self._lock:
            if self.reason is not None:
                return
            self.reason, self.at = reason, time.monotonic()
        self.log("process_group_failed", reason=reason, exit_in_s=self.exit_delay)
        if self.engine is not None:
            self.engine.fail(f"the process group failed: {reason}")
        if self.link is not None:
            threading.Thread(target=self.link.stop, args=(reason, True, 0.0),
                             daemon=True).start()
        timer = threading.Timer(self.exit_delay, exit_now,
                                (EXIT_GROUP_FAILED, f"the process group failed: {reason}"))
        timer.daemon = True
        timer.start()


def empty_step(engine: Engine) -> StepInputs:
    plan = StepPlan(decode=False, shards=[[] for _ in range(engine.data_shards)])
    return build_inputs(plan, engine.config, engine.pages_per_seq, 0)


def run_follower(engine: MultiHostEngine, link: FollowerLink,
                 should_stop: Callable[[], bool] = lambda: False) -> int:
    """Run the leader's steps until it says stop; returns the exit code it asks for.

    A step that fails here is reported to the leader (which fails the group) and
    re-raised. Losing the leader is handled by the link's failure callback."""
    template = empty_step(engine)
    expected = 0
    while not should_stop():
        message = link.next_message(timeout=0.5)
        if message is None:
            continue
        if message["t"] == "stop":
            return EXIT_GROUP_FAILED if message.get("failed") else 0
        try:
            if message["t"] != "step":
                raise ChannelError(f"unexpected message {message['t']!r}")
            index, inputs, decode = decode_step(message, template)
            if index != expected:
                raise ChannelError(f"step {index} arrived where {expected} was due")
            engine.execute(inputs, decode)
        except Exception as e:
            link.report_error(f"{type(e).__name__}: {e}")
            raise
        link.report_done(index)
        expected += 1
    return 0
