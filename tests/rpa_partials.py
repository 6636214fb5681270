"""Checks of a kernel's context-parallel path (page mask + log-sum-exp) against the
reference, shared by the kernel test files."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from meshserve.pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference
from meshserve.pallas_kernels.ragged_paged_attention.reference import MASK_VALUE, merge_partials


def _bits(x):
    x = np.asarray(x)
    return x.view(f"u{x.dtype.itemsize}")


def check_partials(batch, run, atol, ways, **options):
    """Each part's (out, lse, pages) against the reference's masked path, and their merge
    against the whole attention; a part holding no page writes nothing and contributes 0."""
    table = batch.args()[5]
    want_full, _ = ragged_paged_attention_reference(*batch.args(), **options)
    outs, lses = [], []
    for part in [*range(ways), None]:
        mask = table % ways == part if part is not None else jnp.zeros(table.shape, bool)
        out, lse, pages = run(page_mask=mask)
        want = ragged_paged_attention_reference(*batch.args(), **options, page_mask=mask,
                                                return_lse=True)
        assert out.dtype == lse.dtype == jnp.float32 and lse.shape == batch.q.shape[:2]
        assert np.isfinite(np.asarray(out)).all(), "the kernel read memory it must not"
        np.testing.assert_allclose(out, want[0], atol=atol, rtol=atol)
        np.testing.assert_allclose(lse, want[1], atol=atol, rtol=atol)
        np.testing.assert_array_equal(_bits(pages), _bits(want[2]))
        assert (np.asarray(lse)[sum(batch.q_lens):] == MASK_VALUE).all()
        if part is None:
            assert not np.asarray(out).any() and (np.asarray(lse) == MASK_VALUE).all()
            np.testing.assert_array_equal(_bits(pages), _bits(batch.kv_pages))
        outs.append(out)
        lses.append(lse)
    # the cases hold sequences with fewer pages than parts: some valid rows get nothing
    assert (np.asarray(lses[:ways])[:, : sum(batch.q_lens)] == MASK_VALUE).any()
    merged = merge_partials(jnp.stack(outs), jnp.stack(lses))
    np.testing.assert_allclose(merged, np.asarray(want_full, np.float32), atol=atol, rtol=atol)
