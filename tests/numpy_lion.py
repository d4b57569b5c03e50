"""An independent numpy reference of Lion, written from the paper's formula.

    c     = beta_1 * m + (1 - beta_1) * g
    theta = theta - lr * (sign(c) + weight_decay * theta)
    m     = beta_2 * m + (1 - beta_2) * g

All arithmetic is done in `compute` (float32 unless float64 is involved), with
hyperparameters rounded to float32 first, as the optimizer stores them.
Each operation is a separate, rounded numpy op (no fused multiply-add).
"""

import numpy as np


def f32(x):
    return np.float32(x)


def compute_dtype(*dtypes):
    return np.float64 if any(np.dtype(d) == np.float64 for d in dtypes) else np.float32


def step(theta, m, g, lr, beta_1, beta_2, weight_decay=0.0, momentum_dtype=None):
    """One dense Lion step; returns (new_theta, new_m, c) with c in compute dtype."""
    theta_dtype = theta.dtype
    m_dtype = np.dtype(momentum_dtype) if momentum_dtype is not None else m.dtype
    cd = compute_dtype(theta_dtype, m_dtype)
    lr, b1, b2, wd = (cd(f32(v)) for v in (lr, beta_1, beta_2, weight_decay))
    t = theta.astype(cd)
    mm = m.astype(cd)
    gg = g.astype(cd)
    c = b1 * mm + (cd(1) - b1) * gg
    update = np.sign(c)
    if weight_decay:
        update = update + wd * t
    new_theta = (t - lr * update).astype(theta_dtype)
    new_m = (b2 * mm + (cd(1) - b2) * gg).astype(m_dtype)
    return new_theta, new_m, c


def densify(indices, values, num_rows):
    """Sums duplicate rows in the order they appear (like tf.convert_to_tensor)."""
    dense = np.zeros((num_rows,) + values.shape[1:], values.dtype)
    np.add.at(dense, indices, values)
    return dense


def sparse_step(theta, m, indices, values, lr, beta_1, beta_2, weight_decay=0.0, mode="exact"):
    """Exact: the dense step with the densified gradient. Lazy: only touched rows move."""
    g = densify(np.asarray(indices), values, theta.shape[0])
    new_theta, new_m, c = step(theta, m, g, lr, beta_1, beta_2, weight_decay, m.dtype)
    if mode == "lazy":
        untouched = np.ones(theta.shape[0], bool)
        untouched[np.asarray(indices)] = False
        new_theta[untouched] = theta[untouched]
        new_m[untouched] = m[untouched]
    return new_theta, new_m, c


EPS32 = float(np.finfo(np.float32).eps)


def assert_fused_step_close(new_theta, new_m, theta, m, g, lr, beta_1, beta_2, weight_decay=0.0):
    """Checks one float32 step computed by XLA against the reference.

    XLA on CPU contracts `a * b + c` into fused multiply-adds (one rounding
    instead of two), so its c and m may differ from separately rounded ops by
    about one rounding of the terms. The bounds below are exactly that: m within
    2 eps of its terms' magnitudes; theta equal to the reference (up to the same
    rounding of its own terms) wherever c is not within rounding of zero, and
    at most 2 lr away where it is (the sign of a rounding-level c may flip).
    """
    b1, b2, lr32, wd = f32(beta_1), f32(beta_2), f32(lr), f32(weight_decay)
    e_theta, e_m, c = step(theta, m, g, lr, beta_1, beta_2, weight_decay)
    m_bound = 2 * EPS32 * (np.abs(b2 * m) + np.abs((f32(1) - b2) * g))
    assert np.all(np.abs(new_m - e_m) <= m_bound), "momentum beyond fused-rounding bound"
    c_near_zero = np.abs(c) <= 2 * EPS32 * (np.abs(b1 * m) + np.abs((f32(1) - b1) * g))
    t_bound = 2 * EPS32 * (np.abs(theta) + lr32 * (1 + wd * np.abs(theta)))
    diff = np.abs(new_theta - e_theta)
    assert np.all(diff[~c_near_zero] <= t_bound[~c_near_zero]), "theta differs where sign(c) is clear"
    assert np.all(diff[c_near_zero] <= 2 * lr32 + t_bound[c_near_zero])
    return e_theta, e_m
