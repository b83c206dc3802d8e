"""The traffic recorder (ivp.verify.traffic) serves exactly the spec's tokens and keeps
the figures the channel is computed from."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from ivp.protocol.messages import SamplingParams
from ivp.verify.prompts import EVALUATION, encode_prompts
from ivp.verify.serving import Request, ServingConfig, ServingPath
from ivp.verify.traffic import TrafficRecorder, channel_at, position_stats


@pytest.fixture(scope="module")
def path(tiny_model_dir: Path) -> tuple[ServingPath, object]:
    from ivp.engine.loading import load_from_dir
    from ivp.engine.reference import ReferenceEngine

    model, tok = load_from_dir(tiny_model_dir)
    return ServingPath(model, ReferenceEngine(model, tok).eos_ids, tok.pad_token_id), tok


def test_recorder_serves_the_spec_tokens_and_records_each_position(path) -> None:
    serving, tok = path
    prompts = encode_prompts(tok, EVALUATION[:4], chat=False)
    params = [SamplingParams(temperature=t, max_tokens=12) for t in (0.0, 0.3, 1.0)] + [
        SamplingParams(temperature=0.7, top_k=5, top_p=0.9, max_tokens=12)]
    reqs = [Request(p, params[i], 77 + i) for i, p in enumerate(prompts)]
    rec = TrafficRecorder()
    recorded = serving.serve(reqs, ServingConfig(4, 1), chooser=rec)
    plain = serving.serve(reqs, ServingConfig(4, 1))
    assert [s.token_ids for s in recorded] == [s.token_ids for s in plain]
    for r, s in zip(reqs, recorded, strict=True):
        st = rec.stats(r)
        assert st.tokens == len(s.token_ids)
        assert np.all(st.z_gaps[:, 0] >= 0) and np.all(np.diff(st.z_gaps, axis=1) >= 0)
        if r.params.temperature == 0:
            assert np.all(st.entropy == 0)
        else:
            assert np.all(st.entropy > 0) and np.all((st.chosen_p > 0) & (st.chosen_p <= 1))
            assert np.all(st.s_gaps[:, 0] >= 0)


def test_position_stats_on_a_known_row() -> None:
    z = np.log(np.array([0.5, 0.25, 0.25]))
    h, p, zg, sg = position_stats(z, 3, 0, SamplingParams(temperature=1.0), 1)
    assert h == pytest.approx(1.5) and p == pytest.approx(0.25)
    assert zg[0] == pytest.approx(math.log(2)) and zg[1] == pytest.approx(math.log(2))
    assert np.isinf(zg[2]) and np.isnan(sg[2])


def test_channel_is_zero_without_tolerance_and_grows_with_it(path) -> None:
    serving, tok = path
    prompts = encode_prompts(tok, EVALUATION[:6], chat=False)
    reqs = [Request(p, SamplingParams(temperature=1.0, max_tokens=16), 5 + i)
            for i, p in enumerate(prompts)]
    rec = TrafficRecorder()
    serving.serve(reqs, ServingConfig(2, 1), chooser=rec)
    stats = [rec.stats(r) for r in reqs]
    none = channel_at(stats, 1.0, 0.0, 16)
    small, large = channel_at(stats, 1.0, 1e-4, 16), channel_at(stats, 1.0, 1e-2, 16)
    assert none.bound_bits == 0.0 and none.entropy_bits > 0
    assert 0 < small.fraction < large.fraction
    assert small.interval[0] <= small.fraction <= small.interval[1]
    assert small.theorem_bits >= small.bound_bits  # Theorem 2 holds on the estimate
