"""How the engine places a model's layers: packed for the CPU kernels, stacked under a
scan (`EngineConfig.scan_layers`, models/scan.py), or as they were loaded."""

from __future__ import annotations

import logging

from meshserve.engine.config import EngineConfig
from meshserve.engine.packing import PACKED_EXPERTS, pack_weights, packing_applies
from meshserve.models.layers import Matmul, plain_matmul
from meshserve.models.loading import ShardedModel
from meshserve.models.moe import ExpertsFn
from meshserve.models.scan import scan_refusal, stack_layers

log = logging.getLogger(__name__)


def place_layers(
    model: ShardedModel, cfg: EngineConfig
) -> tuple[ShardedModel, Matmul, ExpertsFn | None, bool]:
    """(model, matmul, experts, scanned). Packing wins over scanning on one CPU device:
    the packed matmul reads each weight's shape as one layer's, and there the measured
    compile times are what packing buys back at decode. A model whose layers differ
    stays unrolled, with the reason logged."""
    if cfg.pack_weights and packing_applies(model):
        if cfg.scan_layers:
            log.info("scan_layers: unrolled, the weights are packed for the CPU kernels")
        # A copy: the caller drops its model to free the memory.
        packed, matmul = pack_weights(model)
        return packed, matmul, PACKED_EXPERTS, False
    if cfg.scan_layers:
        reason = scan_refusal(model.config)
        if reason is None:
            return stack_layers(model), plain_matmul, None, True
        log.info("scan_layers: unrolled, %s", reason)
    return model, plain_matmul, None, False
