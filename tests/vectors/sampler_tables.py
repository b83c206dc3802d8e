"""Generate the known-answer tables of docs/SAMPLER.md from the implementation.

    .venv/bin/python tests/vectors/sampler_tables.py          # rewrite the tables in place
    .venv/bin/python tests/vectors/sampler_tables.py --check  # exit 1 if the doc is stale

Each table sits between ``<!-- vectors:NAME -->`` and ``<!-- /vectors:NAME -->`` in the
doc. tests/test_sampler.py parses the same tables back and checks every row against
``ivp.protocol.sampler`` *and* against an independent pure-Python implementation, so the
doc, the code and the spec cannot drift apart silently. Run this script only when the
spec itself changes (a new spec version), never to make a failing test pass.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ivp.protocol.messages import SamplingParams
from ivp.protocol.sampler import allowed_set, choose, gumbel, philox4x32_10, seed_key, uniforms

DOC = Path(__file__).resolve().parents[2] / "docs" / "SAMPLER.md"

# Random123 kat_vectors, philox4x32 with 10 rounds: counter[4] key[2] -> output[4].
PHILOX_KAT = [
    ("00000000 00000000 00000000 00000000", "00000000 00000000",
     "6627e8d5 e169c58d bc57ac4c 9b00dbd8"),
    ("ffffffff ffffffff ffffffff ffffffff", "ffffffff ffffffff",
     "408f276d 41c83b0e a20bc7c6 6d5451fd"),
    ("243f6a88 85a308d3 13198a2e 03707344", "a4093822 299f31d0",
     "d16cfe09 94fdcceb 5001e420 24126ea1"),
]

# (seed, i, t) for the derived-noise table.
NOISE_POINTS = [
    (0, 0, 0), (0, 1, 0), (0, 2, 0), (0, 3, 0), (0, 4, 0), (0, 5, 1),
    (1, 0, 0), (0x0000000100000002, 6, 3),
    (0x0123456789ABCDEF, 0, 0), (0x0123456789ABCDEF, 7, 2), (0x0123456789ABCDEF, 1000, 17),
    (0xDEADBEEFCAFEF00D, 151935, 4095), (0xDEADBEEFCAFEF00D, 262143, 65535),
    (0xFFFFFFFFFFFFFFFF, 3, 0), (0xFFFFFFFFFFFFFFFF, 262140, 1),
]

INF = math.inf


@dataclass(frozen=True)
class Case:
    """One end-to-end sampler vector. ``seed=None``: search for the first seed with
    ``want`` (a predicate over the Gumbel row), to illustrate a rule."""

    name: str
    z: tuple[float, ...]
    temperature: float
    top_k: int
    top_p: float
    seed: int | None
    t: int
    note: str
    want: str = ""


CASES = [
    Case("greedy", (0.5, 2.25, -1.0, 2.0), 0.0, 0, 1.0, 7, 0, "T = 0: argmax z, no noise"),
    Case("greedy-tie", (1.0, 3.0, 3.0, 2.0), 0.0, 0, 1.0, 7, 0,
         "tie between 1 and 2 goes to the lower id"),
    Case("greedy-pad", (-1.0, 0.5, -INF, -INF), 0.0, 0, 1.0, 7, 0,
         "padded rows hold -inf and never win"),
    Case("greedy-filters-ignored", (1.0, 3.0, 3.0, 2.0), 0.0, 1, 0.1, 7, 0,
         "T = 0 ignores top_k/top_p"),
    Case("temp-flat-t0", (0.0,) * 10, 1.0, 0, 1.0, 42, 0,
         "equal logits: argmax of the noise; V = 10 is not a multiple of 4"),
    Case("temp-flat-t1", (0.0,) * 10, 1.0, 0, 1.0, 42, 1, "same row, next position"),
    Case("temp-1", (0.0, 1.0, 2.0, 3.0), 1.0, 0, 1.0, 0x0123456789ABCDEF, 0, "z/T + g"),
    Case("temp-cold", (0.0, 1.0, 2.0, 3.0), 0.01, 0, 1.0, 0x0123456789ABCDEF, 0,
         "z/T gaps of 100 swamp any Gumbel value (-3.2 < g < 23)"),
    Case("temp-hot", (0.0, 1.0, 2.0, 3.0), 100.0, 0, 1.0, 0x0123456789ABCDEF, 0,
         "z/T gaps of 0.01: the noise decides"),
    Case("temp-pad", (0.0, 0.0, -INF, -INF, 0.0, 0.0), 1.0, 0, 1.0, None, 0,
         "first seed whose largest g is at a padded index: it still cannot win",
         want="pad"),
    Case("top-k-1", (0.1, 2.0, 1.0, 1.5), 1.0, 1, 1.0, 3, 0, "A = {1}: noise cannot matter"),
    Case("top-k-tie", (3.0, 1.0, 3.0, 3.0), 1.0, 2, 1.0, None, 0,
         "three-way tie for top-2 keeps the lower ids 0, 2; first seed where 3 would "
         "win unfiltered", want="k-tie"),
    Case("top-k-big", (0.0, 1.0, 2.0, 3.0), 1.0, 10, 1.0, 0x0123456789ABCDEF, 0,
         "top_k >= V keeps all (same as temp-1)"),
    Case("top-p-half", (0.0, 0.0, 0.0, 0.0), 1.0, 0, 0.5, None, 0,
         "p = 1/4 each; cumulative 0.25, 0.5 reaches 0.5; first seed where an "
         "excluded token has the largest g", want="p-half"),
    Case("top-p-exact", (0.0, 0.0, 0.0, 0.0), 1.0, 0, 0.75, 5, 0,
         "cumulative 0.75 reaches 0.75 exactly: 3 tokens"),
    Case("top-p-min-one", (0.0, 5.0, 1.0), 1.0, 0, 1e-9, 11, 0,
         "no prefix is needed to reach 1e-9, yet A holds at least one token"),
    Case("top-p-full", (0.0, 0.0, 0.0, 0.0), 1.0, 0, 1.0, 5, 0, "top_p = 1 keeps all"),
    Case("top-k-then-p", (0.0, 0.0, 0.0, 0.0), 1.0, 2, 0.5, 9, 0,
         "top-2 renormalised to 1/2 each: 0.5 reached by token 0 alone"),
    Case("top-p-T1", (1.0, 0.0), 1.0, 0, 0.7, None, 0,
         "p0 = e/(e+1) = 0.731 >= 0.7: A = {0}; first seed with g1 - g0 > 1, where 1 "
         "would win unfiltered", want="p-T"),
    Case("top-p-T4", (1.0, 0.0), 4.0, 0, 0.7, None, 0,
         "same seed; p0 = e^0.25/(e^0.25+1) = 0.562 < 0.7: A = {0, 1}", want="p-T"),
    Case("top-p-tie-cut", (2.0, 2.0, 2.0, 0.0), 1.0, 0, 0.5, None, 0,
         "tied 0, 1, 2 at p = 0.322 each: the cut keeps 0, 1 and drops the higher id 2; "
         "first seed where 2 has the largest g", want="p-tie"),
    Case("top-p-pad", (1.0, -INF, 0.5, -INF, 0.25), 0.5, 0, 0.9, 21, 0,
         "softmax(z/T) over a row with padding (p = 0 there)"),
]

SEQUENCES = [
    ("seq-a", (0.5, -0.25, 1.0, 0.0, 2.0, -1.0, 0.75, 1.5), 0.8, 5, 0.9, 0x0123456789ABCDEF, 16),
    ("seq-b", tuple(((i * 37) % 17) / 4 - 2.0 for i in range(32)), 1.0, 0, 1.0, 2**63 + 12345,
     16),
    ("seq-c", (0.0,) * 6 + (-INF, -INF), 0.7, 4, 0.8, 99, 16),
]


def params(c: Case) -> SamplingParams:
    return SamplingParams(temperature=c.temperature, top_k=c.top_k, top_p=c.top_p)


def _wanted(c: Case, seed: int) -> bool:
    z = np.array(c.z)
    g = gumbel(seed, c.t, len(z))
    top = int(np.argmax(g))
    if c.want == "pad":
        return not np.isfinite(z[top])
    if c.want == "k-tie":
        return int(np.argmax(z + g)) == 3
    if c.want == "p-half":
        return top >= 2
    if c.want == "p-T":
        return bool(g[1] - g[0] > 1.0)
    if c.want == "p-tie":
        return top == 2
    raise ValueError(c.want)


def resolve_seed(c: Case) -> int:
    if c.seed is not None:
        return c.seed
    return next(s for s in range(10_000) if _wanted(c, s))


def hex_words(a: np.ndarray) -> str:
    return " ".join(f"{int(w):08x}" for w in a)


def fmt_list(xs: tuple[float, ...] | list[int]) -> str:
    return "`[" + ", ".join(repr(x) for x in xs) + "]`"


def philox_table() -> str:
    rows = ["| counter (c0 c1 c2 c3) | key (k0 k1) | output (x0 x1 x2 x3) |", "|---|---|---|"]
    for ctr, key, out in PHILOX_KAT:
        c = np.array([[int(w, 16) for w in ctr.split()]], dtype=np.uint32)
        k = tuple(int(w, 16) for w in key.split())
        got = hex_words(philox4x32_10(c, (k[0], k[1]))[0])
        assert got == out, (ctr, key, got, out)
        rows.append(f"| `{ctr}` | `{key}` | `{out}` |")
    return "\n".join(rows)


def noise_table() -> str:
    rows = [
        "| seed s | i | t | key (k0 k1) | counter (c0 c1 c2 c3) | word | u_i | g_i |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for seed, i, t in NOISE_POINTS:
        k0, k1 = seed_key(seed)
        ctr = np.array([[i >> 2, t, 0, 0]], dtype=np.uint32)
        word = int(philox4x32_10(ctr, (k0, k1))[0, i & 3])
        u = float(uniforms(seed, t, i + 1)[i])
        g = float(gumbel(seed, t, i + 1)[i])
        rows.append(
            f"| `0x{seed:016x}` | {i} | {t} | `{k0:08x} {k1:08x}` | "
            f"`{hex_words(ctr[0])}` | `{word:08x}` | `{u!r}` | `{g!r}` |"
        )
    return "\n".join(rows)


def sampler_table() -> str:
    rows = [
        "| case | logits z | T | top_k | top_p | seed | t | A(z) | token | why |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in CASES:
        seed = resolve_seed(c)
        p = params(c)
        z = np.array(c.z)
        allowed = "—" if c.temperature == 0 else fmt_list([int(a) for a in allowed_set(z, p)])
        tok = choose(z, seed, c.t, p)
        rows.append(
            f"| {c.name} | {fmt_list(c.z)} | {c.temperature!r} | {c.top_k} | {c.top_p!r} | "
            f"`0x{seed:016x}` | {c.t} | {allowed} | **{tok}** | {c.note} |"
        )
    return "\n".join(rows)


def sequence_table() -> str:
    rows = [
        "| case | logits z (same row at every t) | T | top_k | top_p | seed "
        "| tokens t = 0, 1, ... |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, z, temp, k, top_p, seed, n in SEQUENCES:
        p = SamplingParams(temperature=temp, top_k=k, top_p=top_p)
        toks = [choose(np.array(z), seed, t, p) for t in range(n)]
        rows.append(
            f"| {name} | {fmt_list(z)} | {temp!r} | {k} | {top_p!r} | `0x{seed:016x}` | "
            f"{fmt_list(toks)} |"
        )
    return "\n".join(rows)


TABLES = {
    "philox": philox_table,
    "noise": noise_table,
    "sampler": sampler_table,
    "sequence": sequence_table,
}


def render(text: str) -> str:
    for name, make in TABLES.items():
        pattern = re.compile(
            rf"(<!-- vectors:{name} -->\n)(?:.*?\n)?(<!-- /vectors:{name} -->)", re.DOTALL
        )
        if not pattern.search(text):
            raise SystemExit(f"{DOC}: no <!-- vectors:{name} --> block")
        table = make()

        def fill(m: re.Match[str], table: str = table) -> str:
            return m.group(1) + table + "\n" + m.group(2)

        text = pattern.sub(fill, text)
    return text


def main(argv: list[str]) -> int:
    old = DOC.read_text()
    new = render(old)
    if "--check" in argv:
        if new != old:
            print(f"{DOC} is stale: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
