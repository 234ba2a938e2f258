"""Pure functions around one engine call: the chat prompt in, the quality gate on the text out.

One request per image (`build_request`): the image, then one instruction per granularity still to do, and
the answer constrained (`output_regex`, vLLM structured outputs) to a compact JSON object with one string
field per granularity, so the image is encoded and prefilled once for all of them. `build_prompt` is the
one-granularity prompt (the hf backend, and the three-request baseline in bench/caption.py).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from pipelines.caption.config import PromptsConfig, QualityConfig, Status
from tipsv2.data.schema import Granularity, Slot

# A granularity's field in the one-request answer may hold this many characters per token of its
# max_tokens (English runs about 4 characters a token); tokens <= characters, so the request's token
# budget, the characters of the longest answer allowed, always lets the object close.
CHARS_PER_TOKEN = 4


@dataclasses.dataclass(frozen=True, kw_only=True)
class CaptionResult:
    text: str | None
    rejected_reason: str | None


def build_prompt(granularity: Granularity | str, alt_text: str | None, image_part: dict | None, *,
                 prompts: PromptsConfig = PromptsConfig(), context: dict[str, str] | None = None
                 ) -> list[dict[str, Any]]:
    """OpenAI-style chat messages for one (image, granularity) request.

    With `image_part` (e.g. {"type": "image_url", ...}) the user turn is [image, text] content parts;
    without it the turn is a plain string (text-only models). The alt-text, when there is one, is
    given as a hint the caption may use.
    """
    text = prompts.get(granularity).text
    if alt_text and alt_text.strip():
        text += f' The image\'s alt-text is: "{alt_text.strip()}".'
    if context:
        text += "\n" + "\n".join(context_lines(context))
    if image_part is None:
        return [{"role": "user", "content": text}]
    return [{"role": "user", "content": [image_part, {"type": "text", "text": text}]}]


def context_lines(context: dict[str, str]) -> list[str]:
    """A later pass's received captions, quoted verbatim in slot order (the main source's first)."""
    return (["Captions of this image written earlier by another model (use what the image confirms):"]
            + [f'- {name}: "{context[name]}"' for name in sorted(context, key=Slot.of)])


def build_request(granularities: list[str], alt_text: str | None, image_part: dict | None, *,
                  prompts: PromptsConfig = PromptsConfig(), context: dict[str, str] | None = None
                  ) -> list[dict[str, Any]]:
    """OpenAI-style chat messages asking for every granularity in `granularities` in one answer.

    The image part comes first so that everything before the instructions is one shared prefix. `context`:
    a later pass's received captions {slot name: text} (e.g. {"a_long": ...}), quoted verbatim after the
    alt-text, in slot order.
    """
    keys = ", ".join(f'"{g}"' for g in granularities)
    lines = [f"Describe the image at {len(granularities)} levels of detail. Answer with one JSON object "
             f"with the keys {keys}:"]
    lines += [f'- "{g}": {prompts.get(g).text}' for g in granularities]
    if alt_text and alt_text.strip():
        lines.append(f'The image\'s alt-text is: "{alt_text.strip()}".')
    if context:
        lines += context_lines(context)
    text = "\n".join(lines)
    if image_part is None:
        return [{"role": "user", "content": text}]
    return [{"role": "user", "content": [image_part, {"type": "text", "text": text}]}]


def field_chars(granularity: Granularity | str, prompts: PromptsConfig) -> int:
    return CHARS_PER_TOKEN * prompts.get(granularity).max_tokens


def output_regex(granularities: list[str], prompts: PromptsConfig) -> str:
    """The answer's shape: `{"short": "...", "medium": "..."}`, each value 1..field_chars characters
    without quotes, backslashes or control characters (so it is JSON as written)."""
    fields = ", ".join(f'"{g}": "[^"\\\\\\x00-\\x1f]{{1,{field_chars(g, prompts)}}}"' for g in granularities)
    return "\\{" + fields + "\\}"


def request_max_tokens(granularities: list[str], prompts: PromptsConfig) -> int:
    """Token budget of one request: the characters of the longest answer `output_regex` allows (a token
    is at least one character), so the answer always closes."""
    framing = len("{}") + sum(len(f'"{g}": "", ') for g in granularities)
    return framing + sum(field_chars(g, prompts) for g in granularities)


def parse_fields(text: str, granularities: list[str]) -> dict[str, str | None]:
    """The one-request answer -> {granularity: text, or None where the field is missing or unfinished}.

    Strict JSON first; a cut-off answer (max_tokens, a stop) keeps the fields that closed."""
    try:
        obj = json.loads(text)
    except ValueError:
        obj = {}
        for match in re.finditer(r'"(\w+)"\s*:\s*"((?:[^"\\]|\\.)*)"', text):
            obj.setdefault(match.group(1), json.loads(f'"{match.group(2)}"'))
    if not isinstance(obj, dict):
        obj = {}
    return {g: obj[g] if isinstance(obj.get(g), str) else None for g in granularities}


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


def finish_caption(text: str | None, error: str, *, quality: QualityConfig) -> tuple[str | None, Status, str]:
    """One granularity's raw backend output (text, or an error) -> (caption, status, detail).

    `text` None without an error: the field never closed in a one-request answer (token budget spent)."""
    if error:
        return None, Status.ERROR, str(error)[:2000]
    if text is None:
        return None, Status.REJECTED, "unfinished: the answer ended before this field closed (max_tokens)"
    result = parse_caption(text, min_words=quality.min_words, max_words=quality.max_words,
                           max_repeat_fraction=quality.max_repeat_fraction, repeat_ngram=quality.repeat_ngram)
    if result.text is None:
        return None, Status.REJECTED, result.rejected_reason or "rejected"
    return result.text, Status.OK, ""

