"""A second process for tests/test_kv_transfer.py: offers deterministic arrays through
engine/kv_transfer.py and prints the side-channel metadata (JSON) on stdout; each line on
stdin is a command ("withdraw", "stats", "exit")."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from meshserve.engine.kv_transfer import KVTransport  # noqa: E402


def arrays() -> list[jax.Array]:
    """KV-page-like bf16 pages split 2 ways over kv heads, plus an int32 table."""
    mesh = Mesh(np.array(jax.devices()[:2]), ("kv",))
    pages = (jnp.arange(3 * 16 * 8 * 128, dtype=jnp.float32).reshape(3, 16, 8, 128) * 0.37
             ).astype(jnp.bfloat16)
    table = jnp.arange(12, dtype=jnp.int32).reshape(3, 4) * 7
    return [jax.device_put(pages, NamedSharding(mesh, PartitionSpec(None, None, "kv"))),
            jax.device_put(table, NamedSharding(mesh, PartitionSpec()))]


def main() -> None:
    transport = KVTransport("127.0.0.1:0", ttl_s=float(sys.argv[1]) if len(sys.argv) > 1
                            else 60.0)
    def announce():
        offer = transport.offer(arrays())
        print(json.dumps({"address": transport.address, "uuid": offer.uuid,
                          "layouts": [dataclasses.asdict(x) for x in offer.layouts]}),
              flush=True)
        return offer

    offer = announce()
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "offer":
            offer = announce()
            continue
        if cmd == "withdraw":
            transport.withdraw(offer.uuid)
        elif cmd == "expire":
            transport.expire()
        elif cmd == "consumed":
            transport.consumed(offer.uuid)
        if cmd == "exit":
            return
        print(json.dumps(dataclasses.asdict(transport.stats) | {
            "pending": transport.pending(offer.uuid)}), flush=True)


if __name__ == "__main__":
    jax.config.update("jax_num_cpu_devices", 4)  # only here: the tests import arrays()
    main()
