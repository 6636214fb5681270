"""TPU ragged paged attention kernel in TPU interpret mode (CPU) against the reference.

Every value the kernel must not read is NaN (unused pages, unwritten slots, padding tokens,
unused page-table entries), and the interpreter raises on out-of-bounds reads, so a stray read
shows up as NaN or an error. Pages must match the reference bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpreter
from jax.experimental.pallas import tpu as pltpu

from meshserve.pallas_kernels.ragged_paged_attention import (
    choose_block_sizes,
    ragged_paged_attention,
    ragged_paged_attention_reference,
    ragged_paged_attention_tpu,
    vmem_footprint,
)
from meshserve.pallas_kernels.ragged_paged_attention.validation import random_ragged_batch
from tests.rpa_partials import check_partials

F32_ATOL = 1e-5
BF16_ATOL = 2e-2


def case(seqs, tokens, max_seqs, heads, head_dim, page_size, *, q=None, p=None, **options):
    """(seqs, T, max_seqs, Hq, Hkv, D, page_size, attention options, kernel block options).

    seqs are (q_len, kv_len); q / p are queries / kv pages per kernel block (None: default).
    """
    blocks = {"num_queries_per_block": q, "num_kv_pages_per_block": p}
    blocks = {k: v for k, v in blocks.items() if v is not None}
    return (seqs, tokens, max_seqs, *heads, head_dim, page_size, options, blocks)


CASES = {
    "decode_gqa4_ps16": case(
        [(1, 37), (1, 5), (1, 64), (1, 16), (1, 17), (1, 1)], 8, 8, (8, 2), 64, 16, q=4, p=2
    ),
    "prefill_mha_ps32": case([(20, 20), (45, 45), (3, 3)], 72, 4, (4, 4), 64, 32, q=16, p=1),
    "mixed_gqa8_ps16": case(
        [(1, 40), (16, 16), (1, 7), (9, 30), (0, 12), (3, 3)], 40, 8, (8, 1), 64, 16, q=8, p=2
    ),
    "chunked_gqa4_ps32": case([(24, 90), (8, 50), (1, 33)], 40, 4, (8, 2), 64, 32, q=8, p=2),
    "window_mixed_gqa4_ps16": case(
        [(30, 70), (1, 50), (12, 12), (1, 3)], 48, 4, (8, 2), 64, 16, q=8, p=1, sliding_window=20
    ),
    "softcap_mixed_gqa1_ps32": case(
        [(1, 80), (21, 21), (5, 40)], 32, 4, (2, 2), 128, 32, q=8, p=2, soft_cap=4.0, sm_scale=0.2
    ),
    "default_blocks_mixed_gqa4_ps16": case(
        [(1, 90), (20, 20), (4, 35)], 32, 4, (8, 2), 64, 16, sliding_window=50, soft_cap=30.0
    ),
}


@pytest.fixture(autouse=True)
def _fresh_interpreter_state():
    # A kernel that raises inside the interpreter leaves its simulated memory behind, which
    # would break every later test in this process.
    yield
    pltpu.reset_tpu_interpret_mode_state()


def make_batch(name, dtype=jnp.float32, seed=0):
    seqs, tokens, max_seqs, hq, hkv, d, ps, _, _ = CASES[name]
    need = max(-(-kv // ps) for _, kv in seqs)
    return random_ragged_batch(
        seqs,
        num_q_heads=hq,
        num_kv_heads=hkv,
        head_dim=d,
        page_size=ps,
        num_tokens=tokens,
        max_seqs=max_seqs,
        pages_per_seq=need + 1,
        dtype=dtype,
        seed=seed,
    )


def _bits(x):
    # Bitwise: exact for every dtype, and NaN-filled pages compare equal to themselves.
    x = np.asarray(x)
    return x.view(f"u{x.dtype.itemsize}")


def check_against_reference(batch, out, pages, atol, **options):
    want_out, want_pages = ragged_paged_attention_reference(*batch.args(), **options)
    out = np.asarray(out, np.float32)
    assert out.shape == batch.q.shape
    assert np.isfinite(out).all(), "NaN in the output: the kernel read memory it must not"
    np.testing.assert_allclose(out, np.asarray(want_out, np.float32), atol=atol, rtol=atol)
    assert not out[sum(batch.q_lens) :].any(), "padding rows must be zero"
    np.testing.assert_array_equal(_bits(pages), _bits(want_pages))
    return float(np.abs(out - np.asarray(want_out, np.float32)).max())


@pytest.mark.parametrize("name", sorted(CASES))
def test_tpu_kernel_matches_reference_f32(name):
    *_, options, blocks = CASES[name]
    batch = make_batch(name, seed=1)
    out, pages = ragged_paged_attention_tpu(
        *batch.args(), interpret=pltpu.InterpretParams(), **options, **blocks
    )
    check_against_reference(batch, out, pages, F32_ATOL, **options)


def random_seqs(seed, max_seqs=10, max_kv=120):
    """A random mix of decode, prefill and chunked-prefill sequences."""
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(int(rng.integers(2, max_seqs + 1))):
        kv = int(rng.integers(1, max_kv))
        kind = rng.choice(["decode", "prefill", "chunk"])
        q = 1 if kind == "decode" else kv if kind == "prefill" else int(rng.integers(1, kv + 1))
        seqs.append((min(q, 32), kv))
    return seqs


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_tpu_kernel_random_batches(seed):
    seqs = random_seqs(seed)
    total = sum(q for q, _ in seqs)
    options = {"sliding_window": 33} if seed % 2 else {}
    batch = random_ragged_batch(
        seqs,
        num_q_heads=8,
        num_kv_heads=2,
        head_dim=64,
        page_size=16 << (seed % 2),
        num_tokens=-(-(total + 3) // 8) * 8,
        max_seqs=len(seqs) + 2,
        pages_per_seq=8,
        seed=seed,
    )
    out, pages = ragged_paged_attention_tpu(
        *batch.args(),
        interpret=pltpu.InterpretParams(),
        num_queries_per_block=8,
        num_kv_pages_per_block=2,
        **options,
    )
    check_against_reference(batch, out, pages, F32_ATOL, **options)


def test_tpu_kernel_matches_reference_bf16():
    *_, options, blocks = CASES["mixed_gqa8_ps16"]
    batch = make_batch("mixed_gqa8_ps16", dtype=jnp.bfloat16, seed=2)
    out, pages = ragged_paged_attention_tpu(
        *batch.args(), interpret=pltpu.InterpretParams(), soft_cap=10.0, **blocks
    )
    assert out.dtype == jnp.bfloat16 and pages.dtype == jnp.bfloat16
    check_against_reference(batch, out, pages, BF16_ATOL, soft_cap=10.0)


@pytest.mark.parametrize("num_cores", [1, 2])
def test_tpu_kernel_has_no_races(num_cores):
    # Two kv-head blocks: with two cores the 'parallel' head dimension really runs
    # concurrently, and the detector checks the cache write -> page read ordering too.
    batch = random_ragged_batch(
        [(9, 20), (1, 33), (6, 6), (1, 17)],
        num_q_heads=16,
        num_kv_heads=8,
        head_dim=32,
        page_size=16,
        num_tokens=24,
        max_seqs=4,
        pages_per_seq=3,
        seed=3,
    )
    params = pltpu.InterpretParams(
        detect_races=True, num_cores_or_threads=num_cores, random_seed=num_cores
    )
    out, pages = ragged_paged_attention_tpu(
        *batch.args(),
        interpret=params,
        sliding_window=12,
        num_queries_per_block=8,
        num_kv_pages_per_block=1,
        num_kv_heads_per_block=4,
    )
    jax.block_until_ready((out, pages))
    assert tpu_interpreter.races is not None, "race detector did not run"
    assert not tpu_interpreter.races.races_found
    check_against_reference(batch, out, pages, F32_ATOL, sliding_window=12)


def test_tpu_kernel_empty_batch_writes_nothing():
    batch = make_batch("decode_gqa4_ps16")
    out, pages = ragged_paged_attention_tpu(
        *batch.args()[:-1], jnp.zeros((1,), jnp.int32), interpret=pltpu.InterpretParams()
    )
    assert not np.asarray(out).any()
    np.testing.assert_array_equal(_bits(pages), _bits(batch.kv_pages))


def test_dispatch_runs_tpu_kernel_in_interpret_mode():
    *_, options, blocks = CASES["chunked_gqa4_ps32"]
    batch = make_batch("chunked_gqa4_ps32", seed=4)
    out, pages = ragged_paged_attention(
        *batch.args(), impl="tpu", interpret=True, tpu_options=blocks, **options
    )
    check_against_reference(batch, out, pages, F32_ATOL, **options)


def test_tpu_kernel_lowers_to_mosaic():
    # Pallas -> Mosaic lowering only; Mosaic's own compiler (libtpu) is not available on CPU.
    # This is the only check of the Mosaic branch of the K/V read (strided loads through a
    # reshaped ref, u32 bitcast refs for 16-bit): the interpreter runs the value-level twin.
    # (dtype, kv heads, kv heads per block): all heads, two head blocks of full tiles, and a
    # device with a single kv head.
    for dtype, num_kv_heads, per_block in (
        (jnp.float32, 8, None), (jnp.float32, 8, 4), (jnp.bfloat16, 8, None),
        (jnp.bfloat16, 16, 8), (jnp.float16, 16, 8), (jnp.bfloat16, 1, None),
    ):
        batch = random_ragged_batch(
            [(5, 20), (1, 33), (40, 40)],
            num_q_heads=max(16, num_kv_heads),
            num_kv_heads=num_kv_heads,
            head_dim=128,
            page_size=16,
            num_tokens=64,
            max_seqs=8,
            pages_per_seq=16,
            dtype=dtype,
        )
        for lse in (False, True):  # the context-parallel path too
            lowered = ragged_paged_attention_tpu.trace(
                *batch.args(), sliding_window=64, soft_cap=30.0, return_lse=lse,
                num_kv_heads_per_block=per_block,
            ).lower(lowering_platforms=("tpu",))
            assert "tpu_custom_call" in lowered.as_text()


def test_block_sizes_shrink_to_fit_vmem_and_refuse_explicit_overflow():
    shape = dict(
        num_tokens=2048,
        num_kv_heads=8,
        group=4,
        head_dim=128,
        page_size=16,
        pages_per_seq=128,
        q_dtype=jnp.bfloat16,
        kv_dtype=jnp.bfloat16,
    )
    roomy = choose_block_sizes(**shape, vmem_limit_bytes=64 << 20)
    assert (roomy.num_kv_pages_per_block, roomy.num_queries_per_block) == (32, 32)
    assert roomy.num_kv_heads_per_block == 8 and roomy.vmem_bytes <= 64 << 20
    tight = choose_block_sizes(**shape, vmem_limit_bytes=4 << 20)
    assert tight.vmem_bytes <= 4 << 20
    assert tight.num_kv_pages_per_block < roomy.num_kv_pages_per_block
    assert tight.vmem_bytes == vmem_footprint(
        block_q=tight.num_queries_per_block,
        pages_per_block=tight.num_kv_pages_per_block,
        kv_heads_per_block=tight.num_kv_heads_per_block,
        group=4,
        head_dim=128,
        page_size=16,
        q_dtype=jnp.bfloat16,
        kv_dtype=jnp.bfloat16,
    )
    with pytest.raises(ValueError, match="VMEM"):
        choose_block_sizes(
            **shape,
            vmem_limit_bytes=1 << 20,
            num_kv_pages_per_block=64,
            num_queries_per_block=256,
            num_kv_heads_per_block=8,
        )
    with pytest.raises(ValueError, match="cannot fit VMEM"):
        choose_block_sizes(**shape, vmem_limit_bytes=64 << 10)
    with pytest.raises(ValueError, match="num_kv_heads_per_block"):
        choose_block_sizes(**shape, num_kv_heads_per_block=3)


# Context parallelism: page p of the table on part p % ways. "mixed" has 1-page sequences,
# so with 3 ways some parts hold none of a sequence's pages (a "no contribution" partial).
SPLIT_CASES = [("mixed_gqa8_ps16", 3), ("window_mixed_gqa4_ps16", 2), ("decode_gqa4_ps16", 4)]


@pytest.mark.parametrize("name,ways", SPLIT_CASES)
def test_tpu_kernel_page_mask_partials_merge_to_the_reference(name, ways):
    *_, options, blocks = CASES[name]
    batch = make_batch(name, seed=5)

    def run(page_mask):
        return ragged_paged_attention_tpu(*batch.args(), interpret=pltpu.InterpretParams(),
                                          page_mask=page_mask, return_lse=True, **options,
                                          **blocks)

    check_partials(batch, run, F32_ATOL, ways, **options)


def test_tpu_kernel_page_mask_path_has_no_races():
    """Two cores on the parallel head dimension, the fused write skipping other devices'
    pages and the reads walking the held-page lists."""
    batch = random_ragged_batch(
        [(9, 40), (1, 33), (6, 6), (1, 17)], num_q_heads=16, num_kv_heads=8, head_dim=32,
        page_size=8, num_tokens=24, max_seqs=4, pages_per_seq=6, seed=7,
    )
    races = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2, random_seed=2)

    def run(page_mask, params=None):
        return ragged_paged_attention_tpu(
            *batch.args(), interpret=params or pltpu.InterpretParams(), page_mask=page_mask,
            return_lse=True,
            sliding_window=20, num_queries_per_block=8, num_kv_pages_per_block=2,
            num_kv_heads_per_block=4,
        )

    jax.block_until_ready(run(batch.args()[5] % 2 == 1, races))
    assert tpu_interpreter.races is not None and not tpu_interpreter.races.races_found
    check_partials(batch, run, F32_ATOL, 2, sliding_window=20)


def test_dispatch_runs_tpu_kernel_lse_path_bf16():
    *_, options, blocks = CASES["chunked_gqa4_ps32"]
    batch = make_batch("chunked_gqa4_ps32", dtype=jnp.bfloat16, seed=6)

    def run(page_mask):
        return ragged_paged_attention(*batch.args(), impl="tpu-interpret", tpu_options=blocks,
                                      page_mask=page_mask, return_lse=True, **options)

    check_partials(batch, run, BF16_ATOL, 2, **options)
    with pytest.raises(ValueError, match="needs return_lse"):
        ragged_paged_attention(*batch.args(), impl="tpu-interpret",
                               page_mask=batch.args()[5] >= 0)


# The fused cache write sends each run of a pair's new tokens on one page as one DMA per set
# bit of its length. Page size 12 (runs split 8 + 4, 8 + 2 + 1, ...) and chunks starting
# mid-page, crossing several pages, and split over query blocks (q=8) cover runs of every
# length, full pages and partial ones at both ends; the pages compare bit for bit, so a
# missing, doubled or misplaced row shows (unwritten slots are NaN).
@pytest.mark.parametrize("page_size", [8, 12])
def test_tpu_kernel_batched_kv_writes_cross_pages(page_size):
    batch = random_ragged_batch(
        [(21, 26), (1, 9), (13, 13), (7, 31)], num_q_heads=4, num_kv_heads=2, head_dim=32,
        page_size=page_size, num_tokens=48, max_seqs=5, pages_per_seq=5, seed=8,
    )
    out, pages = ragged_paged_attention_tpu(
        *batch.args(), interpret=pltpu.InterpretParams(), num_queries_per_block=8,
        num_kv_pages_per_block=2,
    )
    check_against_reference(batch, out, pages, F32_ATOL)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_tpu_kernel_16bit_heads_per_block_packing(dtype):
    """16 kv heads, 8 per block: two head blocks whose 16 interleaved channels fill one
    16-bit sublane tile, read as u32 (K, V) pairs and split (the path Mosaic gets too)."""
    batch = random_ragged_batch(
        [(6, 19), (1, 12), (3, 3)], num_q_heads=16, num_kv_heads=16, head_dim=32,
        page_size=8, num_tokens=16, max_seqs=3, pages_per_seq=3, dtype=dtype, seed=9,
    )
    out, pages = ragged_paged_attention_tpu(
        *batch.args(), interpret=pltpu.InterpretParams(), num_queries_per_block=8,
        num_kv_pages_per_block=2, num_kv_heads_per_block=8,
    )
    assert out.dtype == dtype
    check_against_reference(batch, out, pages, BF16_ATOL)


def test_block_size_rule_fills_tiles():
    shape = dict(num_tokens=256, group=4, head_dim=128, page_size=16, pages_per_seq=64)

    def heads(num_kv_heads, dtype, limit):
        return choose_block_sizes(**shape, num_kv_heads=num_kv_heads, q_dtype=dtype,
                                  kv_dtype=dtype, vmem_limit_bytes=limit).num_kv_heads_per_block

    # Roomy VMEM: every head in one block. Tight: the smallest block whose channels still
    # fill whole tiles (8 rows of f32, 16 of bf16), never one that pads.
    assert heads(16, jnp.float32, 64 << 20) == heads(16, jnp.bfloat16, 64 << 20) == 16
    assert heads(16, jnp.float32, 3 << 20) == 4
    assert heads(16, jnp.bfloat16, 3 << 20) == 8
    # A device with one kv head (tensor = kv heads): no divisor fills a tile; all heads.
    assert heads(1, jnp.bfloat16, 64 << 20) == 1
    with pytest.raises(ValueError, match="multiple of 8"):
        choose_block_sizes(**shape, num_kv_heads=16, q_dtype=jnp.bfloat16,
                           kv_dtype=jnp.bfloat16, num_kv_heads_per_block=4)
    # Keys per block by head dim: 512 up to 128 lanes, fewer for wider heads.
    rule = choose_block_sizes(**{**shape, "head_dim": 256}, num_kv_heads=2,
                              q_dtype=jnp.float32, kv_dtype=jnp.float32,
                              vmem_limit_bytes=64 << 20)
    assert rule.num_kv_pages_per_block * 16 == 256
