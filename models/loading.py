"""Placing a model on a mesh: layout checks, sharding rules, restore and random init.

The abstract model (shapes, dtypes and logical axes from `nnx.eval_shape`) drives
everything: the memory planner, the shardings, the restore targets and random init.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from meshserve.meshes import (
    LayoutError,
    MemoryPlan,
    MeshLayout,
    ShardingRules,
    TensorSpec,
    plan_memory,
)
from meshserve.models.checkpoint import (
    checkpoint_config,
    checkpoint_writer,
    read_manifest,
    restore_items,
)
from meshserve.models.config import ModelConfig
from meshserve.models.hf_weights import item_of
from meshserve.models.transformer import Transformer

KV_PARAMS = ("k_proj", "v_proj", "k_bias", "v_bias")


def effective_kv_heads(cfg: ModelConfig, tensor: int) -> int:
    """KV heads after replication: with more tensor shards than KV heads each shard gets
    a copy of the head its query heads use (what vLLM and others do)."""
    if tensor > cfg.num_kv_heads and tensor % cfg.num_kv_heads == 0:
        return tensor
    return cfg.num_kv_heads


def layout_problems(cfg: ModelConfig, layout: MeshLayout) -> list[str]:
    t = layout.tensor
    problems = []
    if cfg.num_heads % t:
        problems.append(f"num_heads={cfg.num_heads} is not divisible by tensor={t}")
    kv = cfg.num_kv_heads
    if kv % t and t % kv:
        problems.append(f"kv_heads={kv} and tensor={t}: neither divides the other")
    dense_layers = len(cfg.moe_layers) < cfg.num_layers
    if dense_layers and cfg.intermediate_size % t:
        problems.append(f"intermediate_size={cfg.intermediate_size} is not divisible by tensor={t}")
    if not cfg.moe_layers:
        if layout.expert > 1:
            problems.append(
                f"expert={layout.expert}: {cfg.family} is a dense model with no experts")
        return problems
    if cfg.num_experts % layout.expert:
        problems.append(f"num_experts={cfg.num_experts} is not divisible by expert={layout.expert}")
    if cfg.moe_intermediate_size % t:
        problems.append(
            f"moe_intermediate_size={cfg.moe_intermediate_size} is not divisible by tensor={t}")
    return problems


def working_layouts(cfg: ModelConfig, num_devices: int) -> list[str]:
    """tensor × expert factorisations of `num_devices` (the rest on data) that fit `cfg`."""
    good = []
    for t in range(1, num_devices + 1):
        for x in range(1, num_devices // t + 1):
            if num_devices % (t * x) or (x > 1 and not cfg.moe_layers):
                continue
            layout = MeshLayout(data=num_devices // (t * x), tensor=t, expert=x)
            if not layout_problems(cfg, layout):
                good.append(f"tensor={t}" if x == 1 else f"tensor={t},expert={x}")
    return good


def check_layout(cfg: ModelConfig, layout: MeshLayout, num_devices: int) -> None:
    """Raise LayoutError naming what is wrong and which tensor sizes would work."""
    problems = layout_problems(cfg, layout)
    if layout.num_devices > num_devices:
        problems.append(f"layout needs {layout.num_devices} devices, {num_devices} exist")
    if problems:
        if cfg.moe_layers:
            good_layouts = working_layouts(cfg, num_devices)
            hint = f"Layouts that work on {num_devices} devices: {good_layouts}"
        else:
            good = [
                t
                for t in range(1, num_devices + 1)
                if num_devices % t == 0 and not layout_problems(cfg, MeshLayout(tensor=t))
            ]
            hint = f"Tensor sizes that work on {num_devices} devices: {good}"
        raise LayoutError(
            f"layout {layout.to_string()} does not fit {cfg.family}: {'; '.join(problems)}. "
            + hint
        )


def sharding_rules(cfg: ModelConfig, mesh: Mesh) -> ShardingRules:
    probe = ShardingRules.create(mesh)
    kv = effective_kv_heads(cfg, probe.axis_size("kv_heads"))
    dims = {
        "vocab": cfg.vocab_size,
        "heads": cfg.num_heads,
        "kv_heads": kv,
        "kv_channels": 2 * kv,
        "mlp": cfg.intermediate_size,
    }
    if cfg.moe_layers:
        dims.update(experts=cfg.num_experts, expert_mlp=cfg.moe_intermediate_size)
    return ShardingRules.create(mesh, dims)


def _abstract(cfg: ModelConfig, dtype) -> tuple[nnx.GraphDef, nnx.State]:
    model = nnx.eval_shape(lambda: Transformer(cfg, dtype, rngs=nnx.Rngs(0)))
    return nnx.split(model)


def _flat_params(state: nnx.State) -> dict[str, Any]:
    return {".".join(map(str, path)): var for path, var in nnx.to_flat_state(state)}


def param_specs(cfg: ModelConfig, dtype) -> list[TensorSpec]:
    _, state = _abstract(cfg, dtype)
    return [
        TensorSpec(tuple(v.shape), jnp.dtype(v.dtype).itemsize, v.get_metadata()["axes"])
        for v in _flat_params(state).values()
    ]


@dataclasses.dataclass
class ShardedModel:
    """Parameters placed on a mesh, plus what is needed to rebuild the NNX module."""

    config: ModelConfig  # with kv heads as placed (replicated when tensor > kv heads)
    source_config: ModelConfig
    graphdef: nnx.GraphDef
    params: nnx.State
    rules: ShardingRules
    dtype: Any

    def module(self, params: nnx.State | None = None) -> Transformer:
        return nnx.merge(self.graphdef, self.params if params is None else params)


def _placed(cfg: ModelConfig, mesh: Mesh, dtype):
    check_layout(cfg, MeshLayout(**mesh.shape), mesh.size)
    rules = sharding_rules(cfg, mesh)
    placed = dataclasses.replace(
        cfg, num_kv_heads=effective_kv_heads(cfg, rules.axis_size("heads"))
    )
    graphdef, state = _abstract(placed, dtype)
    return placed, rules, graphdef, state


def _shardings(state: nnx.State, rules: ShardingRules):
    return jax.tree.map(
        lambda v: rules.sharding(v.get_metadata()["axes"]),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def init_random(
    cfg: ModelConfig, mesh: Mesh, dtype=jnp.float32, seed: int = 0, init_std: float = 0.02
) -> ShardedModel:
    """Random weights created directly in their shardings (nothing is gathered)."""
    placed, rules, graphdef, state = _placed(cfg, mesh, dtype)
    shardings = _shardings(state, rules)

    @jax.jit
    def init():
        return nnx.state(Transformer(placed, dtype, rngs=nnx.Rngs(seed), init_std=init_std))

    params = jax.jit(init, out_shardings=shardings)()
    return ShardedModel(placed, cfg, graphdef, params, rules, dtype)


def load_checkpoint(ckpt_dir: str, mesh: Mesh, dtype=None) -> ShardedModel:
    """Restore every parameter straight into its sharding on `mesh`."""
    cfg = checkpoint_config(ckpt_dir)
    dtype = jnp.dtype(dtype or read_manifest(ckpt_dir)["dtype"])
    placed, rules, graphdef, state = _placed(cfg, mesh, dtype)
    repeat = placed.num_kv_heads // cfg.num_kv_heads
    flat = _flat_params(state)
    targets = {}
    for path, var in flat.items():
        axes = var.get_metadata()["axes"]
        if repeat > 1 and path.rsplit(".", 1)[-1] in KV_PARAMS:
            # Stored with the original heads: restore replicated, then repeat in place.
            axes = tuple(None if a == "kv_heads" else a for a in axes)
        targets[path] = (rules.sharding(axes), dtype)
    restored = restore_items(ckpt_dir, targets, item_of)
    for path, var in flat.items():
        value = restored[path]
        if repeat > 1 and path.rsplit(".", 1)[-1] in KV_PARAMS:
            axis = list(var.get_metadata()["axes"]).index("kv_heads")
            value = jax.jit(
                lambda x, axis=axis: jnp.repeat(x, repeat, axis=axis),
                out_shardings=rules.sharding(var.get_metadata()["axes"]),
            )(value)
        if tuple(value.shape) != tuple(var.shape):
            raise ValueError(f"{path}: checkpoint shape {value.shape} != model shape {var.shape}")
        var.set_value(value) if hasattr(var, "set_value") else setattr(var, "value", value)
    return ShardedModel(placed, cfg, graphdef, state, rules, dtype)


def memory_plan(
    cfg: ModelConfig,
    mesh: Mesh,
    dtype,
    kv_cache_tokens: int,
    max_step_tokens: int = 512,
    capacity_bytes: int | None = None,
) -> MemoryPlan:
    """Per-device bytes of weights, a KV cache of `kv_cache_tokens` tokens (per data
    shard) and a reserve for one step's activations, before anything is loaded."""
    check_layout(cfg, MeshLayout(**mesh.shape), mesh.size)
    rules = sharding_rules(cfg, mesh)
    placed = dataclasses.replace(
        cfg, num_kv_heads=effective_kv_heads(cfg, rules.axis_size("heads"))
    )
    itemsize = jnp.dtype(dtype).itemsize
    # Context parallelism splits each sequence's KV over `kv_split` (rounded up to it).
    split = rules.axis_size("kv_split")
    kv = TensorSpec(
        (placed.num_layers, 2, -(-kv_cache_tokens // split) * split, placed.num_kv_heads,
         placed.head_dim),
        itemsize,
        (None, None, "kv_split", "kv_heads", "head_dim"),
    )
    # One step's f32 activations: logits, the MLP hidden, attention and residual streams.
    mlp = max(cfg.intermediate_size, cfg.experts_per_token * cfg.moe_intermediate_size)
    per_token = 4 * (cfg.vocab_size + 2 * mlp + 6 * cfg.hidden_size)
    reserve = max_step_tokens * per_token + (64 << 20)
    return plan_memory(
        rules,
        param_specs(placed, dtype),
        [kv],
        reserve,
        capacity_bytes,
        layout=MeshLayout(**mesh.shape).to_string(),
    )


def save_model(model: ShardedModel, out_dir: str, overwrite: bool = False, **extra) -> None:
    """Write a placed model as a checkpoint (used for the demo and random benchmarks)."""
    if model.config.num_kv_heads != model.source_config.num_kv_heads:
        raise ValueError("save from a layout without KV-head replication (tensor <= kv heads)")
    by_item: dict[str, dict[str, np.ndarray]] = {}
    for path, var in _flat_params(model.params).items():
        by_item.setdefault(item_of(path), {})[path] = np.asarray(jax.device_get(var[...]))
    with checkpoint_writer(out_dir, overwrite=overwrite) as writer:
        for item, arrays in by_item.items():
            writer.save_item(item, arrays)
        files = extra.pop("files", {})
        for name, data in files.items():
            with open(os.path.join(writer.directory, name), "wb") as f:
                f.write(data)
        writer.set_manifest(model.source_config, jnp.dtype(model.dtype).name, extra)
