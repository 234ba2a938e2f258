"""Which texts an example trains on: alt-text for CLS1, one sampled synthetic caption for CLS2.

Each example may carry an alt-text and one synthetic caption per granularity (short, medium, long),
any of which can be missing (None, empty or whitespace only). `sample_caption` picks the texts with
these deterministic rules:

1. Eligible captions are those present whose granularity's configured probability is > 0 and whose
   source's weight is > 0 (`sources`; a caption job's passes, e.g. the paper's two captioners). A source
   is drawn among the eligible ones by its weight (no draw when there is one), then one of its
   granularities, the probabilities renormalised over its eligible ones.
2. No eligible synthetic caption -> CLS2 trains on the alt-text; `granularity` is None and
   `fallback` is `alt_for_synthetic`.
3. No alt-text -> CLS1 trains on the synthetic caption of the first PRESENT caption in the order
   short, medium, long of the main source, then of the other sources by name (whatever its probability); `fallback` is `synthetic_for_alt`. CLS2 still gets
   the sampled caption of rule 1 (or, if no granularity is eligible, that same caption, with
   `granularity` set to it).
4. Neither an alt-text nor any synthetic caption -> ValueError naming the example id; the data stage
   records it in the errors table and goes on.

Seeding: `example_rng(seed=, epoch=, example_id=, stream=)` derives a numpy Generator from a SHA-256
of those values (never Python's salted `hash()`), so a draw depends only on (seed, epoch, id, stream):
not on the worker count, the shard layout or the order examples arrive in. Separate streams
("caption", "crops", "mask") keep one draw from shifting another when a config changes.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib

import numpy as np

from tipsv2.data.schema import DEFAULT_GRANULARITIES, Granularity, Slot, check_source


class CaptionFallback(str, enum.Enum):
    """Which substitution `sample_caption` made; compares equal to its string value."""

    NONE = "none"
    ALT_FOR_SYNTHETIC = "alt_for_synthetic"     # no synthetic caption: CLS2 trains on the alt-text
    SYNTHETIC_FOR_ALT = "synthetic_for_alt"     # no alt-text: CLS1 trains on a synthetic caption


def _uniform() -> dict[Granularity, float]:
    return {g: 1.0 for g in DEFAULT_GRANULARITIES}


@dataclasses.dataclass(frozen=True, kw_only=True)
class CaptionSamplingConfig:
    # Relative weight of each granularity for CLS2; renormalised over the captions an example has.
    # A granularity absent from the mapping has weight 0. Default: uniform over those present.
    probabilities: dict[Granularity, float] = dataclasses.field(default_factory=_uniform)
    # Relative weight of each caption source (a caption job's passes, pipelines.caption) for CLS2: a source is
    # drawn among those the example has a caption of, then one of its granularities. Empty: uniform over the
    # sources present; otherwise a source absent from the mapping has weight 0.
    sources: dict[str, float] = dataclasses.field(default_factory=dict)
    seed: int = 0                               # with (epoch, example id) seeds every per-example draw

    def __post_init__(self) -> None:
        try:   # accept "short" as well as Granularity.SHORT
            probabilities = {Granularity(g): float(p) for g, p in self.probabilities.items()}
        except ValueError as err:
            raise ValueError(f"caption probabilities: {err}; expected keys among "
                             f"{[g.value for g in Granularity]}") from None
        bad = {g.value: p for g, p in probabilities.items() if not (np.isfinite(p) and p >= 0.0)}
        if bad:
            raise ValueError(f"caption probabilities must be finite and >= 0, got {bad}")
        if sum(probabilities.values()) <= 0.0:
            raise ValueError(f"caption probabilities must have a positive sum, got {probabilities}")
        object.__setattr__(self, "probabilities", probabilities)
        sources = {check_source(name): float(w) for name, w in self.sources.items()}
        bad = {name: w for name, w in sources.items() if not (np.isfinite(w) and w >= 0.0)}
        if bad or (sources and sum(sources.values()) <= 0.0):
            raise ValueError(f"caption sources must be finite weights >= 0 with a positive sum, got {sources}")
        object.__setattr__(self, "sources", sources)

    def source_weight(self, source: str) -> float:
        return self.sources.get(source, 0.0) if self.sources else 1.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class SampledCaptions:
    alt_text: str                               # text for CLS1
    synthetic: str                              # text for CLS2
    granularity: Granularity | None             # granularity of `synthetic`; None when it is the alt-text
    source: str | None = None                   # its caption source (MAIN_SOURCE for one pass); None: alt-text
    fallback: CaptionFallback


def example_rng(*, seed: int, epoch: int, example_id: str, stream: str) -> np.random.Generator:
    """A generator that depends only on its arguments (stable across processes and Python runs)."""
    key = f"tipsv2/{stream}/{seed}/{epoch}/{example_id}".encode()
    entropy = int.from_bytes(hashlib.sha256(key).digest()[:16], "little")   # 128 bits
    return np.random.default_rng(np.random.SeedSequence(entropy))


def _present(text: str | None) -> bool:
    return text is not None and text.strip() != ""


def _weighted(options: list, weights: list[float], rng: np.random.Generator):
    """One of `options` drawn by `weights`; no draw (the generator untouched) when there is one option, so a
    single-source caption set draws exactly as it did before sources existed."""
    if len(options) == 1:
        return options[0]
    w = np.array(weights, dtype=np.float64)
    return options[int(rng.choice(len(options), p=w / w.sum()))]


def _draw_slot(captions: dict[Slot, str | None], *, rng: np.random.Generator,
               cfg: CaptionSamplingConfig) -> Slot | None:
    """A source by its weight among those with an eligible caption, then one of its granularities."""
    eligible = [s for s in sorted(captions)
                if _present(captions[s]) and cfg.probabilities.get(s.granularity, 0.0) > 0.0
                and cfg.source_weight(s.source) > 0.0]
    if not eligible:
        return None
    sources = list(dict.fromkeys(s.source for s in eligible))
    source = _weighted(sources, [cfg.source_weight(x) for x in sources], rng)
    mine = [s for s in eligible if s.source == source]
    return _weighted(mine, [cfg.probabilities[s.granularity] for s in mine], rng)


def sample_caption(alt_text: str | None, captions: dict[Slot | Granularity | str, str | None], *,
                   rng: np.random.Generator, cfg: CaptionSamplingConfig,
                   example_id: str | None = None) -> SampledCaptions:
    """Pick (alt-text, synthetic caption) for one example; see the module docstring for the fallbacks.

    `captions` maps slot -> caption (a Granularity or "short" is the main source's; "b_long" or
    Slot("b", LONG) another source's; None or blank = missing); missing keys are missing captions.
    `example_id` only serves the error message.
    """
    captions = {Slot.of(k): c for k, c in captions.items()}
    drawn = _draw_slot(captions, rng=rng, cfg=cfg)
    first_present = next((s for s in sorted(captions) if _present(captions[s])), None)
    has_alt = _present(alt_text)
    if not has_alt and first_present is None:
        raise ValueError(f"example {example_id!r}: no alt-text and no synthetic caption "
                         f"(captions given: {sorted(s.name for s in captions)}); need at least one text")
    if not has_alt:
        chosen = drawn if drawn is not None else first_present
        return SampledCaptions(alt_text=captions[first_present], synthetic=captions[chosen],
                               granularity=chosen.granularity, source=chosen.source,
                               fallback=CaptionFallback.SYNTHETIC_FOR_ALT)
    if drawn is None:
        return SampledCaptions(alt_text=alt_text, synthetic=alt_text, granularity=None, source=None,
                               fallback=CaptionFallback.ALT_FOR_SYNTHETIC)
    return SampledCaptions(alt_text=alt_text, synthetic=captions[drawn], granularity=drawn.granularity,
                           source=drawn.source, fallback=CaptionFallback.NONE)
