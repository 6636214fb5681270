"""The argmax/log-sum-exp kernel for CPU against its pure-JAX reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meshserve.pallas_kernels import row_reductions as rr


def _both(x):
    ref_idx, ref_norm = jax.jit(rr.argmax_log_norm_reference)(x)
    idx, norm = jax.jit(rr.argmax_log_norm)(x)
    return np.asarray(idx), np.asarray(norm), np.asarray(ref_idx), np.asarray(ref_norm)


@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (2, 5, 1000), (32, 32000)])
def test_matches_reference_on_random_logits(shape):
    x = jnp.asarray(np.random.default_rng(0).normal(0, 4, shape).astype(np.float32))
    idx, norm, ref_idx, ref_norm = _both(x)
    assert idx.shape == ref_idx.shape == shape[:-1] and idx.dtype == np.int32
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(norm, ref_norm, rtol=2e-6, atol=2e-6)


def test_ties_take_the_first_index():
    x = np.zeros((4, 40), np.float32)
    x[0, [3, 7, 39]] = 5.0
    x[1, [39]] = 1.0
    x[2, :] = -2.0  # all equal
    x[3, [0, 20]] = 9.0
    idx, norm, ref_idx, ref_norm = _both(jnp.asarray(x))
    assert idx.tolist() == [3, 39, 0, 0] == ref_idx.tolist()
    np.testing.assert_allclose(norm, ref_norm, rtol=1e-6)
    assert norm[2] == pytest.approx(-2.0 + np.log(40.0), rel=1e-6)


def test_non_finite_rows_follow_the_reference():
    inf, nan = np.inf, np.nan
    x = np.zeros((6, 8), np.float32)
    x[0, 2] = nan  # NaN anywhere: no maximum, the last id, NaN normaliser
    x[1, [1, 5]] = inf  # +inf: its first index, +inf normaliser
    x[2, :] = -inf  # nothing but -inf: index 0, -inf
    x[3, [0, 1]] = -inf  # -inf entries weigh nothing
    x[3, 6] = 3.0
    x[4, [2, 3]] = [inf, nan]  # NaN wins over +inf, as in XLA's max
    x[5, 7] = -inf
    idx, norm, ref_idx, ref_norm = _both(jnp.asarray(x))
    assert idx.tolist() == ref_idx.tolist() == [7, 1, 0, 6, 7, 0]
    np.testing.assert_array_equal(np.isnan(norm), np.isnan(ref_norm))
    finite = ~np.isnan(ref_norm)
    np.testing.assert_allclose(norm[finite], ref_norm[finite], rtol=1e-6)
    assert np.isposinf(norm[1]) and np.isneginf(norm[2])


def test_rejects_other_dtypes():
    with pytest.raises(ValueError, match="f32"):
        rr.argmax_log_norm(jnp.zeros((2, 8), jnp.bfloat16))
