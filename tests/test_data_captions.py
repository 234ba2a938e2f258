"""Caption sampling: fallbacks by hand, frequencies against the configured probabilities, stable seeding."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tipsv2.config_tree import from_dict
from tipsv2.data.captions import (CaptionFallback, CaptionSamplingConfig, SampledCaptions, example_rng,
                                  sample_caption)
from tipsv2.data.schema import Granularity, Slot

S, M, L = Granularity.SHORT, Granularity.MEDIUM, Granularity.LONG
ALL = {S: "a dog", M: "a brown dog on grass", L: "a brown dog lying on green grass in the sun"}


def _draw(alt, captions, cfg=CaptionSamplingConfig(), *, key="x", epoch=0):
    rng = example_rng(seed=cfg.seed, epoch=epoch, example_id=key, stream="caption")
    return sample_caption(alt, captions, rng=rng, cfg=cfg, example_id=key)


def _frequencies(captions, cfg, n=4000):
    counts = {g: 0 for g in Granularity}
    for i in range(n):
        counts[_draw("alt", captions, cfg, key=f"img-{i}").granularity] += 1
    return {g: c / n for g, c in counts.items()}


def test_frequencies_follow_configured_probabilities():
    cfg = CaptionSamplingConfig(probabilities={S: 0.6, M: 0.3, L: 0.1}, seed=7)
    freq = _frequencies(ALL, cfg)
    # binomial sd at n=4000 is <= 0.008; 0.03 is about 4 sd
    assert freq[S] == pytest.approx(0.6, abs=0.03)
    assert freq[M] == pytest.approx(0.3, abs=0.03)
    assert freq[L] == pytest.approx(0.1, abs=0.03)


def test_default_is_uniform_over_present_and_renormalises_when_one_is_missing():
    freq = _frequencies(ALL, CaptionSamplingConfig())
    for g in Granularity:
        assert freq[g] == pytest.approx(1 / 3, abs=0.03)
    freq = _frequencies({S: "a dog", M: None, L: "a long one"}, CaptionSamplingConfig())
    assert freq[M] == 0.0
    assert freq[S] == pytest.approx(0.5, abs=0.03)
    assert freq[L] == pytest.approx(0.5, abs=0.03)


def test_renormalisation_keeps_relative_weights():
    cfg = CaptionSamplingConfig(probabilities={S: 0.2, M: 0.6, L: 0.2})
    freq = _frequencies({S: "s", M: None, L: "l"}, cfg)     # medium missing: 0.2 : 0.2 -> 0.5 / 0.5
    assert freq[S] == pytest.approx(0.5, abs=0.03)
    cfg = CaptionSamplingConfig(probabilities={S: 0.1, M: 0.0, L: 0.3})
    freq = _frequencies(ALL, cfg)                           # medium has weight 0: never drawn
    assert freq[M] == 0.0
    assert freq[S] == pytest.approx(0.25, abs=0.03)


def test_all_present_no_fallback():
    out = _draw("a photo", ALL)
    assert out.fallback is CaptionFallback.NONE and out.fallback == "none"
    assert out.alt_text == "a photo"
    assert out.synthetic == ALL[out.granularity]


@pytest.mark.parametrize("missing", [{}, {S: None, M: None, L: None}, {S: "", M: "   ", L: None}])
def test_no_synthetic_caption_uses_alt_text(missing):
    out = _draw("a photo of a cat", missing)
    assert out == SampledCaptions(alt_text="a photo of a cat", synthetic="a photo of a cat",
                                  granularity=None, fallback=CaptionFallback.ALT_FOR_SYNTHETIC)
    assert out.fallback == "alt_for_synthetic"


def test_present_but_zero_probability_counts_as_no_synthetic():
    cfg = CaptionSamplingConfig(probabilities={S: 1.0, M: 0.0, L: 0.0})
    out = _draw("alt", {M: "m", L: "l"}, cfg)
    assert (out.synthetic, out.granularity, out.fallback) == ("alt", None, CaptionFallback.ALT_FOR_SYNTHETIC)


@pytest.mark.parametrize("alt", [None, "", "  \n"])
def test_no_alt_text_uses_first_present_granularity(alt):
    out = _draw(alt, {S: None, M: "medium caption", L: "long caption"}, key="k1")
    assert out.alt_text == "medium caption"                # short missing -> medium is first present
    assert out.fallback is CaptionFallback.SYNTHETIC_FOR_ALT and out.fallback == "synthetic_for_alt"
    assert out.granularity in (M, L)
    assert out.synthetic == {M: "medium caption", L: "long caption"}[out.granularity]
    out = _draw(alt, ALL, key="k2")
    assert out.alt_text == ALL[S]


def test_no_alt_text_and_only_zero_probability_caption():
    cfg = CaptionSamplingConfig(probabilities={S: 1.0})
    out = _draw(None, {L: "only long"}, cfg)
    assert out == SampledCaptions(alt_text="only long", synthetic="only long", granularity=L, source="main",
                                  fallback=CaptionFallback.SYNTHETIC_FOR_ALT)


def test_no_text_at_all_names_the_example():
    with pytest.raises(ValueError, match="img-without-text"):
        sample_caption(None, {S: None, M: " "}, rng=np.random.default_rng(0), cfg=CaptionSamplingConfig(),
                       example_id="img-without-text")


def test_string_keys_are_accepted_and_bad_probabilities_rejected():
    cfg = CaptionSamplingConfig(probabilities={"short": 1.0, "long": 3.0})
    assert cfg.probabilities == {S: 1.0, L: 3.0}
    out = sample_caption("a", {"short": "s"}, rng=np.random.default_rng(0), cfg=cfg)
    assert out.granularity is S
    with pytest.raises(ValueError, match="-0.5"):
        CaptionSamplingConfig(probabilities={S: -0.5})
    with pytest.raises(ValueError, match="huge"):
        CaptionSamplingConfig(probabilities={"huge": 1.0})
    with pytest.raises(ValueError, match="positive sum"):
        CaptionSamplingConfig(probabilities={S: 0.0, M: 0.0})
    with pytest.raises(ValueError, match="nan"):
        CaptionSamplingConfig(probabilities={S: float("nan")})


def test_config_from_dict():
    cfg = from_dict(CaptionSamplingConfig, {"probabilities": {"short": "0.7", "medium": 0.3}, "seed": "5"})
    assert cfg == CaptionSamplingConfig(probabilities={S: 0.7, M: 0.3}, seed=5)


def test_same_seed_epoch_id_gives_same_draw_regardless_of_order():
    ids = [f"img-{i}" for i in range(200)]
    forward = {i: _draw("alt", ALL, key=i) for i in ids}
    backward = {i: _draw("alt", ALL, key=i) for i in reversed(ids)}
    assert forward == backward
    other_epoch = {i: _draw("alt", ALL, key=i, epoch=1) for i in ids}
    changed = sum(forward[i].granularity != other_epoch[i].granularity for i in ids)
    assert changed > 200 * 0.5     # about 2/3 expected to change with 3 equally likely choices


def test_example_rng_depends_on_every_input():
    base = dict(seed=0, epoch=0, example_id="a", stream="caption")
    first = example_rng(**base).random(4)
    np.testing.assert_array_equal(first, example_rng(**base).random(4))
    for change in (dict(seed=1), dict(epoch=1), dict(example_id="b"), dict(stream="crops")):
        assert not np.array_equal(first, example_rng(**(base | change)).random(4)), change


def test_example_rng_is_stable_across_processes():
    code = ("from tipsv2.data.captions import example_rng; "
            "print(repr(example_rng(seed=3, epoch=2, example_id='img', stream='caption').random()))")
    values = set()
    for hash_seed in ("1", "2"):      # Python's own hash() would differ between these
        env = os.environ | {"PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                             check=True, cwd=Path(__file__).resolve().parents[1])
        values.add(float(out.stdout))
    assert values == {example_rng(seed=3, epoch=2, example_id="img", stream="caption").random()}


# ---------------------------------------------------------------- caption sources (issue 24)

TWO = {"a_short": "a: a dog", "a_medium": "a: a brown dog", "b_long": "b: a brown dog lying on grass"}


def _source_frequencies(captions, cfg, n=4000):
    counts: dict = {}
    for i in range(n):
        out = _draw("alt", captions, cfg, key=f"img-{i}")
        counts[(out.source, out.granularity)] = counts.get((out.source, out.granularity), 0) + 1
    return {k: c / n for k, c in counts.items()}


def test_sources_alternate_by_weight_then_granularity_within_a_source():
    # Uniform over the sources present, then over a source's granularities: a 1/2 x 1/2 each, b 1/2.
    freq = _source_frequencies(TWO, CaptionSamplingConfig())
    assert freq[("a", S)] == pytest.approx(0.25, abs=0.03) and freq[("a", M)] == pytest.approx(0.25, abs=0.03)
    assert freq[("b", L)] == pytest.approx(0.5, abs=0.03)
    freq = _source_frequencies(TWO, CaptionSamplingConfig(sources={"a": 3.0, "b": 1.0}))
    assert freq[("b", L)] == pytest.approx(0.25, abs=0.03)
    freq = _source_frequencies(TWO, CaptionSamplingConfig(sources={"b": 1.0}))   # a absent: weight 0
    assert freq == {("b", L): 1.0}


def test_a_source_without_a_caption_for_this_image_leaves_the_draw_to_the_others():
    out = _draw("alt", {"a_short": None, "b_long": "b text"}, CaptionSamplingConfig(sources={"a": 1, "b": 1}))
    assert (out.source, out.granularity, out.synthetic) == ("b", L, "b text")
    out = _draw("alt", {"a_short": "a text"}, CaptionSamplingConfig(sources={"b": 1.0}))
    assert (out.synthetic, out.source, out.fallback) == ("alt", None, CaptionFallback.ALT_FOR_SYNTHETIC)


def test_one_source_draws_as_before_sources_existed():
    """No source draw when one source is eligible: the main source's draws are those of the granularity-only
    sampler (seeded draws of existing runs unchanged); the same captions named as another source draw alike."""
    main = [_draw("alt", ALL, key=f"k{i}") for i in range(200)]
    other = [_draw("alt", {f"b_{g.value}": t for g, t in ALL.items()}, key=f"k{i}") for i in range(200)]
    assert [m.granularity for m in main] == [o.granularity for o in other]
    assert {m.source for m in main} == {"main"} and {o.source for o in other} == {"b"}


def test_without_alt_text_cls1_takes_the_main_sources_first_caption_then_other_sources_by_name():
    out = _draw(None, {"b_short": "b short", "long": "main long", "a_long": "a long"}, CaptionSamplingConfig())
    assert out.alt_text == "main long"
    out = _draw(None, {"b_short": "b short", "a_long": "a long"}, CaptionSamplingConfig())
    assert out.alt_text == "a long"


def test_bad_source_names_and_weights_name_the_value():
    with pytest.raises(ValueError, match=r"caption source name 'B-2'"):
        CaptionSamplingConfig(sources={"B-2": 1.0})
    with pytest.raises(ValueError, match=r"caption sources must be finite weights >= 0"):
        CaptionSamplingConfig(sources={"a": -1.0})
    with pytest.raises(ValueError, match=r"expected a granularity"):
        Slot.of("a_huge")
