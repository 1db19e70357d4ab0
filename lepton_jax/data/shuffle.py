"""Grain's index shuffle, vectorised: the permutation ``grain.experimental.index_shuffle(i, max_index, seed, rounds)``
gives, computed for many indices at once with numpy.

Grain permutes ``[0, max_index]`` with a Simon-style Feistel cipher on blocks of ``B`` bits (``B`` = the bits of
``max_index`` rounded up to even, at least 16), round keys from ``std::seed_seq{seed}``, and cycle walking (re-encrypt
until the value is ``<= max_index``). Called once per index from Python it costs tens of microseconds (the key
schedule is rebuilt and, with 16-bit blocks over a small dataset, dozens of encryptions walked per index); here the
keys are made once and each round is one array operation, so an epoch's permutation costs about what one batch of
per-index calls did. The result is the same permutation, element for element (tests/test_data.py checks it against
Grain exhaustively), so the example order, and every number trained on it, is unchanged.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

_MASK32 = 0xFFFFFFFF
_MIN_BLOCK_BITS = 16


@lru_cache(maxsize=64)
def seed_seq_words(seed: int, count: int) -> tuple[int, ...]:
    """The ``count`` 32-bit words C++'s ``std::seed_seq{seed}.generate`` writes (the algorithm the C++ standard
    specifies, [rand.util.seedseq]): Grain's round keys."""
    n, s = count, 1
    words = [0x8B8B8B8B] * n
    t = 11 if n >= 623 else 7 if n >= 68 else 5 if n >= 39 else 3 if n >= 7 else (n - 1) // 2
    p, m = (n - t) // 2, max(s + 1, n)
    q = p + t

    def mix(x: int) -> int:
        return x ^ (x >> 27)

    for k in range(m):
        r1 = 1664525 * mix(words[k % n] ^ words[(k + p) % n] ^ words[(k - 1) % n]) & _MASK32
        r2 = (r1 + (s if k == 0 else k % n + seed if k <= s else k % n)) & _MASK32
        words[(k + p) % n] = (words[(k + p) % n] + r1) & _MASK32
        words[(k + q) % n] = (words[(k + q) % n] + r2) & _MASK32
        words[k % n] = r2
    for k in range(m, m + n):
        r3 = 1566083941 * mix((words[k % n] + words[(k + p) % n] + words[(k - 1) % n]) & _MASK32) & _MASK32
        r4 = (r3 - k % n) & _MASK32
        words[(k + p) % n] ^= r3
        words[(k + q) % n] ^= r4
        words[k % n] = r4
    return tuple(words)


def block_bits(max_index: int) -> int:
    """Grain's block size for ``[0, max_index]`` (its own formula, floating-point log included)."""
    bits = math.ceil(math.log2(max_index))
    return min(max(bits + bits % 2, _MIN_BLOCK_BITS), 64)


def _word_dtype(word_bits: int) -> type:
    return next(t for t in (np.uint8, np.uint16, np.uint32, np.uint64) if word_bits <= np.iinfo(t).bits)


def _round_function(x: np.ndarray, word_bits: int) -> np.ndarray:
    """The cipher's round function on words of ``word_bits`` held in ``x``'s dtype (the smallest that fits)."""
    dtype = x.dtype.type
    mask = (1 << word_bits) - 1
    wraps = word_bits == np.iinfo(dtype).bits  # the type's own overflow is the rotation's: no masking

    def rotl(x: np.ndarray, r: int) -> np.ndarray:
        r %= word_bits
        if not r:
            return x
        rotated = (x << dtype(r)) | (x >> dtype(word_bits - r))
        return rotated if wraps else rotated & dtype(mask)

    return (rotl(x, 1) & rotl(x, 8)) ^ rotl(x, 2)


def _encrypt(values: np.ndarray, keys: tuple[int, ...], word_bits: int) -> np.ndarray:
    """One pass of the cipher over ``values`` (uint64, each below ``2 ** (2 * word_bits)``; only the low
    ``2 * word_bits`` bits are read, as Grain's fixed-width words do). Each half is held in the smallest unsigned
    type that fits it (uint8 for Grain's 16-bit blocks: several times faster than uint64)."""
    dtype = _word_dtype(word_bits)
    mask = (1 << word_bits) - 1
    left = ((values >> np.uint64(word_bits)) & np.uint64(mask)).astype(dtype)
    right = (values & np.uint64(mask)).astype(dtype)
    for k1, k2 in zip(keys[0::2], keys[1::2], strict=True):
        left ^= _round_function(right, word_bits) ^ dtype(k1 & mask)
        right ^= _round_function(left, word_bits) ^ dtype(k2 & mask)
    return (left.astype(np.uint64) << np.uint64(word_bits)) | right.astype(np.uint64)


def _encrypt_block16(keys: tuple[int, ...]) -> np.ndarray:
    """``_encrypt`` of every value of a 16-bit block, as int32: with 8-bit halves the round function is a 256-entry
    table, so a round is two table lookups (about a third of the time of computing it)."""
    table = _round_function(np.arange(256, dtype=np.uint8), 8)
    left = np.repeat(np.arange(256, dtype=np.uint8), 256)
    right = np.tile(np.arange(256, dtype=np.uint8), 256)
    for k1, k2 in zip(keys[0::2], keys[1::2], strict=True):
        left ^= table[right] ^ np.uint8(k1 & 0xFF)
        right ^= table[left] ^ np.uint8(k2 & 0xFF)
    return (left.astype(np.int32) << 8) | right


def _check_rounds(rounds: int) -> None:
    if rounds < 4 or rounds % 2:
        raise ValueError(f"rounds must be an even integer >= 4, got {rounds}")


def index_shuffle(indices: np.ndarray, max_index: int, seed: int, rounds: int = 4) -> np.ndarray:
    """``[grain.experimental.index_shuffle(i, max_index, seed, rounds) for i in indices]`` as one int64 array."""
    indices = np.asarray(indices, dtype=np.int64)
    _check_rounds(rounds)
    if indices.size and (indices.min() < 0 or indices.max() > max_index):
        raise ValueError(f"indices must lie in [0, {max_index}]")
    if max_index == 0:
        return np.zeros_like(indices)
    keys, word_bits = seed_seq_words(int(seed) & _MASK32, rounds), block_bits(max_index) // 2
    out = _encrypt(indices.astype(np.uint64), keys, word_bits)
    walking = np.flatnonzero(out > np.uint64(max_index))
    while walking.size:  # cycle walking: the cipher permutes [0, 2**B); re-encrypt until inside [0, max_index]
        out[walking] = _encrypt(out[walking], keys, word_bits)
        walking = walking[out[walking] > np.uint64(max_index)]
    return out.astype(np.int64)


def permutation(num_examples: int, seed: int, rounds: int = 4) -> np.ndarray:
    """Position ``i`` of one epoch's order: ``index_shuffle(arange(num_examples), num_examples - 1, seed, rounds)``.

    Over a dataset much smaller than its block (Grain's 16-bit minimum: under about 8k examples) an index walks
    ``2**16 / num_examples`` encryptions on average and several times that at worst; there the whole block is
    encrypted once into a table, a few pointer-doubling passes over it make each entry skip ahead (``jump[x]``: the
    first value ``<= max_index`` within ``2**k`` steps of ``x``, or the ``2**k``-th step), and the walks from the
    epoch's indices then follow that table, only those still outside ``[0, max_index]`` at each step (2.2-2.5x
    less time than doubling alone at 150-8,000 examples: an ad-hoc interleaved timing; tests/test_data.py checks the
    result against Grain element for element)."""
    _check_rounds(rounds)
    max_index = num_examples - 1
    if max_index <= 0:
        return np.zeros(num_examples, np.int64)
    keys, bits = seed_seq_words(int(seed) & _MASK32, rounds), block_bits(max_index)
    if bits > _MIN_BLOCK_BITS or (1 << bits) <= 8 * num_examples:
        return index_shuffle(np.arange(num_examples), max_index, seed, rounds)
    jump = _encrypt_block16(keys)
    # each doubling pass costs a pass over the block; each one saves half the remaining walk steps, which cost a
    # numpy call each: worth it while the expected walk is long
    for _ in range(max(0, int(math.log2((1 << bits) / num_examples)) - 3)):
        jump = np.where(jump > max_index, jump[jump], jump)
    order = jump[:num_examples].copy()
    walking = np.flatnonzero(order > max_index)
    while walking.size:
        order[walking] = step = jump[order[walking]]
        walking = walking[step > max_index]
    return order.astype(np.int64)
