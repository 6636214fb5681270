"""The GPU kernel's decode paths in interpret mode (CPU): split-KV (flash-decoding) with its
log-sum-exp merge, and query tiles holding the query heads of one kv group.

Everything the kernel must not read is NaN (see ``random_ragged_batch``), so a split that
strays outside its range, or a tile row that is not a real query, shows up as NaN.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from meshserve.pallas_kernels.ragged_paged_attention import (
    gpu_block_sizes,
    gpu_kernel,
    ragged_paged_attention,
    ragged_paged_attention_gpu,
)
from meshserve.pallas_kernels.ragged_paged_attention.validation import random_ragged_batch
from tests.rpa_partials import check_partials
from tests.test_rpa_gpu_interpret import BF16_ATOL, F32_ATOL, check_against_reference

# Decode buckets (tokens <= max_seqs) with contexts of 1..10 kv blocks over 4 splits: long
# sequences use every split, short ones leave splits empty. A 3-token chunk rides along in
# one of them (a decode bucket may hold one), and padding tokens fill the bucket.
DECODE = [(1, 150), (1, 7), (1, 64), (1, 1), (1, 97)]
GQA_CASES = {
    "gqa1": ((2, 2), DECODE, {}),
    "gqa2_window": ((4, 2), DECODE, {"sliding_window": 40}),
    "gqa4_chunk": ((8, 2), [(1, 150), (3, 40), (1, 17), (1, 129)], {}),
    "gqa8_softcap": ((8, 1), DECODE, {"soft_cap": 6.0}),
}
BLOCKS = {"num_kv_pages_per_block": 1, "num_kv_splits": 4}


def decode_batch(heads, seqs, dtype=jnp.float32, seed=0, head_dim=32, pages_per_seq=12):
    return random_ragged_batch(
        seqs, num_q_heads=heads[0], num_kv_heads=heads[1], head_dim=head_dim, page_size=16,
        num_tokens=8, max_seqs=8, pages_per_seq=pages_per_seq, dtype=dtype, seed=seed,
    )


@pytest.mark.parametrize("name", sorted(GQA_CASES))
def test_split_kv_decode_matches_reference_f32(name):
    heads, seqs, options = GQA_CASES[name]
    batch = decode_batch(heads, seqs, seed=11)
    out, pages = ragged_paged_attention_gpu(*batch.args(), interpret=True, **options, **BLOCKS)
    check_against_reference(batch, out, pages, F32_ATOL, **options)


def test_split_kv_decode_matches_reference_bf16():
    batch = decode_batch((8, 2), DECODE, dtype=jnp.bfloat16, seed=12)
    out, pages = ragged_paged_attention(*batch.args(), impl="gpu-interpret", gpu_options=BLOCKS)
    assert out.dtype == jnp.bfloat16
    check_against_reference(batch, out, pages, BF16_ATOL)


def test_default_rule_splits_a_long_decode():
    # 34 pages of 16 = 9 blocks of 64 keys: the rule's 256-key floor allows 2 splits.
    batch = decode_batch((4, 2), [(1, 530), (1, 20), (1, 300)], seed=13, pages_per_seq=34)
    blocks = gpu_block_sizes.choose_gpu_blocks(
        num_tokens=8, max_seqs=8, num_kv_heads=2, group=2, page_size=16, pages_per_seq=34)
    assert blocks.kv_splits == 2 and blocks.block_q == 1 and blocks.tile_rows == 16
    out, pages = ragged_paged_attention_gpu(*batch.args(), interpret=True)
    check_against_reference(batch, out, pages, F32_ATOL)


def test_split_kv_with_page_mask_partials_merge_to_the_reference():
    # Context parallelism on top of the splits: every part splits its owned-page list.
    batch = decode_batch((8, 2), DECODE, seed=14)

    def run(page_mask):
        return ragged_paged_attention_gpu(*batch.args(), interpret=True, page_mask=page_mask,
                                          return_lse=True, **BLOCKS)

    check_partials(batch, run, F32_ATOL, 2)


def test_split_rule():
    def splits(batch, context, kv_heads=8, page_size=16):
        return gpu_block_sizes.choose_gpu_blocks(
            num_tokens=batch, max_seqs=batch, num_kv_heads=kv_heads, group=4,
            page_size=page_size, pages_per_seq=context // page_size).kv_splits

    # Fewer programs than the target: more splits, up to the cap and the 256-key floor.
    assert splits(64, 8192) == 2 and splits(8, 8192) == gpu_block_sizes.MAX_KV_SPLITS
    assert splits(8, 1024) == 4 and splits(1, 256) == 1
    assert splits(256, 8192) == 1  # 2048 programs already
    prefill = gpu_block_sizes.choose_gpu_blocks(
        num_tokens=512, max_seqs=8, num_kv_heads=8, group=4, page_size=16, pages_per_seq=512)
    assert prefill.kv_splits == 1 and prefill.tile_rows == 64
    with pytest.raises(ValueError, match="kv splits=0"):
        gpu_block_sizes.choose_gpu_blocks(num_tokens=8, max_seqs=8, num_kv_heads=1, group=1,
                                          page_size=16, pages_per_seq=4, num_kv_splits=0)


@pytest.mark.parametrize("group", [1, 2, 4, 8, 32])
def test_decode_tile_is_one_tokens_group(group):
    hkv, tokens, d = 2, 3, 16
    q = jnp.arange(tokens * hkv * group * d, dtype=jnp.float32).reshape(tokens, hkv * group, d)
    rows = max(16, group)
    tiles = np.asarray(gpu_kernel._tile_queries(q, hkv, tokens, 1, rows))
    assert tiles.shape == (hkv, tokens * rows, d)
    for t in range(tokens):
        for h in range(hkv):
            tile = tiles[h, t * rows:(t + 1) * rows]
            np.testing.assert_array_equal(tile[:group], q[t, h * group:(h + 1) * group])
            assert not tile[group:].any(), "rows past the group are zero fill"
    back = gpu_kernel._untile(jnp.asarray(tiles)[None], tokens, group, 1, rows)[0]
    np.testing.assert_array_equal(back, q)


def test_split_decode_lowers_to_triton():
    # Pallas -> Triton IR only (compiling it needs a GPU), at the rule's own split count.
    batch = random_ragged_batch([(1, 900), (1, 33)], num_q_heads=32, num_kv_heads=8,
                                head_dim=128, page_size=16, num_tokens=8, max_seqs=8,
                                pages_per_seq=64, dtype=jnp.bfloat16)
    assert gpu_block_sizes.choose_gpu_blocks(
        num_tokens=8, max_seqs=8, num_kv_heads=8, group=4, page_size=16,
        pages_per_seq=64).kv_splits == 4
    for lse in (False, True):
        lowered = ragged_paged_attention_gpu.trace(
            *batch.args(), sliding_window=512, return_lse=lse
        ).lower(lowering_platforms=("cuda",))
        assert "triton" in lowered.as_text()
