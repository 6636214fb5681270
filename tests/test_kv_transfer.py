"""engine/kv_transfer.py between two real processes on loopback: bit-exact pulls, layouts
refused before any pull, resharding through a staging layout, bounded waits, reclaiming
offers nobody pulled, and the loopback-only default."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from meshserve.engine import kv_transfer as kt
from tests.kv_transfer_peer import arrays as expected_arrays
from tests.serving_fixtures import REPO, subprocess_env


@pytest.fixture
def peer():
    procs = []

    def start(*args: str):
        p = subprocess.Popen([sys.executable, "-m", "tests.kv_transfer_peer", *args],
                             cwd=REPO, env=os.environ | subprocess_env(), stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        procs.append(p)

        def read_offer() -> dict:
            meta = json.loads(p.stdout.readline())
            meta["layouts"] = [kt.ArrayLayout(**{
                k: tuple(tuple(e) if isinstance(e, list) else e for e in v)
                if isinstance(v, list) else v for k, v in d.items()}) for d in meta["layouts"]]
            return meta

        meta = read_offer()

        def command(cmd: str) -> dict | None:
            p.stdin.write(cmd + "\n")
            p.stdin.flush()
            if cmd == "exit":
                assert p.wait(10) == 0
                return None
            return read_offer() if cmd == "offer" else json.loads(p.stdout.readline())

        return meta, command

    yield start
    for p in procs:
        p.kill()
        p.wait(10)


def destination(spec_pages=(None, None, "kv"), devices=slice(2, 4)):
    mesh = Mesh(np.array(jax.devices()[devices]), ("kv",))
    pages, table = expected_arrays()
    return [jax.ShapeDtypeStruct(pages.shape, pages.dtype,
                                 sharding=NamedSharding(mesh, PartitionSpec(*spec_pages))),
            jax.ShapeDtypeStruct(table.shape, table.dtype,
                                 sharding=NamedSharding(mesh, PartitionSpec()))]


def test_pull_bit_exact_then_reclaim_and_refusals(peer):
    meta, command = peer()
    local = kt.KVTransport("127.0.0.1:0", pull_timeout_s=5.0)
    want = [np.asarray(x) for x in expected_arrays()]
    # Another per-shard layout without resharding: refused before the transfer server
    # is touched (a pull into it would return wrong bytes).
    with pytest.raises(kt.LayoutMismatchError, match="does not reshard"):
        local.pull(meta["address"], meta["uuid"], meta["layouts"],
                   destination(spec_pages=(None, "kv")), allow_reshard=False)
    with pytest.raises(kt.LayoutMismatchError, match="destination expects"):
        local.pull(meta["address"], meta["uuid"], meta["layouts"], destination()[::-1])
    assert local.stats.pulls == 0
    # The real pull: staged in the offer's layout on our devices 2-3, resharded here.
    dst = destination(spec_pages=(None, "kv"))
    got = local.pull(meta["address"], meta["uuid"], meta["layouts"], dst)
    assert got[0].sharding == dst[0].sharding
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and np.array_equal(np.asarray(g).view(np.uint8),
                                                     w.view(np.uint8))
    st = command("consumed")
    assert st["consumed"] == 1 and not st["pending"]
    # A consumed uuid would block forever: the wait is bounded and counted.
    t0 = time.monotonic()
    with pytest.raises(kt.TransferTimeoutError):
        local.pull(meta["address"], meta["uuid"], meta["layouts"], destination(),
                   timeout_s=1.0)
    assert time.monotonic() - t0 < 3.0 and local.stats.abandoned_pulls == 1
    # Offered over 2 devices, wanted on 1: staged on two of ours, then gathered there.
    meta = command("offer")
    dst = destination(devices=slice(5, 6))
    got = local.pull(meta["address"], meta["uuid"], meta["layouts"], dst)
    assert got[0].sharding == dst[0].sharding
    assert all(np.array_equal(np.asarray(g).view(np.uint8), w.view(np.uint8))
               for g, w in zip(got, want, strict=True))
    command("exit")


def test_unpulled_offer_is_reclaimed_after_ttl(peer):
    meta, command = peer("0.5")
    time.sleep(0.6)
    st = command("expire")
    assert st["expired"] == 1 and st["reclaimed"] == 1 and not st["pending"]
    assert st["abandoned_pulls"] == 0
    command("exit")


def test_remote_addresses_need_the_insecure_flag():
    with pytest.raises(kt.InsecureTransferError, match="--kv-transfer-insecure"):
        kt.check_address("10.1.2.3:5000", allow_remote=False)
    kt.check_address("10.1.2.3:5000", allow_remote=True)
    kt.check_address("[::1]:5000", allow_remote=False)
    kt.check_address("127.0.0.1:0", allow_remote=False)
