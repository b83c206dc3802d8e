"""Sampler spec v1: the contract between every serving engine and the verifier.

Given the logits row ``z`` at generated position ``t`` and the gateway's 64-bit seed
``s``, the token is a pure function of (z, s, t, params). docs/SAMPLER.md restates
this with known-answer vectors. In short:

* Philox4x32-10 with key ``(s & 0xFFFFFFFF, s >> 32)``.
* For vocabulary index i: counter = (i >> 2, t, 0, 0); word = output[i & 3];
  u_i = (word + 0.5) / 2^32;  g_i = -log(-log u_i)   (float64 Gumbel noise).
* Allowed set A(z): the top_k tokens by z (0 = all), then the smallest prefix, by
  descending softmax(z/T) over those, whose cumulative probability reaches top_p
  (at least one token). Ties go to the lower token id.
* T > 0: token = argmax_{i in A(z)} z_i/T + g_i.  T = 0: token = argmax_i z_i.

Everything here is a small pure numpy function; engines and verifier share them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ivp.protocol.messages import SamplingParams

_M0 = np.uint64(0xD2511F53)
_M1 = np.uint64(0xCD9E8D57)
_W0 = np.uint32(0x9E3779B9)
_W1 = np.uint32(0xBB67AE85)
_LO = np.uint64(0xFFFFFFFF)
_32 = np.uint64(32)


def philox4x32_10(counter: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """Philox4x32-10 (Salmon et al., SC11) over many counters at once.

    Args:
        counter: (N, 4) uint32 counters.
        key: two 32-bit key words.
    Returns:
        (N, 4) uint32 outputs.
    """
    assert counter.ndim == 2 and counter.shape[1] == 4
    words = _rounds(*(counter[:, j].astype(np.uint64) for j in range(4)), key=key)
    return np.stack(words, axis=1).astype(np.uint32)


def _rounds(c0: np.ndarray, c1: np.ndarray, c2: np.ndarray, c3: np.ndarray,
            key: tuple[int, int] | tuple[np.ndarray, np.ndarray]
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The ten Philox rounds on four uint64 arrays of 32-bit words, updated in place
    (products of two 32-bit words fit in 64 bits). The key words are two integers, or
    two uint32 arrays (one key per counter)."""
    k0, k1 = np.uint32(key[0]), np.uint32(key[1])
    p0, p1 = np.empty_like(c0), np.empty_like(c0)
    with np.errstate(over="ignore"):
        for r in range(10):
            if r:  # the key is bumped between rounds
                k0 = np.uint32(k0 + _W0)
                k1 = np.uint32(k1 + _W1)
            np.multiply(c0, _M0, out=p0)
            np.multiply(c2, _M1, out=p1)
            # (c0, c1, c2, c3) <- (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
            np.right_shift(p1, _32, out=c0)
            np.bitwise_xor(c0, c1, out=c0)
            np.bitwise_xor(c0, np.uint64(k0), out=c0)
            np.right_shift(p0, _32, out=c2)
            np.bitwise_xor(c2, c3, out=c2)
            np.bitwise_xor(c2, np.uint64(k1), out=c2)
            np.bitwise_and(p1, _LO, out=c1)
            np.bitwise_and(p0, _LO, out=c3)
    return c0, c1, c2, c3


def seed_key(seed: int) -> tuple[int, int]:
    if not 0 <= seed < 2**64:
        raise ValueError("seed must be a 64-bit unsigned integer")
    return seed & 0xFFFFFFFF, seed >> 32


def uniforms(seed: int, position: int, vocab_size: int) -> np.ndarray:
    """u_i in (0, 1) for every vocabulary index i at generated position ``position``."""
    blocks = (vocab_size + 3) // 4
    counter = np.zeros((blocks, 4), dtype=np.uint32)
    counter[:, 0] = np.arange(blocks, dtype=np.uint32)
    counter[:, 1] = np.uint32(position)
    words = philox4x32_10(counter, seed_key(seed)).reshape(-1)[:vocab_size]
    return _uniform(words)


def _uniform(words: np.ndarray) -> np.ndarray:
    """u = (w + 0.5) / 2^32 in (0, 1), float64, from 32-bit Philox output words."""
    return (words.astype(np.float64) + 0.5) / 2.0**32


def _gumbel(u: np.ndarray) -> np.ndarray:
    return -np.log(-np.log(u))


def gumbel(seed: int, position: int, vocab_size: int) -> np.ndarray:
    """g_i = -log(-log u_i), float64, shape (vocab_size,)."""
    return _gumbel(uniforms(seed, position, vocab_size))


def gumbel_at(seed: int, position: int, ids: np.ndarray) -> np.ndarray:
    """g_i for the given token ids only (same values as ``gumbel(...)[ids]``)."""
    ids = np.asarray(ids, dtype=np.int64)
    blocks, inverse = np.unique(ids >> 2, return_inverse=True)
    counter = np.zeros((blocks.shape[0], 4), dtype=np.uint32)
    counter[:, 0] = blocks.astype(np.uint32)
    counter[:, 1] = np.uint32(position)
    words = philox4x32_10(counter, seed_key(seed))[inverse, ids & 3]
    return _gumbel(_uniform(words))


def gumbel_pairs(seed: int, positions: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """g at (positions[k], ids[k]) for every k: many positions in one call, one counter
    per entry (for sparse ids; ``gumbel`` is cheaper for whole rows). Runs in chunks
    that stay in cache."""
    ids = np.asarray(ids, dtype=np.int64)
    positions = np.broadcast_to(np.asarray(positions, dtype=np.int64), ids.shape)
    key = seed_key(seed)
    words = np.empty(ids.shape[0], dtype=np.uint64)
    for start in range(0, ids.shape[0], _CHUNK):
        part = ids[start : start + _CHUNK]
        c0 = (part >> 2).astype(np.uint64)
        c1 = positions[start : start + _CHUNK].astype(np.uint64)
        out = np.stack(_rounds(c0, c1, np.zeros_like(c0), np.zeros_like(c0), key))
        words[start : start + _CHUNK] = out[part & 3, np.arange(part.shape[0])]
    return _gumbel(_uniform(words))


_CHUNK = 1 << 16


def gumbel_keyed(seeds: np.ndarray, positions: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """g at (seeds[k], positions[k], ids[k]) for every k: the noise of many requests in
    one call (an engine choosing for a whole batch); the values of ``gumbel_at``."""
    ids = np.asarray(ids, dtype=np.int64)
    seeds = np.broadcast_to(np.asarray(seeds, dtype=np.uint64), ids.shape)
    positions = np.broadcast_to(np.asarray(positions, dtype=np.int64), ids.shape)
    words = np.empty(ids.shape[0], dtype=np.uint64)
    for start in range(0, ids.shape[0], _CHUNK):
        part = slice(start, start + _CHUNK)
        s = seeds[part]
        key = ((s & _LO).astype(np.uint32), (s >> _32).astype(np.uint32))
        c0 = (ids[part] >> 2).astype(np.uint64)
        out = np.stack(_rounds(c0, positions[part].astype(np.uint64), np.zeros_like(c0),
                               np.zeros_like(c0), key))
        words[part] = out[ids[part] & 3, np.arange(c0.shape[0])]
    return _gumbel(_uniform(words))


# Every g lies in [G_MIN, G_MAX]: the noise of the smallest and largest 32-bit word,
# computed as the spec computes every g.
G_MIN, G_MAX = (float(g) for g in _gumbel(_uniform(np.array([0, 2**32 - 1], np.uint64))))


def ranked(z: np.ndarray) -> np.ndarray:
    """Token ids by descending z, ties to the lower id (stable sort)."""
    return np.argsort(-z, kind="stable")


def top_ranked(z: np.ndarray, m: int) -> np.ndarray:
    """The first ``m`` ids of :func:`ranked` without sorting the whole row.

    Every id whose logit reaches the m-th largest value is a candidate (ties
    included), so a stable sort of the candidates gives exactly ranked(z)[:m].
    """
    vocab = z.shape[0]
    if m >= vocab:
        return ranked(z)
    threshold = np.partition(z, vocab - m)[vocab - m]  # the m-th largest value
    candidates = np.flatnonzero(z >= threshold)  # ascending ids
    return candidates[np.argsort(-z[candidates], kind="stable")][:m]


Ranker = Callable[[np.ndarray, int], np.ndarray]  # top_ranked or an equal, faster one


def _nucleus(z: np.ndarray, k: int, top_p: float, temperature: float,
             ranker: Ranker = top_ranked) -> np.ndarray:
    """Smallest prefix of ranked(z)[:k] whose softmax(z/T) mass over those k reaches
    top_p (at least one token).

    w_i = exp(z_i/T - z_max/T); the normaliser sums w over the k tokens in ascending id
    order. Grows a ranked window instead of sorting the whole vocabulary.
    """
    vocab = z.shape[0]
    scaled = (z if k >= vocab else z[np.sort(ranker(z, k))]) / temperature  # ascending ids
    z_max = scaled.max()
    total = np.exp(scaled - z_max).sum()
    m = min(k, 256)
    while True:
        window = ranker(z, m)
        cum = np.cumsum(np.exp(z[window] / temperature - z_max)) / total
        if cum[-1] >= top_p or m >= k:
            n = int(np.searchsorted(cum, top_p, side="left")) + 1
            return window[: min(n, m)]
        m = min(k, 4 * m)


def allowed_set(z: np.ndarray, params: SamplingParams, ranker: Ranker = top_ranked
                ) -> np.ndarray:
    """A(z): sorted token ids allowed by top_k then top_p. z: (V,) float64. ``ranker``
    must return what :func:`top_ranked` returns (an engine may pass a faster one)."""
    vocab = z.shape[0]
    k = params.top_k if 0 < params.top_k < vocab else vocab
    if k == vocab and (params.top_p >= 1.0 or params.temperature == 0):
        finite = np.isfinite(z)
        return np.arange(vocab) if finite.all() else np.flatnonzero(finite)
    if params.top_p < 1.0 and params.temperature > 0:
        return np.sort(_nucleus(z, k, params.top_p, params.temperature, ranker))
    return np.sort(ranker(z, k))


def choose(z: np.ndarray, seed: int, position: int, params: SamplingParams) -> int:
    """The token spec v1 picks at ``position`` from logits row ``z`` (any float dtype)."""
    z = np.asarray(z, dtype=np.float64)
    if params.temperature == 0:
        return int(np.argmax(z))  # argmax returns the first (lowest id) maximum
    allowed = allowed_set(z, params)
    scores = z[allowed] / params.temperature + gumbel_at(seed, position, allowed)
    return int(allowed[int(np.argmax(scores))])
