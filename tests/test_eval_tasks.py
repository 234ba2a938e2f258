"""Evaluators: exact answers with a colour-reading stand-in encoder, chance with shuffled features, and the
plumbing with the tiny random TIPSModel against a plain re-computation."""

from __future__ import annotations

import math

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tipsv2.data import synthetic
from tipsv2.eval import features, probes, retrieval, suites, zero_shot
from tipsv2.models import ImageFeatures, build_model
from tipsv2.tokenizer import Tokenizer, train_tokenizer

CLASSES = ("cat", "dog", "car", "tree")
PALETTE = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)], np.float32) / 255   # class colours
BACKGROUND = (0.5, 0.5, 0.5)   # grey: close to no class colour
P = 14


def colour_encoder(images: torch.Tensor, *, dense: bool = False) -> ImageFeatures:
    """Reads each 14 px patch's mean colour: a one-hot of the nearest class colour (zeros for grey);
    cls1 is the one-hot of the majority class, cls2 the same shifted by one class."""
    b, _, h, w = images.shape
    means = F.avg_pool2d(images, P).permute(0, 2, 3, 1).reshape(b, -1, 3)          # (B, N, 3)
    dist = torch.cdist(means, torch.from_numpy(PALETTE))                             # (B, N, C)
    patches = F.one_hot(dist.argmin(-1), len(CLASSES)).float()
    patches[dist.min(-1).values > 0.3] = 0.0                                         # background patches
    cls1 = F.one_hot(patches.sum(1).argmax(-1), len(CLASSES)).float()
    return ImageFeatures(cls1=cls1, cls2=cls1.roll(1, dims=1), patches=patches)


def name_encoder(texts):
    """One-hot of the class name a text mentions."""
    return torch.stack([F.one_hot(torch.tensor(next(i for i, c in enumerate(CLASSES) if c in t)),
                                  len(CLASSES)).float() for t in texts])


def blocky_scene(rng: np.random.Generator, grid: tuple[int, int], *, background: bool = False
                 ) -> tuple[Image.Image, np.ndarray]:
    """Image in horizontal bands one patch high, each of one class colour; label (H, W) uint8 of the
    classes (with background=True, label 0 is grey background and class i is label i + 1). Bands keep
    the bilinear upsampling one-dimensional, where the nearest patch always has the larger weight, so
    perfect patch features give a perfect pixel prediction (at 2 x 2 patch corners they would not)."""
    rows = rng.integers(-1 if background else 0, len(CLASSES), size=(grid[0], 1))
    cells = np.repeat(rows, grid[1], axis=1)
    label = np.kron(cells + (1 if background else 0), np.ones((P, P), np.int64)).astype(np.uint8)
    colours = np.concatenate([PALETTE, np.array([BACKGROUND], np.float32)])[cells]   # -1 picks grey
    image = np.kron(colours.transpose(2, 0, 1), np.ones((1, P, P), np.float32)).transpose(1, 2, 0)
    return Image.fromarray(np.rint(image * 255).astype(np.uint8)), label


def test_class_embeddings_normalise_each_template_then_average():
    def encode(texts):   # unequal norms: averaging without per-template normalisation would differ
        return torch.tensor([[3.0, 0.0] if t.startswith("a") else [0.0, 1.0] for t in texts])
    got = features.class_embeddings(encode, ["x"], ["a {}", "b {}"])
    torch.testing.assert_close(got, torch.tensor([[1.0, 1.0]]) / math.sqrt(2))


@pytest.mark.parametrize("mode", [zero_shot.SegMode.WHOLE, zero_shot.SegMode.SLIDE])
def test_zero_shot_segmentation_is_perfect_with_aligned_features(mode):
    rng = np.random.default_rng(0)
    items = [blocky_scene(rng, (4, 5)) for _ in range(3)]
    items[0][1][:5, :9] = 255   # ignored pixels never count
    cfg = zero_shot.ZeroShotSegmentationConfig(mode=mode, short_side=4 * P, window=2 * P, stride=P)
    result = zero_shot.zero_shot_segmentation(colour_encoder, name_encoder, CLASSES, items, cfg)
    assert result["miou"] == 1.0 and result["pixel_accuracy"] == 1.0 and result["num_images"] == 3


def test_zero_shot_segmentation_background_threshold():
    rng = np.random.default_rng(1)
    items = [blocky_scene(rng, (3, 3), background=True) for _ in range(4)]
    assert any((label == 0).any() for _, label in items)
    cfg = zero_shot.ZeroShotSegmentationConfig(short_side=3 * P, background=zero_shot.Background.THRESHOLD,
                                               background_threshold=0.5)
    assert zero_shot.zero_shot_segmentation(colour_encoder, name_encoder, CLASSES, items, cfg)["miou"] == 1.0
    labelled = zero_shot.ZeroShotSegmentationConfig(short_side=3 * P)   # background labels do not fit: error
    with pytest.raises(ValueError, match="label values"):
        zero_shot.zero_shot_segmentation(colour_encoder, name_encoder, CLASSES, items, labelled)


def test_zero_shot_segmentation_with_mismatched_class_names_scores_zero():
    rng = np.random.default_rng(2)
    items = [blocky_scene(rng, (6, 6)) for _ in range(8)]
    shifted = CLASSES[1:] + CLASSES[:1]   # every class text points at another class
    cfg = zero_shot.ZeroShotSegmentationConfig(short_side=6 * P)
    assert zero_shot.zero_shot_segmentation(colour_encoder, name_encoder, shifted, items, cfg)["miou"] == 0.0


def test_zero_shot_segmentation_with_random_features_is_near_chance():
    generator = torch.Generator().manual_seed(0)

    def random_encoder(images, *, dense=False):
        b, _, h, w = images.shape
        patches = torch.randn(b, (h // P) * (w // P), len(CLASSES), generator=generator)
        return ImageFeatures(cls1=patches[:, 0], cls2=patches[:, 0], patches=patches)

    rng = np.random.default_rng(5)
    items = [blocky_scene(rng, (8, 8)) for _ in range(20)]
    cfg = zero_shot.ZeroShotSegmentationConfig(short_side=8 * P)
    result = zero_shot.zero_shot_segmentation(random_encoder, name_encoder, CLASSES, items, cfg)
    # Uniform guesses over 4 balanced classes: IoU = (1/16) / (1/4 + 1/4 - 1/16) = 1/7 per class.
    assert result["miou"] == pytest.approx(1 / 7, abs=0.04)


def test_slide_windows_cover_the_image_and_stay_inside():
    assert zero_shot._window_starts(100, 40, 30) == [0, 30, 60]
    assert zero_shot._window_starts(30, 40, 30) == [0]
    assert zero_shot._window_starts(70, 40, 30) == [0, 30]


def test_zero_shot_classification_aligned_and_shuffled():
    rng = np.random.default_rng(3)
    items = []
    for _ in range(40):
        image, label = blocky_scene(rng, (3, 3))
        items.append((image, int(np.bincount(label[::P, ::P].ravel(), minlength=4).argmax())))
    cfg = zero_shot.ZeroShotClassificationConfig(image_size=3 * P)
    aligned = zero_shot.zero_shot_classification(colour_encoder, name_encoder, CLASSES, items, cfg)
    assert aligned["top1"] == 1.0 and aligned["num_images"] == 40
    shifted = zero_shot.ZeroShotClassificationConfig(image_size=3 * P, embedding=features.Embedding.CLS2)
    assert zero_shot.zero_shot_classification(colour_encoder, name_encoder, CLASSES, items, shifted)["top1"] == 0.0


def test_retrieval_aligned_is_perfect_and_shuffled_is_chance():
    torch.manual_seed(0)
    images = torch.randn(300, 64)
    text_image = torch.arange(300).repeat_interleave(2)               # two captions per image
    texts = images[text_image] + 0.01 * torch.randn(600, 64)
    aligned = retrieval.retrieval_metrics(images, texts, text_image)
    assert aligned == {"i2t_r1": 1.0, "i2t_r5": 1.0, "t2i_r1": 1.0, "t2i_r5": 1.0}
    shuffled = retrieval.retrieval_metrics(images, texts[torch.randperm(600)], text_image)
    assert shuffled["t2i_r1"] < 0.02 and shuffled["t2i_r5"] < 0.05      # chance: 1/300 and 5/300
    assert shuffled["i2t_r1"] < 0.03                                    # chance: about 2/300


def test_image_text_retrieval_driver_with_captions_per_image():
    items = []
    for c, name in enumerate(CLASSES):
        image = Image.fromarray(np.full((P, P, 3), PALETTE[c] * 255, np.uint8))
        items.append((image, [f"a {name}", f"the {name} here"]))
    cfg = retrieval.RetrievalConfig(embedding=features.Embedding.CLS1, image_size=P, batch_size=3)
    result = retrieval.image_text_retrieval(colour_encoder, name_encoder, items, cfg)
    assert result["i2t_r1"] == 1.0 and result["t2i_r1"] == 1.0
    assert result["num_images"] == 4 and result["num_texts"] == 8


def test_knn_on_separable_clusters_and_on_random_labels():
    torch.manual_seed(0)
    centres = 5 * torch.randn(5, 16)
    train_labels, test_labels = torch.arange(5).repeat(40), torch.arange(5).repeat(10)
    train = centres[train_labels] + torch.randn(200, 16) * 0.3
    test = centres[test_labels] + torch.randn(50, 16) * 0.3
    assert probes.knn_classification(train, train_labels, test, test_labels, 5)["top1"] == 1.0
    random_labels = train_labels[torch.randperm(200)]
    assert probes.knn_classification(train, random_labels, test, test_labels, 5)["top1"] < 0.5


def test_knn_votes_match_a_plain_loop():
    torch.manual_seed(1)
    train, test = torch.randn(30, 8), torch.randn(6, 8)
    labels = torch.randint(0, 3, (30,))
    cfg = probes.KnnConfig(k=4, temperature=0.5)
    got = probes.knn_classification(train, labels, test, torch.zeros(6, dtype=torch.long), 3, cfg, ks=(1,))
    expected = 0
    for row in test:
        sims = [float(F.cosine_similarity(row, t, dim=0)) for t in train]
        nearest = sorted(range(30), key=lambda j: -sims[j])[:4]
        votes = [sum(math.exp(sims[j] / 0.5) for j in nearest if labels[j] == c) for c in range(3)]
        expected += int(np.argmax(votes) == 0)
    assert got["top1"] == pytest.approx(expected / 6)


def test_linear_segmentation_probe_learns_separable_patches():
    torch.manual_seed(0)
    labels_grid = torch.randint(0, 3, (24, 4, 4))                            # (N, h, w)
    feats = F.one_hot(labels_grid, 3).float() @ torch.randn(3, 8) + 0.05 * torch.randn(24, 4, 4, 8)
    labels = labels_grid.clone()                                             # at patch resolution
    labels[0, :1] = 255
    cfg = probes.LinearSegmentationConfig(epochs=30, batch_size=8)
    trained = probes.linear_segmentation(feats[:16], labels[:16], feats[16:], labels[16:], 3, cfg)
    assert trained["miou"] > 0.99
    untrained = probes.LinearSegmentationConfig(epochs=0)
    assert probes.linear_segmentation(feats[:16], labels[:16], feats[16:], labels[16:], 3, untrained)["miou"] < 0.9


def test_linear_depth_probe_matches_least_squares_and_recovers_linear_depth():
    torch.manual_seed(0)
    depth_value = torch.rand(20) * 5 + 1                                     # one depth per image, m
    feats = torch.randn(20, 2, 2, 6)
    feats[..., 0] = depth_value[:, None, None] * 2 + 0.5                     # depth is linear in feature 0
    depth = depth_value[:, None, None].expand(20, 28, 28).clone()
    depth[:, 0, 0] = 0.0                                                     # invalid pixels are skipped
    cfg = probes.LinearDepthConfig(ridge=0.0)
    assert probes.linear_depth(feats[:12], depth[:12], feats[12:], depth[12:], cfg)["rmse"] < 1e-3

    noisy = feats + 0.5 * torch.randn_like(feats)
    probe = probes.train_linear_depth(noisy[:12], depth[:12], cfg)
    x = noisy[:12].reshape(-1, 6).double().numpy()
    target = depth_value[:12].repeat_interleave(4).double().numpy()          # 4 patches per image
    coef, *_ = np.linalg.lstsq(np.c_[x, np.ones(len(x))], target, rcond=None)
    expected = np.c_[noisy[12:].reshape(-1, 6).double().numpy(), np.ones(32)] @ coef
    np.testing.assert_allclose(probe(noisy[12:]).reshape(-1).numpy(), expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- the tiny TIPSModel


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model("tiny").eval()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    cfg = synthetic.SyntheticConfig()
    texts = [c for i in range(40) for c in synthetic.make_scene(cfg, "train", i).captions.values()]
    texts += [t.format(n) for n in ("background", *synthetic.class_names()) for t in zero_shot.PROMPT_TEMPLATES]
    path = train_tokenizer(texts, vocab_size=200, out_path=tmp_path_factory.mktemp("tok") / "spm.model")
    return Tokenizer(path, max_len=32)


@pytest.mark.parametrize("dense", [True, False])
def test_zero_shot_segmentation_matches_a_plain_computation_with_the_tiny_model(tiny_model, tokenizer, dense):
    scene = synthetic.make_scene(synthetic.SyntheticConfig(image_size=100), "test", 0)
    names = ("background", *synthetic.class_names())
    encode_image = features.model_image_encoder(tiny_model)
    encode_text = features.model_text_encoder(tiny_model, tokenizer)
    class_text = features.class_embeddings(encode_text, names, zero_shot.PROMPT_TEMPLATES)
    cfg = zero_shot.ZeroShotSegmentationConfig(short_side=100, dense=dense)
    pred = zero_shot.predict_segmentation(encode_image, scene.image, class_text, (100, 100), cfg)

    with torch.no_grad():   # plain: resize to 112 px (multiple of 14), encode, cosine, upsample, argmax
        pixels = torch.from_numpy(np.asarray(scene.image, np.float32) / 255).permute(2, 0, 1)[None]
        pixels = F.interpolate(pixels, size=(112, 112), mode="bicubic", align_corners=False).clamp(0, 1)
        patches = tiny_model.encode_image(pixels, dense=dense).patches[0].reshape(8, 8, -1)
        cos = torch.einsum("cd,hwd->chw", class_text, F.normalize(patches, dim=-1))
        expected = F.interpolate(cos[None], size=(100, 100), mode="bilinear", align_corners=False)[0].argmax(0)
    torch.testing.assert_close(pred, expected)
    with torch.no_grad():   # the flag matters: value-attention tokens differ from the ordinary ones
        other = tiny_model.encode_image(pixels, dense=not dense).patches[0].reshape(8, 8, -1)
    assert not torch.allclose(other, patches)


def test_tiny_suite_runs_end_to_end_with_the_tiny_model(tiny_model, tokenizer):
    result = suites.run_suite("tiny", tiny_model, tokenizer)
    expected_keys = {"zero_shot_classification/cls1/top1", "zero_shot_classification/cls2/top5",
                     "retrieval/cls2/i2t_r1", "retrieval/cls1/t2i_r5", "knn/cls1/top1",
                     "zero_shot_segmentation/miou", "linear_segmentation/miou", "linear_depth/rmse"}
    assert expected_keys <= set(result)
    assert result["num_train"] == 32 and result["num_test"] == 16
    for key, value in result.items():
        assert math.isfinite(value), key
        if "/top" in key or "_r" in key or "miou" in key:
            assert 0.0 <= value <= 1.0, key
    assert result["linear_depth/rmse"] > 0
    for key in ("zero_shot_classification/top1", "knn/top1", "retrieval/i2t_r1", "zero_shot_segmentation/miou",
                "linear_segmentation/miou", "linear_depth/rmse", "patch_text/accuracy"):   # each metric's baseline
        assert f"baseline/{key}" in result, key
    assert result["baseline/retrieval/t2i_r1"] == pytest.approx(1 / 16)          # 16 test scenes
    assert 0.0 <= result["patch_text/accuracy"] <= 1.0 and result["patch_text/num_objects"] >= 16
    with pytest.raises(ValueError, match="unknown evaluation suite 'nope'"):
        suites.run_suite("nope", tiny_model, tokenizer)


def test_synthetic_suite_reads_parquet_like_it_renders_in_memory(tiny_model, tokenizer, tmp_path):
    scenes = synthetic.SyntheticConfig(train_size=8, val_size=1, test_size=4)
    cfg = suites.SyntheticSuiteConfig(scenes=scenes, segmentation_probe=probes.LinearSegmentationConfig(epochs=2),
                                      knn=probes.KnnConfig(k=3))
    synthetic.write_parquet(str(tmp_path), scenes)
    location = suites.DataLocation(filesystem=pafs.LocalFileSystem(), root=str(tmp_path))
    from_files = suites.run_suite("synthetic", tiny_model, tokenizer, location, cfg=cfg)
    in_memory = suites.run_suite("synthetic", tiny_model, tokenizer, None, cfg=cfg)
    assert from_files == pytest.approx(in_memory, abs=1e-6)
    assert from_files["num_train"] == 8 and from_files["num_test"] == 4
    with pytest.raises(ValueError, match="needs a data location"):
        suites.run_suite("ade20k", tiny_model, tokenizer)


def test_synthetic_suite_reads_what_the_labels_name_from_the_data(tiny_model, tokenizer, tmp_path):
    """Colour-labelled scenes on disk are scored with colour class names, though the suite's own config
    says shapes: the config written beside the scenes wins (else the masks' labels would be misnamed)."""
    scenes = synthetic.SyntheticConfig(label=synthetic.Label.COLOUR, colours=(synthetic.Colour.RED,
                                       synthetic.Colour.BLUE), size_scale=1.6, train_size=6, val_size=1, test_size=4)
    synthetic.write_parquet(str(tmp_path), scenes)
    assert synthetic.read_config(str(tmp_path)) == scenes
    cfg = suites.SyntheticSuiteConfig(segmentation_probe=probes.LinearSegmentationConfig(epochs=1),
                                      knn=probes.KnnConfig(k=3))
    location = suites.DataLocation(filesystem=pafs.LocalFileSystem(), root=str(tmp_path))
    result = suites.run_suite("synthetic", tiny_model, tokenizer, location, cfg=cfg)
    in_memory = suites.run_suite("synthetic", tiny_model, tokenizer, None, cfg=suites.SyntheticSuiteConfig(
        scenes=scenes, segmentation_probe=probes.LinearSegmentationConfig(epochs=1), knn=probes.KnnConfig(k=3)))
    assert result == pytest.approx(in_memory, abs=1e-6)
    assert result["patch_text/chance/uniform"] == 0.5                            # two colours
    assert not any(k.startswith("patch_text/auroc/") for k in result)          # the same keys whatever the data
