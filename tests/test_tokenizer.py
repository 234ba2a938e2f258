from __future__ import annotations

import pytest
import torch

from tipsv2.tokenizer import Tokenizer, train_tokenizer

CORPUS = [f"a {size} {colour} {shape} {where} a {colour2} {shape2}"
          for size in ("small", "large") for colour in ("red", "green", "blue") for shape in ("circle", "square")
          for where in ("left of", "above") for colour2 in ("yellow", "white") for shape2 in ("star", "ring")]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = train_tokenizer(CORPUS * 3, vocab_size=60, out_path=tmp_path_factory.mktemp("tok") / "spm.model")
    return Tokenizer(path, max_len=24)


def test_lower_cases_pads_and_truncates(tok):
    long_text = "a small red circle left of a yellow star above a blue ring " * 3
    ids, paddings = tok(["A RED Circle", long_text])
    assert ids.dtype == torch.long and ids.shape == paddings.shape == (2, 24)
    lower, _ = tok(["a red circle"])
    assert torch.equal(ids[0], lower[0])
    n = int((paddings[0] == 0).sum())
    assert n == len(tok.encode(["a red circle"])[0])
    assert torch.all(ids[0, n:] == 0) and torch.all(paddings[0, n:] == 1) and torch.all(paddings[0, :n] == 0)
    assert len(tok.encode([long_text])[0]) > 24
    assert torch.all(paddings[1] == 0)  # truncated to 24 tokens, no pads
    assert torch.equal(ids[1], torch.tensor(tok.encode([long_text])[0][:24]))


def test_no_bos_eos(tok):
    pieces = tok.sp.encode(["red"])[0]
    assert tok.sp.bos_id() == -1 and tok.sp.eos_id() == -1
    ids, _ = tok(["red"])
    assert ids[0, : len(pieces)].tolist() == pieces


def test_bad_paths(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        Tokenizer(tmp_path / "nope.model")
    with pytest.raises(ValueError, match=r"must end in \.model"):
        train_tokenizer(CORPUS, vocab_size=40, out_path=tmp_path / "x.vocab")
    with pytest.raises(ValueError, match="at least one non-empty"):
        train_tokenizer(["", "  "], vocab_size=40, out_path=tmp_path / "x.model")
