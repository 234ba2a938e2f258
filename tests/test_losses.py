"""The losses against plain Python-loop references (float64) and hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from tipsv2.losses.contrastive import (
    ContrastiveKind,
    ContrastiveLossConfig,
    dual_contrastive,
    sigmoid_contrastive,
    softmax_contrastive,
)
from tipsv2.losses.dino import (
    DinoLossConfig,
    center_norm,
    centered_teacher_probs,
    dino_loss,
    sinkhorn_knopp,
    teacher_entropy,
    teacher_temperature,
    update_center,
)
from tipsv2.losses.ibot import PatchLossConfig, PatchLossKind, patch_loss
from tipsv2.losses.koleo import KoLeoConfig, koleo_loss

TOL = dict(rtol=1e-6, atol=1e-6)


def _rand(*shape, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


def _softmax_row(values):
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def _norm(v):
    return math.sqrt(sum(x * x for x in v))


def _cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / (_norm(a) * _norm(b))


# ---------------------------------------------------------------- contrastive

def _loop_softmax_contrastive(image, text, temperature):
    image, text = image.tolist(), text.tolist()
    n = len(image)
    total = 0.0
    for i in range(n):
        row = [_cos(image[i], text[j]) / temperature for j in range(n)]
        col = [_cos(text[i], image[j]) / temperature for j in range(n)]
        total += -math.log(_softmax_row(row)[i]) - math.log(_softmax_row(col)[i])
    return total / (2 * n)


def _loop_sigmoid_contrastive(image, text, temperature, bias):
    image, text = image.tolist(), text.tolist()
    n = len(image)
    total = 0.0
    for i in range(n):
        for j in range(n):
            label = 1.0 if i == j else -1.0
            logit = _cos(image[i], text[j]) / temperature + bias
            total += math.log1p(math.exp(-label * logit))
    return total / n


def test_softmax_contrastive_matches_loop():
    image, text = _rand(7, 5, seed=1), _rand(7, 5, seed=2)
    got = softmax_contrastive(image, text, temperature=0.3)
    assert got.item() == pytest.approx(_loop_softmax_contrastive(image, text, 0.3), rel=1e-6)


def test_softmax_contrastive_is_low_for_matching_pairs():
    image = _rand(6, 8, seed=3)
    matched = softmax_contrastive(image, image + 0.01 * _rand(6, 8, seed=4), temperature=0.05)
    shuffled = softmax_contrastive(image, image.roll(1, dims=0), temperature=0.05)
    assert matched.item() < 0.01 < shuffled.item()


def test_sigmoid_contrastive_matches_loop():
    image, text = _rand(6, 4, seed=5), _rand(6, 4, seed=6)
    got = sigmoid_contrastive(image, text, temperature=0.5, bias=-1.5)
    assert got.item() == pytest.approx(_loop_sigmoid_contrastive(image, text, 0.5, -1.5), rel=1e-6)


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_contrastive_rank_shards_average_to_full_batch(loss):
    # Two simulated ranks: each sees its own rows and the other side of the full batch in rank order.
    image, text = _rand(8, 5, seed=7), _rand(8, 5, seed=8)
    fn = {"softmax": lambda **kw: softmax_contrastive(**kw, temperature=0.2),
          "sigmoid": lambda **kw: sigmoid_contrastive(**kw, temperature=0.2, bias=-2.0)}[loss]
    full = fn(image=image, text=text)
    shards = []
    for rank in range(2):
        rows = slice(4 * rank, 4 * rank + 4)
        by_rank = {id_: torch.nn.functional.normalize(t, dim=-1) for id_, t in (("i", image), ("t", text))}

        def gather(x, by_rank=by_rank, rank=rank):
            side = "i" if torch.allclose(x, by_rank["i"][4 * rank:4 * rank + 4]) else "t"
            parts = [x if r == rank else by_rank[side][4 * r:4 * r + 4] for r in range(2)]
            return torch.cat(parts)

        shards.append(fn(image=image[rows], text=text[rows], gather=gather, rank=rank))
    torch.testing.assert_close(torch.stack(shards).mean(), full, **TOL)


def test_contrastive_rejects_rank_outside_gathered_batch():
    with pytest.raises(ValueError, match="rank 2"):
        softmax_contrastive(_rand(4, 3), _rand(4, 3), temperature=0.1, rank=2)


def test_dual_contrastive_terms_and_mean():
    cls1, alt, cls2, syn = (_rand(5, 6, seed=s) for s in (10, 11, 12, 13))
    cfg = ContrastiveLossConfig()
    temperature = torch.tensor(0.2, dtype=torch.float64)
    out = dual_contrastive(cls1=cls1, alt_text=alt, cls2=cls2, synthetic_text=syn, cfg=cfg, temperature=temperature)
    assert set(out) == {"loss/clip_alt", "loss/clip_syn", "loss/contrastive"}
    assert out["loss/clip_alt"].item() == pytest.approx(_loop_softmax_contrastive(cls1, alt, 0.2), rel=1e-6)
    assert out["loss/clip_syn"].item() == pytest.approx(_loop_softmax_contrastive(cls2, syn, 0.2), rel=1e-6)
    torch.testing.assert_close(out["loss/contrastive"], (out["loss/clip_alt"] + out["loss/clip_syn"]) / 2)


def test_dual_contrastive_sigmoid():
    cls1, alt, cls2, syn = (_rand(4, 3, seed=s) for s in (20, 21, 22, 23))
    cfg = ContrastiveLossConfig(kind=ContrastiveKind.SIGMOID)
    bias = torch.tensor(-3.0, dtype=torch.float64)
    temperature = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    out = dual_contrastive(cls1=cls1, alt_text=alt, cls2=cls2, synthetic_text=syn, cfg=cfg,
                           temperature=temperature, bias=bias)
    assert out["loss/clip_alt"].item() == pytest.approx(_loop_sigmoid_contrastive(cls1, alt, 0.05, -3.0), rel=1e-6)
    out["loss/contrastive"].backward()
    assert temperature.grad.item() != 0.0
    with pytest.raises(ValueError, match="bias"):
        dual_contrastive(cls1=cls1, alt_text=alt, cls2=cls2, synthetic_text=syn, cfg=cfg, temperature=temperature)



@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_bf16_embeddings_are_scored_in_float32(loss):
    """bf16 training hands the losses bf16 embeddings and a bf16 temperature: the result is the float32
    loss of those bf16 values (the loop reference on them), not a bf16 one (2-3 significant digits)."""
    image, text = (_rand(16, 8, seed=s).to(torch.bfloat16) for s in (30, 31))
    temperature, bias = torch.tensor(0.07, dtype=torch.bfloat16), torch.tensor(-2.0, dtype=torch.bfloat16)
    if loss == "softmax":
        got = softmax_contrastive(image, text, temperature=temperature)
        expected = _loop_softmax_contrastive(image.double(), text.double(), temperature.item())
    else:
        got = sigmoid_contrastive(image, text, temperature=temperature, bias=bias)
        expected = _loop_sigmoid_contrastive(image.double(), text.double(), temperature.item(), bias.item())
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-5)

def test_model_temperature_is_clamped_without_gradient_outside():
    from tipsv2.models import build_model
    model = build_model("tiny")
    with torch.no_grad():
        model.log_temperature.fill_(math.log(0.001))  # below temperature_min = 0.01
    assert model.temperature.item() == pytest.approx(0.01)
    model.temperature.backward()
    assert model.log_temperature.grad.item() == 0.0


# ---------------------------------------------------------------- DINO

def _loop_cross_entropy(teacher_row, student_row, student_temp):
    probs = _softmax_row([s / student_temp for s in student_row])
    return -sum(t * math.log(p) for t, p in zip(teacher_row, probs))


def test_dino_loss_matches_loop():
    student = _rand(3, 4, 6, seed=30)            # (M, B, K)
    teacher = torch.softmax(_rand(4, 6, seed=31), dim=-1)
    expected = sum(_loop_cross_entropy(teacher[b].tolist(), student[m, b].tolist(), 0.1)
                   for m in range(3) for b in range(4)) / 12
    assert dino_loss(student, teacher, 0.1).item() == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(dino_loss(list(student), teacher, 0.1), dino_loss(student, teacher, 0.1))


def test_dino_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(4, 6\)"):
        dino_loss(_rand(2, 3, 6), torch.softmax(_rand(4, 6), dim=-1), 0.1)


def test_centered_teacher_probs_matches_loop_and_has_no_grad():
    logits = _rand(3, 5, seed=32).requires_grad_()
    center = _rand(5, seed=33)
    probs = centered_teacher_probs(logits, center, 0.04)
    assert not probs.requires_grad
    for b in range(3):
        expected = _softmax_row([(logits[b, k].item() - center[k].item()) / 0.04 for k in range(5)])
        torch.testing.assert_close(probs[b], torch.tensor(expected, dtype=torch.float64), **TOL)


def test_teacher_probs_get_no_gradient_from_the_loss():
    student = _rand(2, 3, 4, seed=34).requires_grad_()
    teacher = torch.softmax(_rand(3, 4, seed=35), dim=-1).requires_grad_()
    dino_loss(student, teacher, 0.1).backward()
    assert teacher.grad is None and student.grad is not None and student.grad.abs().sum() > 0
    patches_s = _rand(2, 3, 4, seed=36).requires_grad_()
    patches_t = torch.softmax(_rand(2, 3, 4, seed=37), dim=-1).requires_grad_()
    patch_loss(patches_s, patches_t, None, kind=PatchLossKind.IBOT_PLUS_PLUS, student_temp=0.1).backward()
    assert patches_t.grad is None and patches_s.grad.abs().sum() > 0


def test_update_center_hand_computed_2x3():
    center = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
    logits = torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]], dtype=torch.float64)
    # batch mean [2, 3, 4]; 0.9 * [1, 0, -1] + 0.1 * [2, 3, 4] = [1.1, 0.3, -0.5]
    new = update_center(center, logits, 0.9)
    torch.testing.assert_close(new, torch.tensor([1.1, 0.3, -0.5], dtype=torch.float64), **TOL)
    torch.testing.assert_close(center, torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64))  # not in place
    assert center_norm(new).item() == pytest.approx(math.sqrt(1.1**2 + 0.3**2 + 0.5**2), rel=1e-9)


def test_update_center_patch_logits_use_every_token():
    logits = _rand(2, 3, 4, seed=38)  # (B, N, K)
    new = update_center(torch.zeros(4, dtype=torch.float64), logits, 0.5)
    torch.testing.assert_close(new, 0.5 * logits.reshape(6, 4).mean(0), **TOL)


def _loop_sinkhorn(logits, temp, iterations):
    q = [[math.exp(v / temp) for v in row] for row in logits.tolist()]  # (B, K)
    b, k = len(q), len(q[0])
    total = sum(map(sum, q))
    q = [[v / total for v in row] for row in q]
    for _ in range(iterations):
        col = [sum(q[i][j] for i in range(b)) for j in range(k)]
        q = [[q[i][j] / col[j] / k for j in range(k)] for i in range(b)]
        row = [sum(r) for r in q]
        q = [[q[i][j] / row[i] / b for j in range(k)] for i in range(b)]
    return torch.tensor([[v * b for v in r] for r in q], dtype=torch.float64)


def test_sinkhorn_matches_loop():
    logits = _rand(5, 4, seed=40, scale=0.5)
    torch.testing.assert_close(sinkhorn_knopp(logits, 0.1, iterations=3), _loop_sinkhorn(logits, 0.1, 3), **TOL)


def test_sinkhorn_marginals():
    logits = _rand(12, 4, seed=41, scale=0.3)
    q = sinkhorn_knopp(logits, 0.1, iterations=200)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(12, dtype=torch.float64), **TOL)  # each sample sums to 1
    torch.testing.assert_close(q.sum(dim=0), torch.full((4,), 12 / 4, dtype=torch.float64), **TOL)  # B/K per prototype
    q3 = sinkhorn_knopp(logits, 0.1, iterations=3)
    torch.testing.assert_close(q3.sum(dim=1), torch.ones(12, dtype=torch.float64), **TOL)
    plain = torch.softmax(logits / 0.1, dim=-1).sum(dim=0)
    assert (q3.sum(dim=0) - 3.0).abs().max() < (plain - 3.0).abs().max()  # closer to equipartition


def test_sinkhorn_keeps_leading_axes():
    logits = _rand(2, 3, 4, seed=42, scale=0.5)
    torch.testing.assert_close(sinkhorn_knopp(logits, 0.1).reshape(6, 4), sinkhorn_knopp(logits.reshape(6, 4), 0.1))


def test_teacher_temperature_warmup():
    cfg = DinoLossConfig(teacher_temp=0.07, teacher_temp_warmup_start=0.04, teacher_temp_warmup_steps=100)
    assert teacher_temperature(0, cfg) == pytest.approx(0.04)
    assert teacher_temperature(50, cfg) == pytest.approx(0.055)
    assert teacher_temperature(100, cfg) == pytest.approx(0.07)
    assert teacher_temperature(10_000, cfg) == pytest.approx(0.07)
    assert teacher_temperature(0, DinoLossConfig(teacher_temp_warmup_steps=0)) == pytest.approx(0.07)
    patch_cfg = PatchLossConfig(teacher_temp_warmup_steps=10)
    assert teacher_temperature(5, patch_cfg) == pytest.approx(0.055)


def test_teacher_entropy():
    uniform = torch.full((3, 8), 1 / 8, dtype=torch.float64)
    assert teacher_entropy(uniform).item() == pytest.approx(math.log(8))
    one_hot = torch.nn.functional.one_hot(torch.tensor([0, 5]), 8).double()
    assert teacher_entropy(one_hot).item() == pytest.approx(0.0, abs=1e-12)


def test_dino_config_names_bad_value():
    with pytest.raises(ValueError, match="student_temp must be > 0, got -0.1"):
        DinoLossConfig(student_temp=-0.1)


# ---------------------------------------------------------------- iBOT / iBOT++

def _loop_patch_loss(student, teacher, masks, kind):
    b, n, _ = student.shape
    ce = [[_loop_cross_entropy(teacher[i, j].tolist(), student[i, j].tolist(), 0.1) for j in range(n)]
          for i in range(b)]
    if kind is PatchLossKind.IBOT_PLUS_PLUS:
        return sum(map(sum, ce)) / (b * n)
    per_image = []
    for i in range(b):
        masked = [ce[i][j] for j in range(n) if masks[i, j]]
        if masked:
            per_image.append(sum(masked) / len(masked))
    return sum(per_image) / len(per_image)


def _patch_inputs(seed=50):
    student = _rand(3, 5, 6, seed=seed)
    teacher = torch.softmax(_rand(3, 5, 6, seed=seed + 1) / 0.1, dim=-1)
    masks = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    return student, teacher, masks


@pytest.mark.parametrize("kind", list(PatchLossKind))
def test_patch_loss_matches_loop(kind):
    student, teacher, masks = _patch_inputs()
    got = patch_loss(student, teacher, masks, kind=kind, student_temp=0.1)
    assert got.item() == pytest.approx(_loop_patch_loss(student, teacher, masks, kind), rel=1e-6)


def test_ibot_plus_plus_equals_ibot_when_all_masked():
    student, teacher, _ = _patch_inputs(seed=52)
    everything = torch.ones(3, 5, dtype=torch.bool)
    ibot = patch_loss(student, teacher, everything, kind=PatchLossKind.IBOT, student_temp=0.1)
    plus = patch_loss(student, teacher, everything, kind=PatchLossKind.IBOT_PLUS_PLUS, student_temp=0.1)
    torch.testing.assert_close(ibot, plus, **TOL)


def test_ibot_ignores_visible_tokens_and_ibot_plus_plus_does_not():
    student, teacher, masks = _patch_inputs(seed=54)
    visible = ~masks
    student2, teacher2 = student.clone(), teacher.clone()
    student2[visible] = _rand(int(visible.sum()), 6, seed=56)
    teacher2[visible] = torch.softmax(_rand(int(visible.sum()), 6, seed=57), dim=-1)
    for kind, same in ((PatchLossKind.IBOT, True), (PatchLossKind.IBOT_PLUS_PLUS, False)):
        before = patch_loss(student, teacher, masks, kind=kind, student_temp=0.1)
        after = patch_loss(student2, teacher2, masks, kind=kind, student_temp=0.1)
        assert torch.allclose(before, after) is same, kind


def test_ibot_plus_plus_is_one_mean_not_two_groups():
    student, teacher, masks = _patch_inputs(seed=58)
    masks = torch.zeros(3, 5, dtype=torch.bool)
    masks[0, 0] = True  # 1 masked token, 14 visible: a mean of the two group means would weight them 1:1
    got = patch_loss(student, teacher, masks, kind=PatchLossKind.IBOT_PLUS_PLUS, student_temp=0.1)
    assert got.item() == pytest.approx(_loop_patch_loss(student, teacher, masks, PatchLossKind.IBOT_PLUS_PLUS))


def test_patch_loss_without_masks_covers_every_token():
    student, teacher, _ = _patch_inputs(seed=60)
    everything = torch.ones(3, 5, dtype=torch.bool)
    for kind in PatchLossKind:
        got = patch_loss(student, teacher, None, kind=kind, student_temp=0.1)
        expected = patch_loss(student, teacher, everything, kind=PatchLossKind.IBOT_PLUS_PLUS, student_temp=0.1)
        torch.testing.assert_close(got, expected, **TOL)


def test_ibot_with_nothing_masked_is_zero_and_differentiable():
    student, teacher, _ = _patch_inputs(seed=62)
    student.requires_grad_()
    loss = patch_loss(student, teacher, torch.zeros(3, 5, dtype=torch.bool), kind=PatchLossKind.IBOT,
                      student_temp=0.1)
    loss.backward()
    assert loss.item() == 0.0 and student.grad.abs().sum() == 0


def test_patch_loss_rejects_wrong_mask_shape():
    student, teacher, _ = _patch_inputs()
    with pytest.raises(ValueError, match=r"\(3, 5\)"):
        patch_loss(student, teacher, torch.ones(3, 4, dtype=torch.bool), kind=PatchLossKind.IBOT, student_temp=0.1)


def test_patch_config_defaults_are_tipsv2():
    cfg = PatchLossConfig()
    assert (cfg.kind, cfg.weight, cfg.share_head) == (PatchLossKind.IBOT_PLUS_PLUS, 2.0, False)


# ---------------------------------------------------------------- KoLeo

def _loop_koleo(x, eps=1e-8):
    rows = [[v / _norm(r) for v in r] for r in x.tolist()]
    total = 0.0
    for i, a in enumerate(rows):
        nearest = min(_norm([p - q for p, q in zip(a, b)]) for j, b in enumerate(rows) if j != i)
        total += -math.log(nearest + eps)
    return total / len(rows)


def test_koleo_matches_loop():
    x = _rand(9, 4, seed=70)
    assert koleo_loss(x).item() == pytest.approx(_loop_koleo(x), rel=1e-6)


def test_koleo_ignores_scale_and_rewards_spread():
    x = _rand(6, 3, seed=71)
    torch.testing.assert_close(koleo_loss(3.0 * x), koleo_loss(x), **TOL)
    clustered = x[:1] + 0.01 * _rand(6, 3, seed=72)
    assert koleo_loss(clustered) > koleo_loss(x)


def test_koleo_gradient_and_config():
    x = _rand(5, 3, seed=73).requires_grad_()
    koleo_loss(x).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert KoLeoConfig().weight == 0.0
    with pytest.raises(ValueError, match="B >= 2"):
        koleo_loss(_rand(1, 3))
