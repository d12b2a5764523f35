"""Group sums and sums of squares of expression, for many cell groups at once.

``group_moments(groups, X)`` returns, for every row of the 0/1 group matrix ``groups`` (groups x cells),
the per-gene sum and sum of squares of ``X`` (cells x genes) over the group's cells, i.e.
``groups @ X`` and ``groups @ X**2`` as dense float64 arrays.

Two engines give identical results:

- ``"numba"`` (default when numba imports): one parallel pass that scatters each member cell's stored
  values into the group's accumulator row. The work is (cells in groups) x (non-zeros per cell), so
  the ~90% zeros of single-cell data cost nothing, and no sparse result structure is built.
- ``"scipy"``: two sparse products; single-threaded and about 3-4x slower, used when numba is missing.

numba is a dependency of scanpy (and so of dgdlens); the kernels are compiled on first use and cached.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import scipy.sparse as sp

__all__ = ["group_moments", "numba_available", "welch_from_moments", "binomial_half"]

# variance guards of the Welch test, as integer codes for the compiled kernel (see de.py)
GUARD_CODES = {None: 0, "floor": 1, "overestim": 2}


@functools.lru_cache(maxsize=1)
def _numba_kernels():
    """Compile (or load from cache) the numba kernels; ``None`` when numba cannot be used."""
    try:
        import numba
    except ImportError:  # pragma: no cover - numba ships with scanpy
        return None

    def build(cache: bool):
        @numba.njit(parallel=True, cache=cache, nogil=True)
        def csr_moments(g_indptr, g_indices, x_indptr, x_indices, x_data, out_sum, out_sq):  # pragma: no cover
            n_groups = len(g_indptr) - 1
            for f in numba.prange(n_groups):
                for p in range(g_indptr[f], g_indptr[f + 1]):
                    c = g_indices[p]
                    for j in range(x_indptr[c], x_indptr[c + 1]):
                        v = np.float64(x_data[j])
                        g = x_indices[j]
                        out_sum[f, g] += v
                        out_sq[f, g] += v * v
            return 0

        @numba.njit(parallel=True, cache=cache, nogil=True)
        def dense_moments(g_indptr, g_indices, X, out_sum, out_sq):  # pragma: no cover
            n_groups = len(g_indptr) - 1
            n_genes = X.shape[1]
            for f in numba.prange(n_groups):
                for p in range(g_indptr[f], g_indptr[f + 1]):
                    c = g_indices[p]
                    for g in range(n_genes):
                        v = np.float64(X[c, g])
                        out_sum[f, g] += v
                        out_sq[f, g] += v * v
            return 0

        @numba.njit(parallel=True, cache=cache, nogil=True, error_model="numpy")
        def welch_fused(s_h, q_h, p_s, p_q, inverse, e_s, e_q, n_h, n_l, guard,
                        mean_h, var_h, mean_l, var_l, t, df, tested):  # pragma: no cover
            # One pass per (feature, gene) doing what de._numpy_stats does with whole-array numpy steps:
            # low-group sums = prefix - excluded (rounding-level differences -> 0), means, one-pass
            # variances (rounding-level values -> 0), the guarded Welch t and its degrees of freedom.
            n_rows, n_genes = s_h.shape
            for i in numba.prange(n_rows):
                nh = np.float64(n_h[i])
                nl = np.float64(n_l[i])
                j = inverse[i]
                if guard == 2:
                    n1 = min(nh, nl)
                    n2 = n1
                else:
                    n1 = nh
                    n2 = nl
                for g in range(n_genes):
                    ps = p_s[j, g]
                    es = e_s[i, g]
                    sl = ps - es
                    if abs(sl) <= 1e-11 * (abs(ps) + abs(es)):
                        sl = 0.0
                    pq = p_q[j, g]
                    eq = e_q[i, g]
                    ql = pq - eq
                    if abs(ql) <= 1e-11 * (abs(pq) + abs(eq)):
                        ql = 0.0
                    sh = s_h[i, g]
                    qh = q_h[i, g]
                    mh = sh / nh
                    vh = (qh - sh * mh) / (nh - 1.0)
                    if vh < 1e-10 * max(qh / nh, 1e-300):
                        vh = 0.0
                    ml = sl / nl
                    vl = (ql - sl * ml) / (nl - 1.0)
                    if vl < 1e-10 * max(ql / nl, 1e-300):
                        vl = 0.0
                    mean_h[i, g] = mh
                    var_h[i, g] = vh
                    mean_l[i, g] = ml
                    var_l[i, g] = vl
                    tested[i, g] = (vh > 0) or (vl > 0) or (mh != ml)
                    v1 = vh
                    v2 = vl
                    if guard == 1:
                        if nh <= nl:
                            v1 = max(vh, vl)
                        else:
                            v2 = max(vl, vh)
                    a = v1 / n1
                    b = v2 / n2
                    se2 = a + b
                    diff = mh - ml
                    den = a * a / (n1 - 1.0) + b * b / (n2 - 1.0)
                    if se2 <= 0:
                        if diff == 0:
                            t[i, g] = 0.0
                        elif diff > 0:
                            t[i, g] = np.inf
                        else:
                            t[i, g] = -np.inf
                        df[i, g] = n1 + n2 - 2.0
                    else:
                        t[i, g] = diff / np.sqrt(se2)
                        df[i, g] = se2 * se2 / den if den > 0 else n1 + n2 - 2.0
            return 0

        return csr_moments, dense_moments, welch_fused

    def warm_up(kernels):
        # numba compiles lazily: run once on tiny inputs so that a broken toolchain shows up here
        csr_moments, dense_moments, welch_fused = kernels
        ip, ix = np.array([0, 1], dtype=np.int64), np.array([0], dtype=np.int64)
        s, q = np.zeros((1, 1)), np.zeros((1, 1))
        csr_moments(ip, ix, np.array([0, 1], dtype=np.int32), np.array([0], dtype=np.int32),
                    np.ones(1, dtype=np.float32), s, q)
        dense_moments(ip, ix, np.ones((1, 1), dtype=np.float32), s, q)
        one = np.ones((1, 1))
        outs = [np.zeros((1, 1)) for _ in range(6)] + [np.zeros((1, 1), dtype=np.bool_)]
        welch_fused(one, one, one, one, np.zeros(1, dtype=np.int64), one * 0, one * 0,
                    np.array([2], dtype=np.int64), np.array([2], dtype=np.int64), 1, *outs)
        return kernels

    for cache in (True, False):
        try:
            return warm_up(build(cache=cache))
        except Exception as err:  # pragma: no cover - e.g. no writable cache location, broken LLVM
            last_error = err
    warnings.warn(f"numba kernels unavailable ({last_error}); falling back to scipy products.", stacklevel=2)
    return None  # pragma: no cover


def numba_available() -> bool:
    """Whether the numba engine can be used."""
    return _numba_kernels() is not None


def _as_group_csr(groups) -> sp.csr_matrix:
    groups = sp.csr_matrix(groups)
    if groups.nnz and not np.all(groups.data == 1):
        groups = groups.copy()
        groups.data[:] = 1
    return groups


def group_moments(groups, X, *, engine: str = "auto", X_squared=None, out=None) -> tuple[np.ndarray, np.ndarray]:
    """Per-group, per-gene sums and sums of squares.

    Parameters
    ----------
    groups
        0/1 matrix (n_groups x n_cells), any scipy sparse format; every stored entry counts as member.
    X
        Expression (n_cells x n_genes), CSR or dense ndarray.
    engine
        ``"auto"`` (numba when available), ``"numba"`` or ``"scipy"``.
    X_squared
        Optional precomputed ``X**2`` for the scipy engine (saves recomputing it chunk after chunk).
    out
        Optional ``(sums, sums_of_squares)`` float64 C-contiguous arrays to add into (a stream over row
        chunks of ``X`` accumulates this way without a temporary per chunk).

    Returns
    -------
    (sums, sums_of_squares), each dense float64 (n_groups x n_genes).
    """
    groups = _as_group_csr(groups)
    n_groups = groups.shape[0]
    if groups.shape[1] != X.shape[0]:
        raise ValueError(f"groups has {groups.shape[1]} cell columns but X has {X.shape[0]} rows.")
    n_genes = X.shape[1]
    if engine not in {"auto", "numba", "scipy"}:
        raise ValueError(f"engine must be 'auto', 'numba' or 'scipy', got {engine!r}.")
    kernels = _numba_kernels() if engine in {"auto", "numba"} else None
    if engine == "numba" and kernels is None:
        raise ValueError("engine='numba' was requested but numba is not available; use engine='scipy'.")
    if out is not None:
        out_sum, out_sq = out
        if out_sum.shape != (n_groups, n_genes) or out_sq.shape != (n_groups, n_genes):
            raise ValueError(f"out arrays must have shape {(n_groups, n_genes)}.")
    if kernels is not None:
        if out is None:
            out_sum = np.zeros((n_groups, n_genes))
            out_sq = np.zeros((n_groups, n_genes))
        if n_groups == 0 or groups.nnz == 0:
            return out_sum, out_sq
        g_indptr = groups.indptr.astype(np.int64, copy=False)
        g_indices = groups.indices.astype(np.int64, copy=False)
        csr_moments, dense_moments, _ = kernels
        if sp.issparse(X):
            X = X if X.format == "csr" else sp.csr_matrix(X)
            csr_moments(g_indptr, g_indices, X.indptr, X.indices, X.data, out_sum, out_sq)
        else:
            dense_moments(g_indptr, g_indices, np.ascontiguousarray(X), out_sum, out_sq)
        return out_sum, out_sq
    G = groups.astype(np.float64)
    if sp.issparse(X):
        Xf = X.astype(np.float64)
        Xsq = X_squared.astype(np.float64) if X_squared is not None else Xf.multiply(Xf).tocsr()
        s, q = np.asarray((G @ Xf).toarray()), np.asarray((G @ Xsq).toarray())
    else:
        Xf = np.asarray(X, dtype=np.float64)
        Xsq = np.asarray(X_squared, dtype=np.float64) if X_squared is not None else Xf * Xf
        s, q = np.asarray(G @ Xf), np.asarray(G @ Xsq)
    if out is None:
        return s, q
    out_sum += s
    out_sq += q
    return out_sum, out_sq


def welch_from_moments(s_h, q_h, p_s, p_q, inverse, e_s, e_q, n_h, n_l, guard):
    """Means, variances, guarded Welch t, df and the tested mask from group sums, in one compiled pass.

    Returns ``None`` when numba is unavailable (the caller then uses its numpy path). ``p_s``/``p_q``
    are low-group prefix sums shared between features (``inverse`` picks the row of each feature),
    ``e_s``/``e_q`` the sums over the cells excluded from each prefix.
    """
    kernels = _numba_kernels()
    if kernels is None:
        return None
    shape = s_h.shape
    outs = [np.empty(shape) for _ in range(6)] + [np.empty(shape, dtype=np.bool_)]
    kernels[2](np.ascontiguousarray(s_h), np.ascontiguousarray(q_h), np.ascontiguousarray(p_s),
               np.ascontiguousarray(p_q), np.asarray(inverse, dtype=np.int64), np.ascontiguousarray(e_s),
               np.ascontiguousarray(e_q), np.asarray(n_h, dtype=np.int64), np.asarray(n_l, dtype=np.int64),
               GUARD_CODES[guard], *outs)
    return tuple(outs)


# ------------------------------------------------------------------------------------- count splitting
# Binomial(c, 1/2) is the number of ones among c fair random bits. One uniform float64 from numpy's
# generator carries 52 random bits (the mantissa of u * 2**52), so counts up to 52 take one uniform each;
# larger counts take a numpy binomial draw. Both engines compute exactly the same integers.
HALF_BITS = 52


@functools.lru_cache(maxsize=1)
def _thinning_kernel():
    try:
        import numba
    except ImportError:  # pragma: no cover
        return None

    @numba.njit(cache=True, nogil=True)
    def thin(counts, uniforms, large_draws, out, complement):  # pragma: no cover - compiled
        j = 0
        for i in range(len(counts)):
            c = np.int64(counts[i])
            if c > 52:
                a = large_draws[j]
                j += 1
            else:
                bits = np.int64(uniforms[i] * 4503599627370496.0) & ((np.int64(1) << c) - 1)
                # popcount (SWAR)
                bits = bits - ((bits >> 1) & 0x5555555555555555)
                bits = (bits & 0x3333333333333333) + ((bits >> 2) & 0x3333333333333333)
                bits = (bits + (bits >> 4)) & 0x0F0F0F0F0F0F0F0F
                a = (bits * 0x0101010101010101) >> 56 & 0xFF
            out[i] = c - a if complement else a
        return 0

    try:
        thin(np.ones(2), np.full(2, 0.5), np.zeros(0, dtype=np.int64), np.zeros(2, dtype=np.float32), False)
    except Exception as err:  # pragma: no cover - broken toolchain: the numpy path gives the same draws
        warnings.warn(f"numba thinning kernel unavailable ({err}); using numpy.", stacklevel=2)
        return None
    return thin


def binomial_half(rng: np.random.Generator, counts: np.ndarray, buffer: np.ndarray | None = None, *,
                  out: np.ndarray | None = None, complement: bool = False) -> np.ndarray:
    """``Binomial(c, 1/2)`` for every count ``c`` (non-negative integers), drawn from ``rng``: one uniform
    per count (its 52 mantissa bits, popcount of the lowest ``c``), then numpy's binomial for counts above
    52, in that order.

    Parameters
    ----------
    rng
        The generator to draw from.
    counts
        Non-negative integer counts (any numeric dtype).
    buffer
        Optional float64 scratch of at least ``len(counts)`` for the uniforms.
    out
        Optional array to write into (default: a new float32 array).
    complement
        Write ``c - draw`` (the other half) instead of the draw.

    Returns
    -------
    numpy.ndarray
        The draws (or their complements), one per count.
    """
    n = len(counts)
    uniforms = rng.random(out=buffer[:n]) if buffer is not None and len(buffer) >= n else rng.random(n)
    large = counts > HALF_BITS
    large_draws = rng.binomial(counts[large].astype(np.int64), 0.5) if large.any() else np.zeros(0, np.int64)
    out = np.empty(n, dtype=np.float32) if out is None else out
    kernel = _thinning_kernel()
    if kernel is not None:
        kernel(counts, uniforms, large_draws, out, complement)
        return out
    small = ~large
    c = np.asarray(counts, dtype=np.int64)
    bits = (uniforms[small] * 4503599627370496.0).astype(np.int64).astype(np.uint64)
    draws = np.empty(n, dtype=np.int64)
    draws[small] = np.bitwise_count(bits & ((np.uint64(1) << c[small].astype(np.uint64)) - np.uint64(1)))
    draws[large] = large_draws
    out[:] = c - draws if complement else draws
    return out
