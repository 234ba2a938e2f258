"""DinoHead: shapes, unit-norm prototypes without weight_norm parametrisations, gradients, init."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tipsv2.models.heads import DinoHead, DinoHeadConfig

SMALL = DinoHeadConfig(prototypes=64, hidden=32, bottleneck=16, layers=3)


def _head(cfg=SMALL, in_dim=24, seed=0):
    torch.manual_seed(seed)
    return DinoHead(in_dim, cfg).double()


def test_output_shape_for_cls_and_patch_tokens():
    head = _head()
    assert head(torch.randn(5, 24, dtype=torch.float64)).shape == (5, 64)
    assert head(torch.randn(2, 7, 24, dtype=torch.float64)).shape == (2, 7, 64)


def test_matches_plain_computation():
    head = _head()
    x = torch.randn(4, 24, dtype=torch.float64)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    h = x
    for i, linear in enumerate(linears):
        h = h @ linear.weight.T + linear.bias
        if i < len(linears) - 1:
            h = F.gelu(h)
    z = h / h.norm(dim=-1, keepdim=True)
    v = head.prototypes / head.prototypes.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(head(x), z @ v.T, rtol=1e-10, atol=1e-12)


def test_prototype_rows_are_effectively_unit_norm():
    head = _head()
    x = torch.randn(6, 24, dtype=torch.float64)
    before = head(x)
    with torch.no_grad():
        head.prototypes.mul_(torch.rand(64, 1, dtype=torch.float64) * 10 + 0.1)  # rescale each row
    torch.testing.assert_close(head(x), before, rtol=1e-10, atol=1e-12)
    assert before.abs().max() <= 1.0 + 1e-12  # cosines
    names = {name for name, _ in head.named_parameters()}
    assert not any(name.endswith(("weight_g", "weight_v", "original0", "original1")) for name in names)
    assert not torch.nn.utils.parametrize.is_parametrized(head)


def test_gradient_reaches_raw_prototypes_orthogonally():
    head = _head()
    head(torch.randn(8, 24, dtype=torch.float64)).pow(2).sum().backward()
    grad = head.prototypes.grad
    assert grad is not None and grad.abs().sum() > 0
    # Row normalisation: the gradient of f(V / |V|) has no component along each row of V.
    radial = (grad * head.prototypes).sum(dim=-1) / head.prototypes.norm(dim=-1)
    assert radial.abs().max() < 1e-10 * grad.norm()
    for linear in (m for m in head.mlp if isinstance(m, torch.nn.Linear)):
        assert linear.weight.grad.abs().sum() > 0


def test_init_truncated_normal_and_zero_biases():
    head = DinoHead(256, DinoHeadConfig(prototypes=128, hidden=512, bottleneck=64, layers=3))
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(512, 256), (512, 512), (64, 512)]
    for linear in linears:
        # N(0, 0.02^2) truncated at +-2 std has std 0.02 * 0.8796
        assert linear.weight.std().item() == pytest.approx(0.02 * 0.8796, rel=0.05)
        assert linear.weight.abs().max() <= 0.04 + 1e-7
        assert linear.bias.abs().max() == 0
    assert sum(isinstance(m, torch.nn.GELU) for m in head.mlp) == 2


def test_single_layer_head():
    head = DinoHead(24, DinoHeadConfig(prototypes=10, hidden=99, bottleneck=8, layers=1))
    assert [type(m) for m in head.mlp] == [torch.nn.Linear]
    assert head(torch.randn(3, 24)).shape == (3, 10)


def test_default_config_is_dinov2_and_bad_values_are_named():
    cfg = DinoHeadConfig()
    assert (cfg.prototypes, cfg.hidden, cfg.bottleneck, cfg.layers) == (32768, 2048, 256, 3)
    with pytest.raises(ValueError, match="layers must be >= 1, got 0"):
        DinoHeadConfig(layers=0)
