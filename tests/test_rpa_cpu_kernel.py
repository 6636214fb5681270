"""The C++ ragged paged attention kernel for XLA:CPU against the pure-JAX reference.

Same batches as the Pallas kernel tests: every value the kernel must not read is NaN, so a
stray read shows up in the output; pages must match the reference bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meshserve.pallas_kernels.ragged_paged_attention import (
    cpu_kernel,
    ragged_paged_attention,
    ragged_paged_attention_reference,
    resolve_impl,
)
from meshserve.pallas_kernels.ragged_paged_attention.dispatch import IMPL_ENV_VAR
from meshserve.pallas_kernels.ragged_paged_attention.validation import random_ragged_batch
from tests.rpa_partials import check_partials
from tests.test_rpa_gpu_interpret import CASES, F32_ATOL, check_against_reference, make_batch

run = jax.jit(
    cpu_kernel.ragged_paged_attention_cpu,
    static_argnames=("sm_scale", "sliding_window", "soft_cap", "return_lse"),
)


def test_kernel_builds_and_is_the_cpu_default(monkeypatch):
    cpu_kernel.load()  # raises with the compiler's output if the build fails
    monkeypatch.delenv(IMPL_ENV_VAR, raising=False)
    assert resolve_impl() == "cpu"


@pytest.mark.parametrize("name", sorted(CASES))
def test_cpu_kernel_matches_reference(name):
    *_, options, _ = CASES[name]
    batch = make_batch(name, seed=5)
    out, pages = run(*batch.args(), **options)
    check_against_reference(batch, out, pages, F32_ATOL, **options)


@pytest.mark.parametrize(
    "heads,head_dim",
    [((12, 4), 64), ((16, 4), 128), ((8, 8), 128), ((24, 2), 64), ((6, 2), 48), ((4, 1), 80)],
    ids=["gqa3_d64", "gqa4_d128", "mha_d128", "gqa12_generic_group",
         "d48_generic_dim", "mqa_d80"],
)
@pytest.mark.parametrize("seed", [31, 32, 33])
def test_cpu_kernel_random_batches(heads, head_dim, seed):
    # Pages of 12 and 8 tokens as well as 16: windows then start, and the kernel's
    # prefetches reach, other offsets within a page and further pages ahead.
    page_size = (16, 12, 8)[seed % 3]
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(int(rng.integers(2, 9))):
        kv = int(rng.integers(1, 150))
        kind = rng.choice(["decode", "prefill", "chunk"])
        q = 1 if kind == "decode" else kv if kind == "prefill" else int(rng.integers(1, kv + 1))
        seqs.append((min(q, 40), kv))
    total = sum(q for q, _ in seqs)
    options = {"sliding_window": 37} if seed % 2 else {"soft_cap": 6.0, "sm_scale": 0.1}
    batch = random_ragged_batch(
        seqs,
        num_q_heads=heads[0],
        num_kv_heads=heads[1],
        head_dim=head_dim,
        page_size=page_size,
        num_tokens=total + 5,
        max_seqs=len(seqs) + 2,
        pages_per_seq=-(-150 // page_size) + 1,
        seed=seed,
    )
    out, pages = run(*batch.args(), **options)
    check_against_reference(batch, out, pages, F32_ATOL, **options)


def test_cpu_kernel_empty_batch_writes_nothing():
    batch = make_batch("decode_gqa4_ps16")
    out, pages = run(*batch.args()[:-1], jnp.zeros((1,), jnp.int32))
    assert not np.asarray(out).any()
    np.testing.assert_array_equal(np.asarray(pages), np.asarray(batch.kv_pages))


def test_cpu_kernel_clamps_corrupt_metadata_instead_of_reading_outside():
    batch = random_ragged_batch(
        [(1, 20), (3, 9)], num_q_heads=4, num_kv_heads=2, head_dim=64, page_size=16,
        num_tokens=8, max_seqs=4, pages_per_seq=4, nan_fill=False,
    )
    q, k, v, pages, kv_lens, table, cu, num_seqs = batch.args()
    bad = [
        (kv_lens, table.at[0, 0].set(10**6), cu, num_seqs),  # page id past the pool
        (kv_lens, table, cu.at[2].set(10**6), num_seqs),  # cu_q_lens past the bucket
        (kv_lens.at[0].set(10**6), table, cu, num_seqs),  # longer than its page table
        (kv_lens, table, cu, jnp.array([99], jnp.int32)),  # more sequences than rows
    ]
    for meta in bad:
        out = cpu_kernel.attention_from_pages(q, pages, *meta)
        assert np.isfinite(np.asarray(out)).all()


def test_cpu_kernel_under_vmap_matches_per_batch_calls():
    a, b = make_batch("mixed_gqa8_ps16", seed=7), make_batch("mixed_gqa8_ps16", seed=8)
    stacked = [jnp.stack([x, y]) for x, y in zip(a.args(), b.args(), strict=True)]
    outs, _ = jax.vmap(cpu_kernel.ragged_paged_attention_cpu)(*stacked)
    for i, batch in enumerate((a, b)):
        want, _ = ragged_paged_attention_reference(*batch.args())
        np.testing.assert_allclose(np.asarray(outs[i]), np.asarray(want), atol=F32_ATOL)


def test_dispatch_falls_back_for_dtypes_the_kernel_does_not_take(monkeypatch):
    monkeypatch.delenv(IMPL_ENV_VAR, raising=False)
    batch = make_batch("mixed_gqa8_ps16", dtype=jnp.bfloat16, seed=3)
    out, _ = ragged_paged_attention(*batch.args())  # auto: the reference takes bf16
    want, _ = ragged_paged_attention_reference(*batch.args())
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(want, np.float32))
    with pytest.raises(ValueError, match="f32"):
        ragged_paged_attention(*batch.args(), impl="cpu")


def test_cpu_kernel_non_finite_inputs_behave_as_the_reference():
    """Built without -ffast-math: NaN and inf in real tokens' q/k/v propagate exactly
    where they do in the reference, and leave every other row as it would be (in
    particular the rows of other sequences that share a block with them)."""
    batch = make_batch("mixed_gqa8_ps16", seed=3)
    q, k, v = (np.array(x) for x in (batch.q, batch.k, batch.v))
    starts = np.concatenate([[0], np.cumsum(batch.q_lens)])
    q[starts[0], 1, 5] = np.nan  # a decode token's query head
    k[starts[1] + 4, 0, 7] = np.inf  # a prefill token's key: later tokens score +-inf
    v[starts[2], 0, 3] = -np.inf  # a decode token's value (no row is masked against it)
    q[starts[5] + 1, :, 0] = np.inf  # every head of one prefill token
    batch.q, batch.k, batch.v = (jnp.asarray(x) for x in (q, k, v))
    out, pages = run(*batch.args())
    want_out, want_pages = ragged_paged_attention_reference(*batch.args())
    out, want_out = np.asarray(out), np.asarray(want_out)
    assert not np.isfinite(want_out).all() and np.isfinite(want_out).any()
    for kind in (np.isnan, np.isposinf, np.isneginf):
        np.testing.assert_array_equal(kind(out), kind(want_out))
    finite = np.isfinite(want_out)
    np.testing.assert_allclose(out[finite], want_out[finite], atol=F32_ATOL, rtol=F32_ATOL)
    np.testing.assert_array_equal(
        np.asarray(pages).view(np.uint32), np.asarray(want_pages).view(np.uint32)
    )


@pytest.mark.parametrize("name,ways", [("mixed_gqa8_ps16", 3), ("window_mixed_gqa4_ps16", 2),
                                       ("decode_gqa8_ps32_default_blocks", 4),
                                       ("softcap_mixed_gqa1_ps32", 2), ("chunked_gqa4_ps32", 3)])
def test_cpu_kernel_page_mask_partials_merge_to_the_reference(name, ways):
    """Context parallelism: only held pages (runs of them) are walked; every part's
    out/lse/pages equal the reference's masked path and the parts merge to the whole."""
    *_, options, _ = CASES[name]
    batch = make_batch(name, seed=5)

    def local(page_mask):
        return run(*batch.args(), page_mask=page_mask, return_lse=True, **options)

    check_partials(batch, local, F32_ATOL, ways, **options)

