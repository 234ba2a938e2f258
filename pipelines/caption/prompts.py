"""Pure functions around one engine call: the chat prompt in, the quality gate on the text out."""

from __future__ import annotations

import dataclasses
from typing import Any

from pipelines.caption.config import PromptsConfig, QualityConfig, Status
from tipsv2.data.schema import Granularity


@dataclasses.dataclass(frozen=True, kw_only=True)
class CaptionResult:
    text: str | None
    rejected_reason: str | None


def build_prompt(granularity: Granularity | str, alt_text: str | None, image_part: dict | None, *,
                 prompts: PromptsConfig = PromptsConfig()) -> list[dict[str, Any]]:
    """OpenAI-style chat messages for one (image, granularity) request.

    With `image_part` (e.g. {"type": "image_url", ...}) the user turn is [image, text] content parts;
    without it the turn is a plain string (text-only models). The alt-text, when there is one, is
    given as a hint the caption may use.
    """
    text = prompts.get(granularity).text
    if alt_text and alt_text.strip():
        text += f' The image\'s alt-text is: "{alt_text.strip()}".'
    if image_part is None:
        return [{"role": "user", "content": text}]
    return [{"role": "user", "content": [image_part, {"type": "text", "text": text}]}]


def cut_repetition(words: list[str], *, max_period: int = 8, min_repeats: int = 3) -> list[str]:
    """Cut at the first span of 1..max_period words repeated min_repeats times in a row; keep one copy."""
    for i in range(len(words)):
        for period in range(1, max_period + 1):
            end = i + period * min_repeats
            if end > len(words):
                break
            span = words[i:i + period]
            if all(words[i + k * period:i + (k + 1) * period] == span for k in range(1, min_repeats)):
                return words[:i + period]
    return words


def repeat_fraction(words: list[str], n: int) -> float:
    """Fraction of word n-grams that repeat an earlier n-gram (0 for texts shorter than n)."""
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 0.0 if not grams else 1.0 - len(set(grams)) / len(grams)


def parse_caption(text: str, *, min_words: int, max_words: int, max_repeat_fraction: float = 0.5,
                  repeat_ngram: int = 3) -> CaptionResult:
    """Strip, cut degenerate repetition, apply length bounds (words) and a repeated n-gram limit."""
    words = cut_repetition(text.strip().strip('"').strip().split())
    if not words:
        return CaptionResult(text=None, rejected_reason="empty")
    if len(words) < min_words:
        return CaptionResult(text=None, rejected_reason=f"too_short: {len(words)} words < min_words {min_words}")
    if len(words) > max_words:
        return CaptionResult(text=None, rejected_reason=f"too_long: {len(words)} words > max_words {max_words}")
    fraction = repeat_fraction([w.lower() for w in words], repeat_ngram)
    if fraction > max_repeat_fraction:
        return CaptionResult(text=None, rejected_reason=f"repetitive: {fraction:.2f} of {repeat_ngram}-grams "
                                                        f"repeat > {max_repeat_fraction}")
    return CaptionResult(text=" ".join(words), rejected_reason=None)


def finish_request(row: dict[str, Any], *, quality: QualityConfig) -> dict[str, Any]:
    """Raw backend output row {id, granularity, text, error} -> {id, granularity, caption, status, detail}."""
    out = {"id": row["id"], "granularity": row["granularity"], "caption": None}
    if row.get("error"):
        return {**out, "status": Status.ERROR.value, "detail": str(row["error"])[:2000]}
    result = parse_caption(row.get("text") or "", min_words=quality.min_words, max_words=quality.max_words,
                           max_repeat_fraction=quality.max_repeat_fraction, repeat_ngram=quality.repeat_ngram)
    if result.text is None:
        return {**out, "status": Status.REJECTED.value, "detail": result.rejected_reason}
    return {**out, "caption": result.text, "status": Status.OK.value, "detail": ""}

