"""Start-up: the default program set, a KV pool sized to use, readiness during warm-up,
and a second start that loads every program from the persistent compilation cache."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import random
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshserve.engine.config import EngineConfig
from meshserve.engine.kv_pool import plan_num_pages
from meshserve.engine.sampling_params import SamplingParams
from meshserve.meshes import make_mesh, parse_layout
from meshserve.models.loading import load_checkpoint
from meshserve.serving.proto import meshserve_pb2 as pb
from tests.engine_fixtures import assert_idle, make_engine
from tests.serving_fixtures import (  # noqa: F401
    SERVING_FLAGS,
    ServeProcess,
    demo_ckpt,
    demo_model,
    request,
    stub_for,
)


def test_default_programs_are_few_and_every_step_fits_one():
    cfg = EngineConfig()
    programs = cfg.programs()
    mixed = [(t, s) for decode, t, s in programs if not decode]
    decode = [s for d, _, s in programs if d]
    assert mixed == [(16, 8), (16, 16), (32, 8), (32, 32), (64, 8), (64, 64), (128, 8),
                     (128, 64), (256, 8), (256, 64), (512, 8), (512, 64)]
    assert decode == [1, 2, 4, 8, 16, 32, 64]
    assert len(programs) == 19  # the full cross product of buckets was 46
    for tokens in range(1, cfg.max_step_tokens + 1):  # every mixed step has a program
        for seqs in (1, 2, 7, 8, 9, min(tokens, cfg.max_seqs)):
            if seqs > tokens:
                continue
            t = min(b for b in cfg.token_buckets() if b >= tokens)
            assert any(s >= seqs for s in cfg.mixed_seq_buckets(t))


def test_no_compiles_after_warmup_with_the_default_buckets(checkpoint_dir):
    cfg = EngineConfig(max_model_len=256)  # every bucket as `meshserve serve` uses them
    engine = make_engine(checkpoint_dir("llama"), "", cfg)
    warm = engine.warmup()
    assert warm == len(cfg.programs())
    rng = random.Random(1)
    handles = []
    for step in range(80):
        # bursts of up to 12 arrivals: mixed steps of few and of many sequences, decode
        # batches past 8 and 16 rows, chunked prefills of prompts up to 200 tokens
        for _ in range(rng.choice([0, 0, 1, 3, 12])):
            params = SamplingParams(max_tokens=rng.randint(1, 24),
                                    temperature=rng.choice([0.0, 0.7]), seed=step,
                                    logprobs=rng.choice([0, 2]))
            prompt = [rng.randint(3, 250) for _ in range(rng.randint(1, 200))]
            handles.append(engine.add_request(prompt, params))
        engine.step()
    while engine.step():
        pass
    assert all(list(h)[-1].finished for h in handles)
    assert engine.compiles == warm and engine.stats().compiles_after_warmup == 0
    assert_idle(engine)


def test_kv_pool_is_sized_to_use_unless_memory_is_shorter(checkpoint_dir):
    model = load_checkpoint(checkpoint_dir("llama"), make_mesh(parse_layout("")))
    cfg = EngineConfig(max_seqs=8)
    pool = plan_num_pages(model, cfg, 300)  # 300 tokens: 19 pages of 16
    assert (pool.pages, pool.use_pages, pool.chosen_by) == (8 * 19, 8 * 19, "use")
    assert pool.budget_pages > pool.pages
    assert pool.bytes_per_device == pool.pages * pool.page_bytes
    assert "chosen by use" in pool.describe() and str(pool.budget_pages) in pool.describe()

    # A device with room for fewer pages than max_seqs full sequences: memory wins.
    tight = dataclasses.replace(cfg, max_kv_memory_bytes=40 * pool.page_bytes)
    pool = plan_num_pages(model, tight, 300)
    assert (pool.pages, pool.chosen_by) == (40, "memory") and pool.use_pages == 8 * 19

    pool = plan_num_pages(model, dataclasses.replace(cfg, num_pages=33), 300)
    assert (pool.pages, pool.chosen_by) == (33, "config")
    with pytest.raises(ValueError, match="needs 19"):
        plan_num_pages(model, dataclasses.replace(cfg, max_kv_memory_bytes=10 * 4096), 300)


def _startup(target: str) -> pb.StartupInfo:
    channel, stub = stub_for(target)
    with channel:
        return stub.GetServerInfo(pb.GetServerInfoRequest()).startup


def test_second_start_loads_every_program_from_the_cache(demo_ckpt, tmp_path):  # noqa: F811
    flags = ("--checkpoint", demo_ckpt, "--cpu-devices", "1", "--max-seqs", "4",
             "--max-step-tokens", "32", "--max-model-len", "128", "--decode-steps", "4",
             "--compilation-cache-dir", str(tmp_path / "xla"))
    ready = health_pb2.HealthCheckRequest(service="meshserve.v1.MeshServe")
    live = health_pb2.HealthCheckRequest(service="")
    first = ServeProcess(*flags, wait_ready=False)
    try:
        channel = grpc.insecure_channel(first.target)
        health = health_pb2_grpc.HealthStub(channel)
        saw_warming = False
        while not first.ready.is_set():  # liveness SERVING while readiness waits
            assert health.Check(live).status == health_pb2.HealthCheckResponse.SERVING
            if health.Check(ready).status == health_pb2.HealthCheckResponse.NOT_SERVING:
                saw_warming = saw_warming or not first.ready.is_set()
            time.sleep(0.05)
        assert saw_warming
        deadline = time.monotonic() + 30
        while health.Check(ready).status != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        cold = _startup(first.target)
        channel.close()
    finally:
        first.kill()
    assert cold.ready and cold.programs >= 5 and cold.programs_from_cache == 0
    assert cold.ready_seconds >= cold.load_seconds + cold.warmup_seconds > 0

    second = ServeProcess(*flags)
    try:
        warm = _startup(second.target)
        channel, stub = stub_for(second.target)
        with channel:
            out = list(stub.Generate(request(token_ids=[1, 5, 9], max_tokens=6,
                                             ignore_eos=True)))
        assert sum(len(r.token_ids) for r in out) == 6
        assert _startup(second.target).compiles_after_ready == 0
    finally:
        second.kill()
    assert warm.programs == cold.programs and warm.programs_from_cache == warm.programs
    assert '"event": "warmup_progress"' in second.log and '"from_cache"' in second.log


def test_second_slice_of_a_layout_loads_the_first_slices_programs(
        demo_ckpt, demo_model, tmp_path):  # noqa: F811
    """Two tensor=2 slices on devices 0-1 and 2-3, cold cache: slice 1 compiles, slice 2
    loads every one of those programs for its own devices, and both answer correctly."""
    server = ServeProcess(*SERVING_FLAGS, "--cpu-devices", "4", "--checkpoint", demo_ckpt,
                          "--slices", "2", "--mesh", "tensor=2",
                          "--compilation-cache-dir", str(tmp_path / "xla"))
    try:
        startup = _startup(server.target)
        prompts = [[1, 100 + i, 200 + i, 300 + i] for i in range(12)]
        channel, stub = stub_for(server.target)

        def one(ids):
            rs = list(stub.Generate(request(token_ids=ids, max_tokens=10, ignore_eos=True)))
            return [t for r in rs for t in r.token_ids], rs[-1].slice

        with channel, concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            results = list(pool.map(one, prompts))
    finally:
        server.kill()
    assert startup.programs >= 8 and startup.programs_from_cache * 2 == startup.programs
    reference = demo_model.slices[0].engine  # one device, the same buckets
    greedy = SamplingParams(max_tokens=10, ignore_eos=True)
    for ids, (tokens, _) in zip(prompts, results, strict=True):
        assert tokens == [t for c in reference.add_request(ids, greedy) for t in c.token_ids]
    used = [slice_ for _, slice_ in results]
    assert used.count(0) >= 3 and used.count(1) >= 3, used
