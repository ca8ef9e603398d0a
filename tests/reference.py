"""Independent float64 references written as plain loops from the paper's equations (arXiv 2304.12760).

Nothing here calls the code under test.
"""

from __future__ import annotations

import numpy as np


def psn_loop(x: np.ndarray, W: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PSN: H[t] = sum_i W[t, i] X[i] + b[t]; S = Heaviside(H). x: (T, N)."""
    T, N = x.shape
    h = np.zeros((T, N))
    for t in range(T):
        for i in range(T):
            h[t] += W[t, i] * x[i]
        h[t] += b[t]
    return (h >= 0).astype(np.float64), h


def masked_loop(x: np.ndarray, W: np.ndarray, b: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Masked PSN: only t-k < i <= t contribute."""
    T, N = x.shape
    h = np.zeros((T, N))
    for t in range(T):
        for i in range(T):
            if t - k < i <= t:
                h[t] += W[t, i] * x[i]
        h[t] += b[t]
    return (h >= 0).astype(np.float64), h


def sliding_loop(x: np.ndarray, w: np.ndarray, b: float) -> tuple[np.ndarray, np.ndarray]:
    """Sliding PSN: H[t] = sum_i w[i] X[t-k+1+i] + b, X before step 0 is zero."""
    T, N = x.shape
    k = len(w)
    h = np.zeros((T, N))
    for t in range(T):
        for i in range(k):
            j = t - k + 1 + i
            if j >= 0:
                h[t] += w[i] * x[j]
        h[t] += b
    return (h >= 0).astype(np.float64), h


def lif_loop(x: np.ndarray, tau: float, v_th: float) -> np.ndarray:
    """LIF with hard reset to 0: v += (x - v)/tau; s = v >= v_th; v = 0 where s."""
    v = np.zeros(x.shape[1:])
    out = []
    for x_t in x:
        v = v + (x_t - v) / tau
        s = (v - v_th >= 0).astype(np.float64)
        v = v * (1 - s)
        out.append(s)
    return np.stack(out)
