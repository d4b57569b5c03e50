"""An independent numpy Lion, and the check the benchmark runs before timing.

Written from the paper's formula, in numpy only (no TensorFlow, nothing from
`tf_lion` or `tests/`):

    c     = beta_1 * m + (1 - beta_1) * g
    theta = theta - lr * (sign(c) + weight_decay * theta)
    m     = beta_2 * m + (1 - beta_2) * g

Every operation is a separate float32 numpy op, rounded on its own. The
hyperparameters are rounded to float32 first, as the optimizers store them.
Values stored in bfloat16 are computed in float32 and rounded to bfloat16
(round to nearest, ties to even) with integer arithmetic on the float32 bits.

XLA on CPU fuses `a * b + c` into one multiply-add (one rounding instead of
two), and sums duplicate sparse indices in an order of its choosing, so a
compiled update may differ from this reference by a few roundings. The check
allows exactly that and no more:

* momentum: within 2 float32 eps of the magnitudes of its terms (plus the
  rounding of the duplicate sum, plus one ulp of a bfloat16 store);
* theta: the same rounding bound where `c` is clearly non-zero; where `c` is
  within rounding of zero (4 float32 eps of its terms' magnitudes: its sign may
  legitimately flip), at most `2 * lr` more;
* lazy mode: rows absent from the indices keep their bits, in theta and in m.
"""

import numpy as np

__all__ = [
    "CorrectnessError",
    "round_to_bfloat16",
    "sum_duplicates",
    "lion_step",
    "check_step",
]

EPS32 = float(np.finfo(np.float32).eps)  # 2**-23


class CorrectnessError(AssertionError):
    """An optimizer's step disagrees with the numpy reference beyond rounding."""


def round_to_bfloat16(x):
    """float32 array -> float32 array holding the nearest bfloat16 (ties to even)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    lsb = (bits >> 16) & 1
    rounded = ((bits + 0x7FFF + lsb) & 0xFFFF0000).astype(np.uint32)
    out = rounded.view(np.float32)
    return np.where(np.isnan(x), x, out)


def _store(x, dtype_name):
    if dtype_name == "float32":
        return x.astype(np.float32)
    if dtype_name == "bfloat16":
        return round_to_bfloat16(x)
    raise ValueError(f"unsupported storage dtype {dtype_name!r}")


def sum_duplicates(indices, values):
    """Sums the rows of `values` that share an index (in their original order).

    Returns `(rows, summed, bound)`: the distinct indices (sorted), the summed
    rows, and per row a bound on the rounding of that sum in any order
    (count * eps * sum of magnitudes), because compiled code may add
    duplicates in another order than numpy does.
    """
    indices = np.asarray(indices, np.int64)
    values = np.asarray(values, np.float32)
    order = np.argsort(indices, kind="stable")
    ordered = indices[order]
    starts = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]]))
    rows = ordered[starts]
    summed = np.add.reduceat(values[order], starts, axis=0)
    magnitude = np.add.reduceat(np.abs(values[order]), starts, axis=0)
    counts = np.diff(np.append(starts, ordered.size)).astype(np.float32)
    bound = counts.reshape((-1,) + (1,) * (values.ndim - 1)) * np.float32(EPS32) * magnitude
    return rows, summed, bound


def lion_step(theta, m, g, lr, beta_1, beta_2, weight_decay, theta_dtype="float32",
              m_dtype="float32"):
    """One Lion step in float32; returns (theta', m', c), theta'/m' rounded to storage."""
    f32 = np.float32
    lr, b1, b2, wd = f32(lr), f32(beta_1), f32(beta_2), f32(weight_decay)
    one = f32(1)
    c = b1 * m + (one - b1) * g
    step = np.sign(c)
    if wd:
        step = step + wd * theta
    new_theta = _store(theta - lr * step, theta_dtype)
    new_m = _store(b2 * m + (one - b2) * g, m_dtype)
    return new_theta, new_m, c


def store_ulp(x, dtype_name):
    """One unit in the last place of the storage dtype at |x| (float32 arrays in)."""
    spacing = np.spacing(np.abs(np.asarray(x, np.float32)))
    if dtype_name == "float32":
        return spacing
    if dtype_name == "bfloat16":  # 7 fraction bits instead of 23
        return spacing * np.float32(2.0 ** 16)
    raise ValueError(f"unsupported storage dtype {dtype_name!r}")


def _worst(name, got, want, bound, where, context, row_ids=None):
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    bad = np.flatnonzero((diff > bound).ravel() | (np.isnan(got) != np.isnan(want)).ravel())
    if bad.size == 0:
        return
    excess = (diff.ravel() - np.broadcast_to(bound, diff.shape).ravel())[bad]
    i = bad[int(np.argmax(excess))]
    idx = list(np.unravel_index(i, got.shape))
    if idx and row_ids is not None:
        idx[0] = row_ids[idx[0]]
    raise CorrectnessError(
        f"{context}: {name} disagrees with the numpy Lion reference at {bad.size} of "
        f"{got.size} elements checked together{where}; worst at index "
        f"{tuple(int(j) for j in idx)}: got "
        f"{got.ravel()[i]!r}, reference {want.ravel()[i]!r}, allowed difference "
        f"{np.broadcast_to(bound, diff.shape).ravel()[i]!r}."
    )


def _check_rows(theta0, m0, g, gerr, theta1, m1, hp, theta_dtype, m_dtype, context,
                row_ids=None):
    """The bounded comparison on rows whose gradient is `g` (gerr: its sum's error bound)."""
    f32 = np.float32
    lr, b1, b2, wd = f32(hp["lr"]), f32(hp["beta_1"]), f32(hp["beta_2"]), f32(hp["weight_decay"])
    want_theta, want_m, c = lion_step(theta0, m0, g, lr, b1, b2, wd, theta_dtype, m_dtype)
    one = f32(1)
    m_terms = np.abs(b2 * m0) + np.abs((one - b2) * g)
    m_bound = 2 * EPS32 * m_terms + (one - b2) * gerr
    if m_dtype != "float32":  # float32 values a few eps apart may round to neighbours
        m_bound = m_bound + store_ulp(want_m, m_dtype)
    _worst("momentum", m1, want_m, m_bound, "", context, row_ids)

    # c is "within rounding of zero" where a few roundings of its terms could flip
    # its sign: fused multiply-adds, or c rebuilt from the new momentum as
    # beta_1 * m' + (beta_2 - beta_1) * g (= beta_2 * c, one more rounding).
    # Where both terms are exactly zero, c is exactly zero in any arithmetic.
    c_bound = 4 * EPS32 * (np.abs(b1 * m0) + np.abs((one - b1) * g)) + (one - b1) * gerr
    c_near_zero = (np.abs(c) <= c_bound) & (c_bound > 0)
    t_bound = 2 * EPS32 * (np.abs(theta0) + lr * (1 + wd * np.abs(theta0)))
    if theta_dtype != "float32":
        t_bound = t_bound + store_ulp(want_theta, theta_dtype)
    t_bound = (np.broadcast_to(t_bound, theta0.shape)
               + np.where(c_near_zero, 2 * lr, 0).astype(np.float32))
    _worst("theta", theta1, want_theta, t_bound,
           " (sign(c) flips are allowed only where c is within rounding of zero)", context,
           row_ids)
    return int(np.count_nonzero(c_near_zero & (theta1 != want_theta)))


_BLOCK_ELEMENTS = 2 ** 16  # rows are checked in cache-sized blocks: large tables stay fast


def _blockwise(theta0, m0, gradient_rows, theta1, m1, hp, theta_dtype, m_dtype, context):
    """Checks all rows, a cache-sized block at a time; `gradient_rows(lo, hi)` gives
    the block's gradient and its duplicate-sum rounding bound."""
    if theta0.ndim == 0:
        g, gerr = gradient_rows(None, None)
        return _check_rows(theta0, m0, g, gerr, theta1, m1, hp, theta_dtype, m_dtype, context)
    rows = theta0.shape[0]
    step = max(1, _BLOCK_ELEMENTS // max(1, theta0.size // max(rows, 1)))
    flips = 0
    for lo in range(0, rows, step):
        hi = min(lo + step, rows)
        g, gerr = gradient_rows(lo, hi)
        flips += _check_rows(theta0[lo:hi], m0[lo:hi], g, gerr, theta1[lo:hi], m1[lo:hi], hp,
                             theta_dtype, m_dtype, context, np.arange(lo, hi))
    return flips


def check_step(theta0, m0, grad, theta1, m1, hp, mode="dense", theta_dtype="float32",
               m_dtype="float32", context="optimizer"):
    """Raises CorrectnessError unless (theta1, m1) is one Lion step from (theta0, m0).

    Args:
      theta0, m0, theta1, m1: float32 numpy arrays holding the stored values
        (bfloat16 values converted exactly to float32) before and after.
      grad: a float32 array (mode "dense"), or `(indices, values)` for the
        sparse modes ("exact": the densified gradient with duplicates summed;
        "lazy": only rows present in `indices` change).
      hp: dict with lr, beta_1, beta_2, weight_decay.
      theta_dtype, m_dtype: "float32" or "bfloat16", the storage dtypes.
      context: names the scenario/optimizer/variable in the error message.

    Returns:
      A dict of statistics (elements compared, sign flips at rounding-level c).
    """
    for name, a in (("theta0", theta0), ("m0", m0), ("theta1", theta1), ("m1", m1)):
        if a.shape != theta0.shape:
            raise CorrectnessError(
                f"{context}: {name} has shape {a.shape}, expected {theta0.shape}")
    zero = np.float32(0)
    if mode == "dense":
        g = np.asarray(grad, np.float32)

        def dense_rows(lo, hi):
            return (g, zero) if lo is None else (g[lo:hi], zero)

        flips = _blockwise(theta0, m0, dense_rows, theta1, m1, hp, theta_dtype, m_dtype, context)
        return {"elements": int(theta0.size), "rounding_sign_flips": flips}

    rows = theta0.shape[0]
    touched, summed, bound = sum_duplicates(*grad)
    if mode == "exact":  # the densified gradient: summed rows where touched, zero elsewhere

        def sparse_rows(lo, hi):
            g = np.zeros((hi - lo,) + theta0.shape[1:], np.float32)
            gerr = np.zeros_like(g)
            a, b = np.searchsorted(touched, [lo, hi])
            g[touched[a:b] - lo] = summed[a:b]
            gerr[touched[a:b] - lo] = bound[a:b]
            return g, gerr

        flips = _blockwise(theta0, m0, sparse_rows, theta1, m1, hp, theta_dtype, m_dtype, context)
        return {"elements": int(theta0.size), "rounding_sign_flips": flips}
    if mode != "lazy":
        raise ValueError(f"unknown mode {mode!r}")

    untouched = np.ones(rows, bool)
    untouched[touched] = False
    for name, before, after in (("theta", theta0, theta1), ("momentum", m0, m1)):
        changed = np.flatnonzero(np.any((before != after).reshape(rows, -1), axis=1) & untouched)
        if changed.size:
            raise CorrectnessError(
                f"{context}: lazy mode changed {name} in {changed.size} row(s) absent from the "
                f"indices (first: row {int(changed[0])}); they must keep their bits."
            )
    # Touched rows: the reference on those rows only.
    flips = _check_rows(theta0[touched], m0[touched], summed, bound, theta1[touched], m1[touched],
                        hp, theta_dtype, m_dtype, context, touched)
    return {"elements": int(touched.size * (theta0.size // max(rows, 1))),
            "rounding_sign_flips": flips}
