"""Block encodings of flat float32 vectors: each returns (decoded values, encoded bytes).

All arithmetic that mirrors src/encoding.rs (q8, q4) is done in float32 with ties-to-even
rounding (np.rint); the new low-bit encodings pick their scales by (squared-error) search.
A partial last block is padded with zeros (padding never changes a block's max |x| or its
MSE-optimal choice; the padded codes are dropped on decode).
"""

import numpy as np

F32 = np.float32


def blocks(x, b):
    """x (flat f32) as an [n_blocks, b] array, zero-padded; and the original length."""
    n = x.size
    nb = -(-n // b)
    pad = np.zeros(nb * b, F32)
    pad[:n] = x
    return pad.reshape(nb, b), n


def unblock(y, n):
    return y.reshape(-1)[:n]


def symmetric(x, b, q_max):
    """src/encoding.rs `quantize`: s = max|x| / q_max, q = round_ties_even(x / s) clamped."""
    xb, n = blocks(x, b)
    s = (np.abs(xb).max(1, keepdims=True) / F32(q_max)).astype(F32)
    safe = np.where(s == 0, F32(1), s)
    q = np.clip(np.rint(xb / safe), -q_max, q_max).astype(F32)
    q[(s == 0)[:, 0]] = 0
    return unblock(q * s, n)


def q8(x):
    """Blocks of 64: f32 scale + 64 int8 codes = 68 bytes (8.5 bits/weight)."""
    return symmetric(x, 64, 127.0), -(-x.size // 64) * 68


def q4(x):
    """Blocks of 32: f32 scale + 16 bytes of int4 codes = 20 bytes (5 bits/weight)."""
    return symmetric(x, 32, 7.0), -(-x.size // 32) * 20


def grid_search(xb, levels_lo, levels_hi, cands):
    """Per block, the scale among `cands` ([n_blocks, C]) minimising the squared error of
    q = clip(round(x / s), lo, hi); returns the decoded block values."""
    best = np.zeros_like(xb)
    best_err = np.full(xb.shape[0], np.inf, np.float64)
    for j in range(cands.shape[1]):
        s = cands[:, j:j + 1].astype(F32)
        safe = np.where(s == 0, F32(1), s)
        y = np.clip(np.rint(xb / safe), levels_lo, levels_hi).astype(F32) * s
        err = ((y - xb).astype(np.float64) ** 2).sum(1)
        better = err < best_err
        best[better] = y[better]
        best_err[better] = err[better]
    return best


GRID = np.arange(1.0, 0.5 - 1e-9, -0.05)  # c = 1.0, 0.95, ..., 0.5


def q3(x):
    """Blocks of 64, codes -3..3 (3 bits each), s = c · max|x| / 3 with the MSE-best c in
    GRID: 4 + 24 = 28 bytes per block (3.5 bits/weight)."""
    xb, n = blocks(x, 64)
    m = np.abs(xb).max(1, keepdims=True)
    cands = m * (GRID[None, :] / 3.0)
    return unblock(grid_search(xb, -3, 3, cands), n), -(-x.size // 64) * 28


def q2(x):
    """Blocks of 64, 4 levels {-2,-1,0,1}·s (2 bits each); the sign of s is free, so the
    levels are effectively {-2,-1,0,1} or {-1,0,1,2}·|s|; |s| = c · max|x| / 2, c in GRID,
    MSE-best over both signs: 4 + 16 = 20 bytes per block (2.5 bits/weight)."""
    xb, n = blocks(x, 64)
    m = np.abs(xb).max(1, keepdims=True)
    pos = m * (GRID[None, :] / 2.0)
    cands = np.concatenate([pos, -pos], 1)
    return unblock(grid_search(xb, -2, 1, cands), n), -(-x.size // 64) * 20


def ternary_rows(xb):
    """MSE-optimal ternary per row of xb: the k largest |x| (k maximising (Σ|x|)² / k) get
    sign(x) · s with s = their mean |x|, the rest 0."""
    a = np.abs(xb)
    order = np.argsort(-a, axis=1, kind="stable")
    sa = np.take_along_axis(a, order, 1).astype(np.float64)
    c = np.cumsum(sa, 1)
    k = np.arange(1, xb.shape[1] + 1)
    kbest = np.argmax(c * c / k, 1)  # index, so k = kbest + 1
    s = (c[np.arange(len(c)), kbest] / (kbest + 1)).astype(F32)[:, None]
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(xb.shape[1]), order.shape), 1)
    keep = rank <= kbest[:, None]
    return np.where(keep, np.sign(xb).astype(F32) * s, F32(0))


def ternary_block(b):
    """Ternary in blocks of b: 2-bit codes + an f32 scale, (b/4 + 4) bytes per block."""
    def enc(x):
        xb, n = blocks(x, b)
        out = np.empty_like(xb)
        step = max(1, (1 << 22) // b)  # bound the memory of the argsort
        for i in range(0, len(xb), step):
            out[i:i + step] = ternary_rows(xb[i:i + step])
        return unblock(out, n), -(-x.size // b) * (b // 4 + 4)
    return enc


def ternary_row(x, shape):
    """Ternary with one scale per row (slice along the first axis; a 1-D tensor is one row):
    2 bits per element + 4 bytes per row."""
    rows = shape[0] if len(shape) >= 2 else 1
    xb = x.reshape(rows, -1)
    return ternary_rows(xb).reshape(-1), rows * 4 + -(-x.size * 2 // 8)


def switch_row(x, shape):
    """T-Switch's sparse sign module: the MSE-optimal ternary per row (as `ternary_row`),
    stored sparse: a bit per weight for "moves", a sign bit per moving weight, an f32
    magnitude per row."""
    rows = shape[0] if len(shape) >= 2 else 1
    dec = ternary_rows(x.reshape(rows, -1)).reshape(-1)
    moving = int(np.count_nonzero(dec))
    return dec, -(-x.size // 8) + -(-moving // 8) + rows * 4


def identity(x):
    return x.copy(), x.size * 4


# name -> function(flat f32, shape) -> (decoded, bytes)
ENCODINGS = {
    "identity": lambda x, shape: identity(x),
    "q8": lambda x, shape: q8(x),
    "q4": lambda x, shape: q4(x),
    "q3": lambda x, shape: q3(x),
    "ternary-64": lambda x, shape: ternary_block(64)(x),
    "ternary-128": lambda x, shape: ternary_block(128)(x),
    "ternary-row": ternary_row,
    "switch-row": switch_row,
    "q2": lambda x, shape: q2(x),
}


def small_in_q8(enc, min_elements=4096):
    """`enc` for tensors of ≥ min_elements elements, q8 for the smaller ones (biases,
    normalization weights, small convolutions), as taskpack's size rule for block storage."""
    def hybrid(x, shape):
        return enc(x, shape) if x.size >= min_elements else q8(x)
    return hybrid


for _name in ["ternary-64", "ternary-128", "ternary-row", "switch-row", "q2", "q3"]:
    ENCODINGS[_name + "-q8small"] = small_in_q8(ENCODINGS[_name])
