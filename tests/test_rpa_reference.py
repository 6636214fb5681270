"""Ragged paged attention reference vs a naive per-sequence dense attention in numpy.

Also covers the K/V page write, input validation and backend dispatch.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meshserve.pallas_kernels.ragged_paged_attention import (
    IMPL_ENV_VAR,
    ragged_paged_attention,
    ragged_paged_attention_reference,
    resolve_impl,
    validate_dynamic,
    validate_static,
    write_kv_pages,
)
from meshserve.pallas_kernels.ragged_paged_attention.validation import random_ragged_batch


def naive_attention(batch, *, sm_scale=None, sliding_window=None, soft_cap=None):
    """Loops over sequences, tokens and heads: write new K/V, then dense causal softmax."""
    q = np.asarray(batch.q, np.float32)
    k = np.asarray(batch.k, np.float32)
    v = np.asarray(batch.v, np.float32)
    pages = np.array(batch.kv_pages, np.float32)
    table = np.asarray(batch.page_indices)
    _, num_q_heads, head_dim = q.shape
    page_size = pages.shape[1]
    group = num_q_heads // (pages.shape[2] // 2)
    scale = 1.0 / np.sqrt(head_dim) if sm_scale is None else sm_scale
    out = np.zeros_like(q)
    start = 0
    for i, (q_len, kv_len) in enumerate(zip(batch.q_lens, batch.seq_kv_lens, strict=True)):
        for j in range(q_len):
            pos = kv_len - q_len + j
            pages[table[i, pos // page_size], pos % page_size, 0::2] = k[start + j]
            pages[table[i, pos // page_size], pos % page_size, 1::2] = v[start + j]
        pos = np.arange(kv_len)
        keys = pages[table[i, pos // page_size], pos % page_size, 0::2]
        vals = pages[table[i, pos // page_size], pos % page_size, 1::2]
        for j in range(q_len):
            qpos = kv_len - q_len + j
            allowed = pos <= qpos
            if sliding_window is not None:
                allowed &= pos > qpos - sliding_window
            for h in range(num_q_heads):
                logits = keys[:, h // group] @ q[start + j, h] * scale
                if soft_cap is not None:
                    logits = soft_cap * np.tanh(logits / soft_cap)
                logits = np.where(allowed, logits, -np.inf)
                p = np.exp(logits - logits.max())
                masked_vals = np.where(allowed[:, None], vals[:, h // group], 0)
                out[start + j, h] = (p / p.sum()) @ masked_vals
        start += q_len
    return out, pages


# name -> (seqs as (q_len, kv_len), T, max_seqs, num_q_heads, num_kv_heads, head_dim, page_size)
CASES = {
    "decode_mha_ps16": ([(1, 37), (1, 5), (1, 64), (1, 1), (1, 17)], 8, 8, 4, 4, 32, 16),
    "decode_gqa4_ps32": ([(1, 100), (1, 31), (1, 32), (1, 33)], 4, 6, 8, 2, 32, 32),
    "prefill_gqa8_ps16": ([(20, 20), (33, 33), (5, 5)], 64, 4, 8, 1, 32, 16),
    "prefill_gqa4_ps32": ([(64, 64), (1, 1)], 72, 2, 8, 2, 64, 32),
    "mixed_gqa4_ps16": ([(1, 40), (16, 16), (1, 7), (9, 30), (0, 12), (3, 3)], 40, 8, 8, 2, 32, 16),
    "mixed_gqa8_ps32": ([(7, 7), (1, 65), (30, 30), (1, 2)], 48, 5, 16, 2, 32, 32),
    "chunked_mha_ps16": ([(24, 90), (8, 50), (1, 33)], 40, 4, 2, 2, 32, 16),
    "chunked_gqa4_ps32": ([(40, 100), (17, 17), (1, 200)], 64, 3, 8, 2, 32, 32),
}

OPTIONS = {
    "plain": {},
    "window": {"sliding_window": 9},
    "softcap": {"soft_cap": 3.0},
    "window_softcap_scale": {"sliding_window": 40, "soft_cap": 20.0, "sm_scale": 0.3},
}


def make_batch(name, dtype=jnp.float32, seed=0):
    seqs, tokens, max_seqs, hq, hkv, d, ps = CASES[name]
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


@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_reference_matches_naive(case, option):
    batch = make_batch(case, seed=zlib.crc32(f"{case}/{option}".encode()) % 1000)
    kw = OPTIONS[option]
    out, pages = ragged_paged_attention_reference(*batch.args(), **kw)
    want_out, want_pages = naive_attention(batch, **kw)
    out = np.asarray(out)
    total = sum(batch.q_lens)
    assert np.isfinite(out).all()  # NaN anywhere means a stray read
    np.testing.assert_allclose(out, want_out, atol=2e-5, rtol=1e-5)
    assert not out[total:].any(), "padding rows must be zero"
    # Exact, NaN included: unused pages and unwritten slots must be left alone.
    np.testing.assert_array_equal(np.asarray(pages), want_pages)


@pytest.mark.parametrize("block_q", [1, 3, 8, 64])
def test_reference_block_q_does_not_change_results(block_q):
    batch = make_batch("mixed_gqa4_ps16", seed=3)
    want, _ = naive_attention(batch, sliding_window=20)
    out, _ = ragged_paged_attention_reference(
        *batch.args(), sliding_window=20, block_q=block_q, keys_per_block=32
    )
    np.testing.assert_allclose(np.asarray(out), want, atol=2e-5, rtol=1e-5)


def test_reference_bf16():
    batch = make_batch("mixed_gqa8_ps32", dtype=jnp.bfloat16, seed=5)
    out, pages = ragged_paged_attention_reference(*batch.args(), soft_cap=10.0)
    want, want_pages = naive_attention(batch, soft_cap=10.0)
    assert out.dtype == jnp.bfloat16 and pages.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=2e-2, rtol=2e-2)
    np.testing.assert_array_equal(np.asarray(pages, np.float32), want_pages)


def test_write_kv_pages_only_touches_new_slots():
    batch = make_batch("chunked_gqa4_ps32", seed=7)
    pages = np.asarray(
        write_kv_pages(
            batch.k,
            batch.v,
            batch.kv_pages,
            batch.kv_lens,
            batch.page_indices,
            batch.cu_q_lens,
            batch.num_seqs,
        )
    )
    _, want = naive_attention(batch)
    np.testing.assert_array_equal(pages, want)


def test_one_compilation_serves_every_batch_of_a_bucket():
    traces = []

    @jax.jit
    def step(*args):
        traces.append(1)
        return ragged_paged_attention_reference(*args)

    shapes = dict(
        num_q_heads=8,
        num_kv_heads=2,
        head_dim=32,
        page_size=16,
        num_tokens=32,
        max_seqs=6,
        pages_per_seq=8,
        num_pages=40,
    )
    for seed, seqs in enumerate([[(1, 40)] * 5, [(20, 20), (1, 9)], [(10, 100), (3, 5), (1, 1)]]):
        batch = random_ragged_batch(seqs, seed=seed, **shapes)
        out, _ = step(*batch.args())
        want, _ = naive_attention(batch)
        np.testing.assert_allclose(np.asarray(out), want, atol=2e-5, rtol=1e-5)
    assert len(traces) == 1


def test_num_seqs_zero_gives_zeros_and_untouched_pages():
    batch = make_batch("decode_mha_ps16")
    out, pages = ragged_paged_attention_reference(*batch.args()[:-1], jnp.zeros((1,), jnp.int32))
    assert not np.asarray(out).any()
    np.testing.assert_array_equal(np.asarray(pages), np.asarray(batch.kv_pages))


def _bad(batch, **changes):
    args = dict(
        zip(
            ["q", "k", "v", "kv_pages", "kv_lens", "page_indices", "cu_q_lens", "num_seqs"],
            batch.args(),
            strict=True,
        )
    )
    args.update(changes)
    return list(args.values())


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda b: {"q": b.q[:, :3]}, "divisible"),
        (lambda b: {"kv_pages": b.kv_pages[..., :16]}, "head_dim"),
        (lambda b: {"kv_pages": b.kv_pages[:, :, :3]}, "interleaved"),
        (lambda b: {"k": b.k[:4]}, "k must be"),
        (lambda b: {"kv_lens": b.kv_lens.astype(jnp.float32)}, "kv_lens must be int32"),
        (lambda b: {"cu_q_lens": b.cu_q_lens[:-1]}, "cu_q_lens must have shape"),
        (lambda b: {"page_indices": b.page_indices[0]}, "page_indices must be"),
        (lambda b: {"num_seqs": jnp.zeros((2,), jnp.int32)}, "num_seqs"),
        (lambda b: {"q": b.q.astype(jnp.int32)}, "floating"),
    ],
)
def test_validate_static_rejects(change, message):
    batch = make_batch("mixed_gqa4_ps16")
    with pytest.raises(ValueError, match=message):
        validate_static(*_bad(batch, **change(batch)))


def test_validate_static_rejects_options():
    args = make_batch("decode_mha_ps16").args()
    with pytest.raises(ValueError, match="sliding_window"):
        validate_static(*args, sliding_window=0)
    with pytest.raises(ValueError, match="soft_cap"):
        validate_static(*args, soft_cap=-1.0)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda m: m["kv_lens"].__setitem__(1, 3), "kv_len=3 < q_len=16"),
        (lambda m: m["kv_lens"].__setitem__(0, 10_000), "pages"),
        (lambda m: m["cu_q_lens"].__setitem__(2, 0), "non-decreasing"),
        (lambda m: m["page_indices"].__setitem__((0, 0), 10_000), "out of range"),
        (lambda m: m["num_seqs"].__setitem__(0, 99), "num_seqs"),
        (lambda m: m["page_indices"].__setitem__((3, 1), m["page_indices"][0, 2]), "same"),
    ],
)
def test_validate_dynamic_rejects(mutate, message):
    batch = make_batch("mixed_gqa4_ps16")
    meta = {
        name: np.array(getattr(batch, name))
        for name in ("kv_lens", "page_indices", "cu_q_lens", "num_seqs")
    }
    validate_dynamic(batch.kv_pages.shape, batch.q.shape[0], **meta)  # the good batch passes
    mutate(meta)
    with pytest.raises(ValueError, match=message):
        validate_dynamic(batch.kv_pages.shape, batch.q.shape[0], **meta)


def test_debug_mode_validates_eagerly_and_under_jit():
    batch = make_batch("mixed_gqa4_ps16")
    bad = _bad(batch, kv_lens=batch.kv_lens.at[1].set(3))
    with pytest.raises(ValueError, match="q_len"):
        ragged_paged_attention(*bad, debug=True)
    with pytest.raises(Exception, match="q_len"):
        out, _ = jax.jit(lambda *a: ragged_paged_attention(*a, debug=True))(*bad)
        out.block_until_ready()


def test_resolve_impl(monkeypatch):
    monkeypatch.delenv(IMPL_ENV_VAR, raising=False)
    assert resolve_impl() == "cpu"  # the C++ kernel builds on this machine
    assert resolve_impl(backend="tpu") == "tpu"
    assert resolve_impl(backend="gpu") == "gpu"
    monkeypatch.setenv(IMPL_ENV_VAR, "GPU")
    assert resolve_impl() == "gpu"
    assert resolve_impl("reference") == "reference"  # the argument wins
    monkeypatch.setenv(IMPL_ENV_VAR, "cuda")
    with pytest.raises(ValueError, match=IMPL_ENV_VAR):
        resolve_impl()


def test_dispatch_default_on_cpu_and_kernels_need_interpret(monkeypatch):
    monkeypatch.delenv(IMPL_ENV_VAR, raising=False)
    batch = make_batch("decode_gqa4_ps32")
    want, want_pages = naive_attention(batch, sliding_window=16)
    for impl in (None, "reference"):  # None: the C++ CPU kernel
        out, pages = ragged_paged_attention(*batch.args(), sliding_window=16, impl=impl)
        np.testing.assert_allclose(np.asarray(out), want, atol=2e-5, rtol=1e-5)
        np.testing.assert_array_equal(np.asarray(pages), want_pages)
    for impl in ("tpu", "gpu"):
        with pytest.raises(ValueError, match="interpret=True"):
            ragged_paged_attention(*batch.args(), impl=impl)
        monkeypatch.setenv(IMPL_ENV_VAR, impl)
        with pytest.raises(ValueError, match="interpret=True"):
            ragged_paged_attention(*batch.args())
        monkeypatch.delenv(IMPL_ENV_VAR)
