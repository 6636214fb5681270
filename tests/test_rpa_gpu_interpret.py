"""GPU (Triton) ragged paged attention kernel in interpret mode (CPU) against the reference.

Values the kernel must not read are NaN (unused pages, unwritten slots, padding tokens,
unused page-table entries), so a stray read shows up as NaN. Pages must match the reference
bit for bit.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from meshserve.pallas_kernels.ragged_paged_attention import (
    ragged_paged_attention,
    ragged_paged_attention_gpu,
    ragged_paged_attention_reference,
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
        [(1, 37), (1, 5), (1, 64), (1, 16), (1, 17), (1, 1)], 8, 8, (8, 2), 64, 16, p=2
    ),
    "decode_gqa8_ps32_default_blocks": case(
        [(1, 100), (1, 31), (1, 32), (1, 33)], 4, 6, (16, 2), 64, 32
    ),
    "prefill_mha_ps32": case([(20, 20), (45, 45), (3, 3)], 72, 4, (4, 4), 64, 32, q=16, p=1),
    "mixed_gqa8_ps16": case(
        [(1, 40), (16, 16), (1, 7), (9, 30), (0, 12), (3, 3)], 40, 8, (8, 1), 64, 16, q=4, p=2
    ),
    "mixed_gqa4_ps16_default_blocks": case([(1, 90), (20, 20), (4, 35)], 32, 4, (8, 2), 64, 16),
    "chunked_gqa4_ps32": case([(24, 90), (8, 50), (1, 33)], 40, 4, (8, 2), 64, 32, q=4, p=2),
    "window_mixed_gqa4_ps16": case(
        [(30, 70), (1, 50), (12, 12), (1, 3)], 48, 4, (8, 2), 64, 16, q=8, p=1, sliding_window=20
    ),
    "softcap_mixed_gqa1_ps32": case(
        [(1, 80), (21, 21), (5, 40)], 32, 4, (2, 2), 128, 32, q=16, p=2, soft_cap=4.0, sm_scale=0.2
    ),
}


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


@pytest.mark.parametrize("name", sorted(CASES))
def test_gpu_kernel_matches_reference_f32(name):
    *_, options, blocks = CASES[name]
    batch = make_batch(name, seed=1)
    out, pages = ragged_paged_attention_gpu(*batch.args(), interpret=True, **options, **blocks)
    check_against_reference(batch, out, pages, F32_ATOL, **options)


@pytest.mark.parametrize("seed", [21, 22, 23])
def test_gpu_kernel_random_batches(seed):
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(int(rng.integers(2, 11))):
        kv = int(rng.integers(1, 120))
        kind = rng.choice(["decode", "prefill", "chunk"])
        q = 1 if kind == "decode" else kv if kind == "prefill" else int(rng.integers(1, kv + 1))
        seqs.append((min(q, 32), kv))
    total = sum(q for q, _ in seqs)
    options = {"sliding_window": 33} if seed % 2 else {"soft_cap": 5.0}
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
    out, pages = ragged_paged_attention_gpu(
        *batch.args(),
        interpret=True,
        num_queries_per_block=4,
        num_kv_pages_per_block=2,
        **options,
    )
    check_against_reference(batch, out, pages, F32_ATOL, **options)


def test_gpu_kernel_matches_reference_bf16():
    *_, options, blocks = CASES["mixed_gqa8_ps16"]
    batch = make_batch("mixed_gqa8_ps16", dtype=jnp.bfloat16, seed=2)
    out, pages = ragged_paged_attention_gpu(
        *batch.args(), interpret=True, sliding_window=25, **blocks
    )
    assert out.dtype == jnp.bfloat16 and pages.dtype == jnp.bfloat16
    check_against_reference(batch, out, pages, BF16_ATOL, sliding_window=25)


def test_gpu_kernel_empty_batch_writes_nothing():
    batch = make_batch("decode_gqa4_ps16")
    out, pages = ragged_paged_attention_gpu(
        *batch.args()[:-1], jnp.zeros((1,), jnp.int32), interpret=True
    )
    assert not np.asarray(out).any()
    np.testing.assert_array_equal(_bits(pages), _bits(batch.kv_pages))


def test_dispatch_runs_gpu_kernel_in_interpret_mode():
    *_, options, blocks = CASES["chunked_gqa4_ps32"]
    batch = make_batch("chunked_gqa4_ps32", seed=4)
    out, pages = ragged_paged_attention(
        *batch.args(), impl="gpu", interpret=True, gpu_options=blocks, soft_cap=7.0
    )
    check_against_reference(batch, out, pages, F32_ATOL, soft_cap=7.0)


# Context parallelism: page p of the table on part p % ways; each case has sequences with
# fewer pages than parts (a "no contribution" partial for some rows).
SPLIT_CASES = [("mixed_gqa8_ps16", 3), ("window_mixed_gqa4_ps16", 2),
               ("decode_gqa8_ps32_default_blocks", 4)]


@pytest.mark.parametrize("name,ways", SPLIT_CASES)
def test_gpu_kernel_page_mask_partials_merge_to_the_reference(name, ways):
    *_, options, blocks = CASES[name]
    batch = make_batch(name, seed=5)

    def run(page_mask):
        return ragged_paged_attention_gpu(*batch.args(), interpret=True, page_mask=page_mask,
                                          return_lse=True, **options, **blocks)

    check_partials(batch, run, F32_ATOL, ways, **options)


def test_dispatch_runs_gpu_kernel_lse_path_bf16():
    *_, options, blocks = CASES["softcap_mixed_gqa1_ps32"]
    batch = make_batch("softcap_mixed_gqa1_ps32", dtype=jnp.bfloat16, seed=6)

    def run(page_mask):
        return ragged_paged_attention(*batch.args(), impl="gpu-interpret", gpu_options=blocks,
                                      page_mask=page_mask, return_lse=True, **options)

    check_partials(batch, run, BF16_ATOL, 2, **options)


def test_gpu_kernel_lowers_to_triton():
    # Pallas -> Triton IR lowering only; compiling that IR needs a GPU.
    for dtype in (jnp.float32, jnp.bfloat16):
        for tokens in (8, 64):  # decode-shaped and prefill-shaped buckets
            batch = random_ragged_batch(
                [(5, 20), (1, 33)],
                num_q_heads=32,
                num_kv_heads=8,
                head_dim=128,
                page_size=16,
                num_tokens=tokens,
                max_seqs=8,
                pages_per_seq=16,
                dtype=dtype,
            )
            for lse in (False, True):  # the context-parallel path too
                lowered = ragged_paged_attention_gpu.trace(
                    *batch.args(), sliding_window=64, soft_cap=30.0, return_lse=lse
                ).lower(lowering_platforms=("cuda",))
                assert "triton" in lowered.as_text()


def test_gpu_kernel_refuses_shapes_triton_cannot_tile():
    batch = random_ragged_batch(
        [(3, 9)],
        num_q_heads=4,
        num_kv_heads=2,
        head_dim=24,
        page_size=16,
        num_tokens=8,
    )
    with pytest.raises(ValueError, match="head_dim=24 is not a power of two"):
        ragged_paged_attention_gpu.trace(*batch.args()).lower(lowering_platforms=("cuda",))
