"""SentencePiece tokenizer with the released TIPS conventions.

Input lower-cased, no BOS/EOS, pad id 0, truncated or right-padded to `max_len` (64 by default).
Returns `ids` (B, L) long and `paddings` (B, L) float with 1 at pads. Unlike the official helper, a
sequence longer than `max_len` never leaves its batch-mates' pads unmarked: paddings are exactly the
positions after each sequence's own end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm
import torch
from torch import Tensor

PAD_ID = 0


class Tokenizer:
    def __init__(self, model_path: str | Path, *, max_len: int = 64) -> None:
        path = Path(model_path)
        if not path.is_file():
            raise ValueError(f"tokenizer model {str(path)!r} does not exist")
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.path = path
        self.max_len = max_len
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        if self.sp.pad_id() not in (PAD_ID, -1) or self.sp.id_to_piece(PAD_ID) not in ("<pad>", "<unk>"):
            raise ValueError(f"tokenizer {str(path)!r}: id {PAD_ID} must be the pad (or unk) piece, "
                             f"found {self.sp.id_to_piece(PAD_ID)!r}")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return self.sp.encode([t.lower() for t in texts])

    def __call__(self, texts: Sequence[str] | str) -> tuple[Tensor, Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        ids = torch.zeros(len(texts), self.max_len, dtype=torch.long)
        paddings = torch.ones(len(texts), self.max_len)
        for row, pieces in enumerate(self.encode(texts)):
            pieces = pieces[: self.max_len]
            ids[row, : len(pieces)] = torch.tensor(pieces, dtype=torch.long)
            paddings[row, : len(pieces)] = 0.0
        return ids, paddings


def train_tokenizer(texts: Iterable[str], *, vocab_size: int, out_path: str | Path) -> Path:
    """Train a SentencePiece unigram model on a caption corpus (lower-cased), pad=0 unk=1, no BOS/EOS.

    Writes `<out_path>` (the .model file) and returns its path. No download: everything is local.
    """
    out_path = Path(out_path)
    if out_path.suffix != ".model":
        raise ValueError(f"out_path must end in .model, got {str(out_path)!r}")
    corpus = [t.lower().strip() for t in texts if t and t.strip()]
    if not corpus:
        raise ValueError("train_tokenizer needs at least one non-empty text")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(out_path.with_suffix("")), vocab_size=vocab_size,
        model_type="unigram", pad_id=PAD_ID, unk_id=1, bos_id=-1, eos_id=-1, character_coverage=1.0,
        hard_vocab_limit=False, minloglevel=2, num_threads=1,
    )
    return out_path
