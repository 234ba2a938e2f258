"""Named evaluation suites: each takes a model, a tokenizer and a data location and returns a flat dict
of metrics ("<task>/<variant>/<metric>" -> float), ready for JSON and MLflow.

| suite          | data                                   | metrics                                                  |
|----------------|----------------------------------------|----------------------------------------------------------|
| tiny           | synthetic scenes rendered in memory    | everything below on 32 train / 16 test scenes (seconds)  |
| synthetic      | write_parquet output, or in memory     | zero-shot cls + seg, patch-text, retrieval, linear seg,  |
|                |                                        | depth, kNN; each with its baseline under `baseline/`     |
| imagenet       | ImageFolder                            | zero-shot top-1/top-5, CLS1 and CLS2                     |
| coco           | COCO captions (+ split file)           | image<->text recall@1/5, CLS1 and CLS2                   |
| ade20k         | ADEChallengeData2016                   | zero-shot segmentation mIoU (sliding window)             |
| pascal_context | VOC layout, Context 59                 | zero-shot segmentation mIoU                              |
| voc            | VOC2012                                | zero-shot segmentation mIoU (background as a class name) |
| nyuv2          | NYUv2 rgb + depth                      | linear depth probe RMSE (m)                              |

    from tipsv2.eval.suites import run_suite
    metrics = run_suite("tiny", model, tokenizer)                     # about 10 s for the tiny model on a CPU
    metrics = run_suite("ade20k", model, tokenizer, DataLocation(filesystem=fs, root="bucket/ADEChallengeData2016"))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch
from torch import Tensor

from tipsv2.data import synthetic
from tipsv2.data.schema import Granularity
from tipsv2.eval import baselines, datasets, patch_text, probes, retrieval, zero_shot
from tipsv2.eval.features import (Embedding, FeatureSet, class_embeddings, embed_texts, extract_features,
                                  model_image_encoder, model_text_encoder, resize_center_crop,
                                  resize_center_crop_target)

Metrics = dict[str, float]
Tokenize = Callable[[Sequence[str]], tuple[Tensor, Tensor]]


@dataclass(frozen=True, kw_only=True)
class DataLocation:
    filesystem: pafs.FileSystem
    root: str   # a path on `filesystem` ("bucket/prefix" for S3)


def _prefixed(prefix: str, values: dict[str, Any]) -> Metrics:
    return {f"{prefix}/{k}": float(v) for k, v in values.items()}


# ---------------------------------------------------------------- synthetic scenes


@dataclass(frozen=True, kw_only=True)
class SyntheticSuiteConfig:
    scenes: synthetic.SyntheticConfig = synthetic.SyntheticConfig()
    train_count: int | None = None      # scenes of the train split for probes and kNN; None = the split size
    test_count: int | None = None       # scenes of the test split evaluated; None = the split size
    image_size: int = 112               # px fed to the model
    batch_size: int = 32
    segmentation_probe: probes.LinearSegmentationConfig = probes.LinearSegmentationConfig()
    depth_probe: probes.LinearDepthConfig = probes.LinearDepthConfig()
    knn: probes.KnnConfig = probes.KnnConfig(k=10)


def _scene_records(location: DataLocation | None, cfg: SyntheticSuiteConfig, split: synthetic.Split,
                   count: int | None) -> list[synthetic.SceneRecord]:
    if location is None:
        n = cfg.scenes.split_size(split) if count is None else count
        return [synthetic.scene_record(cfg.scenes, split, i) for i in range(n)]
    records = []
    for record in synthetic.read_split(location.root, split, filesystem=location.filesystem):
        if count is not None and len(records) == count:
            break
        records.append(record)
    return records


def _targets(records: Sequence[synthetic.SceneRecord], size: int) -> tuple[Tensor, Tensor]:
    """Semantic masks (N, S, S) long and depth maps (N, S, S) float at the model input geometry."""
    masks = np.stack([resize_center_crop_target(r.mask, size) for r in records])
    depths = np.stack([resize_center_crop_target(r.depth, size) for r in records])
    return torch.from_numpy(masks).long(), torch.from_numpy(depths).float()


def _with_data_scenes(location: DataLocation | None, cfg: SyntheticSuiteConfig) -> SyntheticSuiteConfig:
    """Scenes read from files are described by the config written beside them (what their labels name:
    shapes or colours); in-memory scenes by `cfg.scenes`."""
    written = None if location is None else synthetic.read_config(location.root, filesystem=location.filesystem)
    return cfg if written is None else dataclasses.replace(cfg, scenes=written)


def synthetic_suite(model: torch.nn.Module, tokenizer: Tokenize, location: DataLocation | None = None, *,
                    cfg: SyntheticSuiteConfig = SyntheticSuiteConfig(), train_count: int | None = None) -> Metrics:
    """Every evaluator on synthetic scenes: train split for probes and kNN, test split for the rest, and
    under `baseline/` what guessing scores on the same scenes (tipsv2.eval.baselines).
    Labels (shapes or colours, as the scenes' config says): the main (largest visible) object's class for
    classification and kNN; masks with a 'background' class for segmentation; foreground patches for
    patch-text alignment; layer-order depth for the depth probe. `train_count` (`--option train_count=256`):
    the first scenes of the train split for probes and kNN, instead of `cfg.train_count` (the probe's cost
    grows with it: the demo's 1024 scenes took most of its evaluation time)."""
    cfg = _with_data_scenes(location, cfg if train_count is None else dataclasses.replace(cfg, train_count=train_count))
    encode_image, encode_text = model_image_encoder(model), model_text_encoder(model, tokenizer)
    patch_size = model.patch_size
    size = -(-cfg.image_size // patch_size) * patch_size
    train = _scene_records(location, cfg, synthetic.Split.TRAIN, cfg.train_count)
    test = _scene_records(location, cfg, synthetic.Split.TEST, cfg.test_count)
    if not train or not test:
        raise ValueError(f"synthetic suite needs train and test scenes, got {len(train)} and {len(test)}")
    names = synthetic.class_names(cfg.scenes)

    def features(records: Sequence[synthetic.SceneRecord]) -> FeatureSet:
        return extract_features(encode_image, [r.image for r in records], image_size=size,
                                batch_size=cfg.batch_size, patch_size=patch_size, keep_patches=True)

    train_features, test_features = features(train), features(test)
    train_labels = torch.tensor([names.index(synthetic.main_category(r, cfg.scenes.label)) for r in train])
    test_labels = torch.tensor([names.index(synthetic.main_category(r, cfg.scenes.label)) for r in test])
    class_text = class_embeddings(encode_text, names, zero_shot.PROMPT_TEMPLATES)
    captions = [r.captions[g.value] for r in test for g in Granularity]
    caption_text = embed_texts(encode_text, captions)
    caption_image = torch.arange(len(test)).repeat_interleave(len(Granularity))

    out: Metrics = {"num_train": float(len(train)), "num_test": float(len(test))}
    for which in Embedding:
        out |= _prefixed(f"zero_shot_classification/{which.value}", zero_shot.classification_metrics(
            test_features.embedding(which), test_labels, class_text))
        out |= _prefixed(f"retrieval/{which.value}", retrieval.retrieval_metrics(
            test_features.embedding(which), caption_text, caption_image))
        out |= _prefixed(f"knn/{which.value}", probes.knn_classification(
            train_features.embedding(which), train_labels, test_features.embedding(which), test_labels,
            len(names), cfg.knn))

    seg_cfg = zero_shot.ZeroShotSegmentationConfig(short_side=size, patch_size=patch_size)
    out |= _prefixed("zero_shot_segmentation", zero_shot.zero_shot_segmentation(
        encode_image, encode_text, ("background", *names), [(r.image, r.mask) for r in test], seg_cfg))
    out |= _prefixed("patch_text", _patch_text(encode_image, encode_text, names, test, size=size,
                                                 patch_size=patch_size))

    train_masks, train_depth = _targets(train, size)
    test_masks, test_depth = _targets(test, size)
    out |= _prefixed("linear_segmentation", probes.linear_segmentation(
        train_features.patches, train_masks, test_features.patches, test_masks, len(names) + 1,
        cfg.segmentation_probe))
    out |= _prefixed("linear_depth", probes.linear_depth(
        train_features.patches, train_depth, test_features.patches, test_depth, cfg.depth_probe))
    out |= _prefixed("baseline", _baselines(train_labels=train_labels, test_labels=test_labels,
                                            caption_image=caption_image, test=test, num_labels=len(names) + 1,
                                            test_masks=test_masks, train_depth=train_depth, test_depth=test_depth,
                                            min_depth=cfg.depth_probe.min_depth))
    out["baseline/patch_text/accuracy"] = out["patch_text/chance"]
    return out


def _patch_text(encode_image, encode_text, names: Sequence[str], test: Sequence[synthetic.SceneRecord], *,
                size: int, patch_size: int) -> Metrics:
    """Foreground patch zero-shot accuracy and its chance (tipsv2.eval.patch_text) at the model input size,
    with the number of objects: patches of one object share its class, so objects are the independent draws."""
    items = [(resize_center_crop(r.image, size), resize_center_crop_target(r.mask, size)) for r in test]
    out = patch_text.patch_text_alignment(encode_image, encode_text, names, items,
                                          patch_text.PatchTextConfig(patch_size=patch_size))
    out = {k: v for k, v in out.items() if not k.startswith("auroc/")}   # per class: keys would vary with the data
    return out | {"num_objects": float(sum(len(r.objects) for r in test))}


def _baselines(*, train_labels: Tensor, test_labels: Tensor, caption_image: Tensor,
               test: Sequence[synthetic.SceneRecord], num_labels: int, test_masks: Tensor, train_depth: Tensor,
               test_depth: Tensor, min_depth: float) -> Metrics:
    """What guessing scores on these scenes, keyed like the metrics it stands beside."""
    full_masks = np.concatenate([r.mask.ravel() for r in test])     # zero-shot segmentation scores at label size
    return {"zero_shot_classification/top1": baselines.majority_accuracy(test_labels),
            "knn/top1": baselines.majority_accuracy(test_labels, train_labels),
            **{f"retrieval/{k}": v for k, v in baselines.retrieval_chance(caption_image).items()},
            "zero_shot_segmentation/miou": baselines.all_background_miou(full_masks, num_labels),
            "linear_segmentation/miou": baselines.all_background_miou(test_masks, num_labels),
            "linear_depth/rmse": baselines.constant_depth_rmse(train_depth, test_depth, min_depth=min_depth)}


TINY = SyntheticSuiteConfig(
    scenes=synthetic.SyntheticConfig(train_size=32, val_size=8, test_size=16),
    segmentation_probe=probes.LinearSegmentationConfig(epochs=5),
    knn=probes.KnnConfig(k=5),
)


def tiny_suite(model: torch.nn.Module, tokenizer: Tokenize, location: DataLocation | None = None) -> Metrics:
    """The synthetic suite on 32 train / 16 test scenes rendered in memory (`location` must be None)."""
    if location is not None:
        raise ValueError("the tiny suite renders its scenes in memory; pass no data location")
    return synthetic_suite(model, tokenizer, None, cfg=TINY)


# ---------------------------------------------------------------- real datasets


def _need(location: DataLocation | None, suite: str) -> DataLocation:
    if location is None:
        raise ValueError(f"suite {suite!r} needs a data location (filesystem and root)")
    return location


def imagenet_suite(model: torch.nn.Module, tokenizer: Tokenize, location: DataLocation | None, *,
                   class_names: Sequence[str] | None = None, max_items: int | None = None,
                   image_size: int = 224) -> Metrics:
    """Zero-shot top-1/top-5 with the 9 prompt templates; ImageFolder root (e.g. <imagenet>/val)."""
    loc = _need(location, "imagenet")
    data = datasets.ImageFolder(loc.filesystem, loc.root, class_names=class_names).limit(max_items)
    out: Metrics = {}
    for which in Embedding:
        cfg = zero_shot.ZeroShotClassificationConfig(embedding=which, image_size=image_size)
        out |= _prefixed(f"zero_shot_classification/{which.value}", zero_shot.zero_shot_classification(
            model_image_encoder(model), model_text_encoder(model, tokenizer), data.class_names, data, cfg,
            patch_size=model.patch_size))
    return out


def coco_suite(model: torch.nn.Module, tokenizer: Tokenize, location: DataLocation | None, *,
               split: str = "val2017", split_file: str | None = None, max_items: int | None = None,
               image_size: int = 224) -> Metrics:
    """Image<->text recall@1/5 with every caption of each image (COCO 5k style)."""
    loc = _need(location, "coco")
    data = datasets.CocoCaptions(loc.filesystem, loc.root, split=split, split_file=split_file).limit(max_items)
    out: Metrics = {}
    for which in Embedding:
        cfg = retrieval.RetrievalConfig(embedding=which, image_size=image_size)
        out |= _prefixed(f"retrieval/{which.value}", retrieval.image_text_retrieval(
            model_image_encoder(model), model_text_encoder(model, tokenizer), data, cfg,
            patch_size=model.patch_size))
    return out


def _segmentation_suite(model: torch.nn.Module, tokenizer: Tokenize, data: datasets.EvalDataset,
                        cfg: zero_shot.ZeroShotSegmentationConfig) -> Metrics:
    cfg = dataclasses.replace(cfg, patch_size=model.patch_size)
    return _prefixed("zero_shot_segmentation", zero_shot.zero_shot_segmentation(
        model_image_encoder(model), model_text_encoder(model, tokenizer), data.class_names, data, cfg))


SLIDE_448 = zero_shot.ZeroShotSegmentationConfig(mode=zero_shot.SegMode.SLIDE, short_side=448, window=448, stride=336)


def ade20k_suite(model: torch.nn.Module, tokenizer: Tokenize, location: DataLocation | None, *,
                 max_items: int | None = None, cfg: zero_shot.ZeroShotSegmentationConfig = SLIDE_448) -> Metrics:
    """Zero-shot segmentation on the 150 ADE20K classes (official TIPS protocol: 448 px, slide, stride 336)."""
    loc = _need(location, "ade20k")
    return _segmentation_suite(model, tokenizer, datasets.Ade20k(loc.filesystem, loc.root).limit(max_items), cfg)


def pascal_context_suite(model: torch.nn.Module, tokenizer: Tokenize, location: DataLocation | None, *,
                         max_items: int | None = None,
                         cfg: zero_shot.ZeroShotSegmentationConfig = SLIDE_448) -> Metrics:
    loc = _need(location, "pascal_context")
    return _segmentation_suite(model, tokenizer, datasets.pascal_context(loc.filesystem, loc.root).limit(max_items),
                               cfg)


def voc_suite(model: torch.nn.Module, tokenizer: Tokenize, location: DataLocation | None, *,
              max_items: int | None = None, cfg: zero_shot.ZeroShotSegmentationConfig = SLIDE_448) -> Metrics:
    loc = _need(location, "voc")
    return _segmentation_suite(model, tokenizer, datasets.pascal_voc(loc.filesystem, loc.root).limit(max_items), cfg)


def nyuv2_suite(model: torch.nn.Module, tokenizer: Tokenize, location: DataLocation | None, *,
                max_train: int | None = None, max_test: int | None = None, image_size: int = 448,
                cfg: probes.LinearDepthConfig = probes.LinearDepthConfig()) -> Metrics:
    """Linear depth probe: ridge regression on patch tokens of the train split, RMSE (m) on the test split."""
    loc = _need(location, "nyuv2")
    encode_image = model_image_encoder(model)
    size = -(-image_size // model.patch_size) * model.patch_size
    splits = {}
    for split, count in (("train", max_train), ("test", max_test)):
        data = datasets.NyuDepth(loc.filesystem, loc.root, split=split).limit(count)
        items = list(data)
        feats = extract_features(encode_image, [image for image, _ in items], image_size=size,
                                 patch_size=model.patch_size, keep_patches=True)
        depth = torch.from_numpy(np.stack([resize_center_crop_target(d, size) for _, d in items]))
        splits[split] = (feats.patches, depth)
    return _prefixed("linear_depth", probes.linear_depth(*splits["train"], *splits["test"], cfg))


Suite = Callable[..., Metrics]
SUITES: dict[str, Suite] = {
    "tiny": tiny_suite,
    "synthetic": synthetic_suite,
    "imagenet": imagenet_suite,
    "coco": coco_suite,
    "ade20k": ade20k_suite,
    "pascal_context": pascal_context_suite,
    "voc": voc_suite,
    "nyuv2": nyuv2_suite,
}


def run_suite(name: str, model: torch.nn.Module, tokenizer: Tokenize, location: DataLocation | None = None,
              **options: Any) -> Metrics:
    """Run the named suite with the model in eval mode (restored afterwards). The model is only read
    without gradients; the probes train their own small heads."""
    if name not in SUITES:
        raise ValueError(f"unknown evaluation suite {name!r}; expected one of {sorted(SUITES)}")
    was_training = model.training
    model.eval()
    try:
        return SUITES[name](model, tokenizer, location, **options)
    finally:
        model.train(was_training)
