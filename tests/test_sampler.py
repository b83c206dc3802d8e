"""Sampler spec v1: known-answer vectors of docs/SAMPLER.md, checked two ways.

Every table in docs/SAMPLER.md is parsed from the markdown itself and each row is
checked against ``ivp.protocol.sampler`` (vectorised numpy) and against ``Ref`` below,
an independent scalar pure-Python implementation written from the doc's text. The
Random123 vectors are also pinned in this file, so editing the doc cannot weaken them.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ivp.protocol.messages import SamplingParams
from ivp.protocol.sampler import (
    allowed_set,
    choose,
    gumbel,
    gumbel_at,
    gumbel_keyed,
    philox4x32_10,
    ranked,
    seed_key,
    top_ranked,
    uniforms,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "SAMPLER.md"
MASK32 = 0xFFFFFFFF


# --- an independent scalar implementation, from the text of docs/SAMPLER.md ------------
def ref_philox(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, ...]:
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        p0 = 0xD2511F53 * c0
        p1 = 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (
            ((p1 >> 32) ^ c1 ^ k0) & MASK32,
            p1 & MASK32,
            ((p0 >> 32) ^ c3 ^ k1) & MASK32,
            p0 & MASK32,
        )
        k0 = (k0 + 0x9E3779B9) & MASK32
        k1 = (k1 + 0xBB67AE85) & MASK32
    return c0, c1, c2, c3


def ref_word(seed: int, i: int, t: int) -> int:
    return ref_philox((i >> 2, t, 0, 0), (seed & MASK32, seed >> 32))[i & 3]


def ref_u(seed: int, i: int, t: int) -> float:
    return (ref_word(seed, i, t) + 0.5) / 2**32


def ref_g(seed: int, i: int, t: int) -> float:
    return -math.log(-math.log(ref_u(seed, i, t)))


def ref_allowed(z: list[float], temperature: float, top_k: int, top_p: float) -> list[int]:
    order = sorted(range(len(z)), key=lambda i: (-z[i], i))
    k = top_k if 0 < top_k < len(z) else len(z)
    order = order[:k]
    if top_p < 1.0:
        top = z[order[0]] / temperature
        e = {o: math.exp(z[o] / temperature - top) for o in order}
        total = 0.0
        for o in sorted(order):  # S: ascending token-id order
            total += e[o]
        run, n = 0.0, k
        for j, o in enumerate(order):  # running sum in rank order, then one division
            run += e[o]
            if run / total >= top_p:
                n = j + 1
                break
        order = order[:n]
    return sorted(order)


def ref_choose(z: list[float], seed: int, t: int, temperature: float, top_k: int,
               top_p: float) -> int:
    if temperature == 0:
        return max(range(len(z)), key=lambda i: (z[i], -i))
    best, best_score = -1, -math.inf
    for i in ref_allowed(z, temperature, top_k, top_p):
        s = z[i] / temperature + ref_g(seed, i, t)
        if s > best_score:  # strict: on equal scores the lower id (seen first) stays
            best, best_score = i, s
    return best


def finite(z: list[float], ids: list[int]) -> list[int]:
    return [i for i in ids if math.isfinite(z[i])]


# --- parsing the doc's tables ------------------------------------------------------------
def table(name: str) -> list[list[str]]:
    text = DOC.read_text()
    m = re.search(rf"<!-- vectors:{name} -->\n(.*?)<!-- /vectors:{name} -->", text, re.DOTALL)
    assert m, f"docs/SAMPLER.md has no {name} table"
    lines = [ln for ln in m.group(1).strip().splitlines() if ln.startswith("|")]
    rows = [[c.strip().strip("`*").strip() for c in ln.strip("|").split("|")] for ln in lines]
    assert set(rows[1][0]) <= set("-:"), "second line of a table is the separator"
    return rows[2:]


def words(cell: str) -> tuple[int, ...]:
    return tuple(int(w, 16) for w in cell.split())


def floats(cell: str) -> list[float]:
    return [float(x) for x in cell.strip("[]").split(",")]


def ints(cell: str) -> list[int]:
    return [int(x) for x in cell.strip("[]").split(",")]


PHILOX_ROWS = table("philox")
NOISE_ROWS = table("noise")
SAMPLER_ROWS = table("sampler")
SEQUENCE_ROWS = table("sequence")


def test_doc_has_every_table_filled() -> None:
    assert len(PHILOX_ROWS) == 3
    assert len(NOISE_ROWS) >= 10
    assert len(SAMPLER_ROWS) >= 20
    assert len(SEQUENCE_ROWS) >= 3
    names = {r[0] for r in SAMPLER_ROWS}
    for needed in ("greedy", "greedy-tie", "temp-1", "top-k-tie", "top-p-half",
                   "top-p-min-one", "top-p-tie-cut", "top-k-then-p"):
        assert needed in names


# --- Philox4x32-10 -------------------------------------------------------------------------
# Random123 kat_vectors (philox4x32 10), pinned here independently of the doc.
RANDOM123 = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MASK32,) * 4, (MASK32, MASK32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize(("counter", "key", "out"), RANDOM123)
def test_philox_random123_kat(counter: tuple, key: tuple, out: tuple) -> None:
    assert ref_philox(counter, key) == out
    got = philox4x32_10(np.array([counter], dtype=np.uint32), key)
    assert tuple(int(w) for w in got[0]) == out


@pytest.mark.parametrize("row", PHILOX_ROWS, ids=lambda r: r[0][:8])
def test_philox_doc_table(row: list[str]) -> None:
    counter, key, out = words(row[0]), words(row[1]), words(row[2])
    assert (counter, key, out) in RANDOM123, "the doc must show the published vectors"
    got = philox4x32_10(np.array([counter], dtype=np.uint32), (key[0], key[1]))
    assert tuple(int(w) for w in got[0]) == out


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(*[st.integers(0, MASK32)] * 4), min_size=1, max_size=8),
    st.integers(0, MASK32), st.integers(0, MASK32),
)
def test_philox_vectorised_matches_scalar(counters: list, k0: int, k1: int) -> None:
    got = philox4x32_10(np.array(counters, dtype=np.uint32), (k0, k1))
    for c, out in zip(counters, got, strict=True):
        assert tuple(int(w) for w in out) == ref_philox(c, (k0, k1))


# --- derived noise -------------------------------------------------------------------------
def close(a: float, b: float, ulps: int = 4) -> bool:
    return abs(a - b) <= ulps * math.ulp(max(abs(a), abs(b)))


@pytest.mark.parametrize("row", NOISE_ROWS, ids=lambda r: f"{r[0]}-{r[1]}-{r[2]}")
def test_noise_doc_table(row: list[str]) -> None:
    seed, i, t = int(row[0], 16), int(row[1]), int(row[2])
    key, counter, word = words(row[3]), words(row[4]), int(row[5], 16)
    u, g = float(row[6]), float(row[7])
    assert seed_key(seed) == key == (seed & MASK32, seed >> 32)
    assert counter == (i >> 2, t, 0, 0)
    assert ref_philox(counter, key)[i & 3] == word == ref_word(seed, i, t)
    # u is exact arithmetic: bit-for-bit in every implementation.
    assert ref_u(seed, i, t) == u == float(uniforms(seed, t, i + 1)[i])
    # g goes through libm's log: equal to within a few ulps.
    assert close(ref_g(seed, i, t), g)
    assert close(float(gumbel(seed, t, i + 1)[i]), g)


def test_noise_row_is_independent_of_vocab_size() -> None:
    """Index i draws the same noise whatever V is: padding never shifts the stream."""
    for v in (1, 3, 4, 5, 17):
        np.testing.assert_array_equal(gumbel(99, 5, v), gumbel(99, 5, 40)[:v])


def test_seed_key_range() -> None:
    assert seed_key(0) == (0, 0)
    assert seed_key(2**64 - 1) == (MASK32, MASK32)
    assert seed_key(0x0000000100000002) == (2, 1)
    for bad in (-1, 2**64):
        with pytest.raises(ValueError):
            seed_key(bad)


def test_uniforms_extremes_stay_inside_open_interval() -> None:
    u = uniforms(0xFFFFFFFFFFFFFFFF, 0, 4096)
    assert np.all((u > 0) & (u < 1))
    assert (0 + 0.5) / 2**32 == 2.0**-33  # the smallest possible u: g finite
    assert math.isfinite(-math.log(-math.log(2.0**-33)))
    assert math.isfinite(-math.log(-math.log((MASK32 + 0.5) / 2**32)))


# --- end-to-end sampler vectors ------------------------------------------------------------
@pytest.mark.parametrize("row", SAMPLER_ROWS, ids=lambda r: r[0])
def test_sampler_doc_table(row: list[str]) -> None:
    _, zc, tc, kc, pc, sc, tpos, ac, tokc, _why = row
    z, temp, k, top_p = floats(zc), float(tc), int(kc), float(pc)
    seed, t, token = int(sc, 16), int(tpos), int(tokc)
    params = SamplingParams(temperature=temp, top_k=k, top_p=top_p)
    if temp > 0:
        want = ints(ac)
        assert finite(z, [int(a) for a in allowed_set(np.array(z), params)]) == finite(z, want)
        assert finite(z, ref_allowed(z, temp, k, top_p)) == finite(z, want)
    else:
        assert ac == "—"
    assert choose(np.array(z), seed, t, params) == token
    assert ref_choose(z, seed, t, temp, k, top_p) == token
    # float32 logits (as an engine holds them) give the same choice: exact widening
    assert choose(np.array(z, dtype=np.float32), seed, t, params) == token


@pytest.mark.parametrize("row", SEQUENCE_ROWS, ids=lambda r: r[0])
def test_sequence_doc_table(row: list[str]) -> None:
    _, zc, tc, kc, pc, sc, tokc = row
    z, temp, k, top_p, seed = floats(zc), float(tc), int(kc), float(pc), int(sc, 16)
    tokens = ints(tokc)
    params = SamplingParams(temperature=temp, top_k=k, top_p=top_p)
    assert [choose(np.array(z), seed, t, params) for t in range(len(tokens))] == tokens
    assert [ref_choose(z, seed, t, temp, k, top_p) for t in range(len(tokens))] == tokens


def test_doc_rows_illustrate_their_rule() -> None:
    """The searched-for seeds really show the rule doing work (else the row is vacuous)."""
    rows = {r[0]: r for r in SAMPLER_ROWS}

    def g(name: str) -> np.ndarray:
        r = rows[name]
        return gumbel(int(r[5], 16), int(r[6]), len(floats(r[1])))

    z = np.array(floats(rows["top-k-tie"][1]))
    assert int(np.argmax(z + g("top-k-tie"))) == 3  # unfiltered, the excluded tie wins
    assert int(np.argmax(g("top-p-tie-cut"))) == 2  # the dropped tie has the largest g
    assert int(np.argmax(g("top-p-half"))) >= 2
    gp = g("temp-pad")
    assert int(np.argmax(gp)) in (2, 3)  # a padded index has the largest noise
    assert rows["top-p-T1"][5] == rows["top-p-T4"][5]
    assert (rows["top-p-T1"][8], rows["top-p-T4"][8]) == ("0", "1")


# --- the rules, reasoned by hand (independent of any table) -------------------------------
def P(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> SamplingParams:
    return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)


def test_ranking_breaks_ties_to_lower_id() -> None:
    assert ranked(np.array([1.0, 3.0, 3.0, 2.0, 3.0])).tolist() == [1, 2, 4, 3, 0]


def test_greedy_tie_goes_to_lower_id() -> None:
    z = np.array([0.0, 5.0, 5.0, 5.0])
    for seed in range(5):
        assert choose(z, seed, 0, P(0.0)) == 1


def test_top_k_tie_at_cut_keeps_lower_ids() -> None:
    z = np.array([1.0, 2.0, 2.0, 2.0])
    assert allowed_set(z, P(top_k=2)).tolist() == [1, 2]
    assert allowed_set(z, P(top_k=1)).tolist() == [1]


def test_top_p_uniform_cut_points() -> None:
    z = np.zeros(4)  # p = 1/4 each, exactly
    assert allowed_set(z, P(top_p=0.25)).tolist() == [0]  # reaches 0.25 at once
    assert allowed_set(z, P(top_p=0.26)).tolist() == [0, 1]
    assert allowed_set(z, P(top_p=0.5)).tolist() == [0, 1]  # "reaches" = >=
    assert allowed_set(z, P(top_p=0.75)).tolist() == [0, 1, 2]
    assert allowed_set(z, P(top_p=0.9)).tolist() == [0, 1, 2, 3]


def test_top_p_always_keeps_one_token() -> None:
    z = np.array([0.0, 9.0, 1.0])
    assert allowed_set(z, P(top_p=1e-12)).tolist() == [1]
    for seed in range(20):
        assert choose(z, seed, 0, P(top_p=1e-12)) == 1


def test_top_p_applies_to_renormalised_top_k() -> None:
    z = np.zeros(4)
    assert allowed_set(z, P(top_k=2, top_p=0.5)).tolist() == [0]  # 1/2 each after top-2
    assert allowed_set(z, P(top_k=0, top_p=0.5)).tolist() == [0, 1]  # 1/4 each


def test_top_p_depends_on_temperature() -> None:
    z = np.array([1.0, 0.0])  # p0 = 0.731 at T = 1, 0.562 at T = 4
    assert allowed_set(z, P(1.0, top_p=0.7)).tolist() == [0]
    assert allowed_set(z, P(4.0, top_p=0.7)).tolist() == [0, 1]
    assert allowed_set(z, P(0.25, top_p=0.98)).tolist() == [0]  # p0 = 0.982 at T = 1/4
    assert allowed_set(z, P(0.25, top_p=0.99)).tolist() == [0, 1]


def test_top_p_tie_straddling_cut_drops_higher_id() -> None:
    z = np.array([0.0, 2.0, 2.0, 2.0])  # three ties at ~0.32 each
    assert allowed_set(z, P(top_p=0.5)).tolist() == [1, 2]


def test_padded_rows_never_win() -> None:
    z = np.array([0.0, -np.inf, 0.0, -np.inf])
    for seed in range(50):
        for params in (P(), P(top_k=3), P(top_p=0.99), P(0.0), P(100.0)):
            assert choose(z, seed, 3, params) in (0, 2)


def test_temperature_extremes() -> None:
    z = np.array([0.0, 1.0, 2.0, 3.0])
    for seed in range(50):
        assert choose(z, seed, 0, P(0.01)) == 3  # gaps of 100 beat any noise
    hot = Counter(choose(z, seed, 0, P(100.0)) for seed in range(400))
    assert len(hot) == 4  # at T = 100 every token occurs


def test_gumbel_max_samples_softmax() -> None:
    """For T > 0 the rule is a sampler of softmax(z/T) on A(z): frequencies agree."""
    z = np.array([0.0, 1.0, 2.0, -1.0])
    n = 4000
    counts = Counter(choose(z, seed, 0, P(1.0)) for seed in range(n))
    p = np.exp(z) / np.exp(z).sum()
    for i in range(4):
        sd = math.sqrt(n * p[i] * (1 - p[i]))
        assert abs(counts[i] - n * p[i]) < 5 * sd, (i, counts, p)
    # restricted to A(z): top-k 2 renormalises over tokens 2 and 1
    counts = Counter(choose(z, seed, 7, P(1.0, top_k=2)) for seed in range(n))
    assert set(counts) == {1, 2}
    p2 = math.exp(2) / (math.exp(1) + math.exp(2))
    assert abs(counts[2] - n * p2) < 5 * math.sqrt(n * p2 * (1 - p2))


logit_rows = st.lists(
    st.one_of(st.floats(-30, 30, allow_nan=False), st.just(-math.inf)), min_size=1, max_size=12
).filter(lambda z: any(math.isfinite(x) for x in z))


@settings(max_examples=150, deadline=None)
@given(
    logit_rows, st.integers(0, 2**64 - 1), st.integers(0, 100),
    st.sampled_from([0.0, 0.25, 0.7, 1.0, 2.0]), st.integers(0, 5),
    st.sampled_from([1e-6, 0.3, 0.5, 0.9, 1.0]),
)
def test_choice_properties(z: list[float], seed: int, t: int, temperature: float, top_k: int,
                           top_p: float) -> None:
    params = P(temperature, top_k, top_p)
    row = np.array(z)
    tok = choose(row, seed, t, params)
    assert math.isfinite(z[tok])
    assert tok == ref_choose(z, seed, t, temperature, top_k, top_p)
    if temperature == 0:
        assert tok == int(np.argmax(row))
    else:
        allowed = allowed_set(row, params)
        assert tok in allowed.tolist()
        assert finite(z, allowed.tolist()) == finite(z, ref_allowed(z, temperature, top_k,
                                                                   top_p))
        if top_k == 1:
            assert tok == int(np.argmax(row))


# --- the reference's fast paths agree with the plain definitions -------------------------
@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**64 - 1), st.integers(0, 5000),
       st.lists(st.integers(0, 300), min_size=1, max_size=40))
def test_gumbel_at_equals_gumbel_row(seed: int, t: int, ids: list[int]) -> None:
    """Unsorted and repeated ids included."""
    row = gumbel(seed, t, 301)
    np.testing.assert_array_equal(gumbel_at(seed, t, np.array(ids)), row[ids])


_values = st.one_of(st.integers(-3, 3).map(float), st.floats(-5, 5), st.just(-math.inf))
tied_rows = st.one_of(
    st.lists(_values, min_size=1, max_size=300),
    # long rows (past the first 256-token window) made of a short pattern: many ties
    st.tuples(st.lists(_values, min_size=1, max_size=12), st.integers(20, 60)).map(
        lambda a: a[0] * a[1]),
).filter(lambda z: any(math.isfinite(x) for x in z))


@given(st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1),
                          st.integers(0, 2**31 - 1)), min_size=1, max_size=40))
@settings(max_examples=100, deadline=None)
def test_gumbel_keyed_equals_gumbel_at_per_entry(entries: list[tuple[int, int, int]]) -> None:
    """Many (seed, position, id) at once: each value is gumbel_at's, bit for bit."""
    seeds, positions, ids = (np.array(c, dtype=np.uint64 if n == 0 else np.int64)
                             for n, c in enumerate(zip(*entries, strict=True)))
    expected = [gumbel_at(int(s), int(t), np.array([i]))[0] for s, t, i in entries]
    np.testing.assert_array_equal(gumbel_keyed(seeds, positions, ids), expected)


@settings(max_examples=100, deadline=None)
@given(tied_rows, st.integers(1, 800))
def test_top_ranked_is_prefix_of_ranked(z: list[float], m: int) -> None:
    row = np.array(z)
    np.testing.assert_array_equal(top_ranked(row, m), ranked(row)[:m])


@settings(max_examples=100, deadline=None)
@given(tied_rows, st.sampled_from([0, 1, 5, 300, 1000]),
       st.sampled_from([0.05, 0.5, 0.9, 0.999, 1.0]), st.sampled_from([0.3, 1.0, 4.0]))
def test_allowed_set_on_long_rows(z: list[float], top_k: int, top_p: float,
                                  temperature: float) -> None:
    """Rows past the reference's 256-token first window, with ties and padding."""
    got = allowed_set(np.array(z), P(temperature, top_k, top_p)).tolist()
    assert finite(z, got) == finite(z, ref_allowed(z, temperature, top_k, top_p))
