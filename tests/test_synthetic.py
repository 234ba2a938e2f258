"""Synthetic scenes: determinism, ground truth consistent with the pixels, captions, alt-text noise, Parquet."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tipsv2.data import synthetic as syn
from tipsv2.data.schema import IMAGES, Granularity, caption_column

CFG = syn.SyntheticConfig(train_size=5, val_size=2, test_size=3)


def test_scenes_are_deterministic_per_seed_split_and_index():
    a, b = syn.make_scene(CFG, "train", 3), syn.make_scene(CFG, "train", 3)
    assert a.image.tobytes() == b.image.tobytes() and a.captions == b.captions and a.alt_text == b.alt_text
    np.testing.assert_array_equal(a.mask, b.mask)
    others = [syn.make_scene(CFG, "train", 4), syn.make_scene(CFG, "val", 3),
              syn.make_scene(syn.SyntheticConfig(seed=1), "train", 3)]
    assert all(o.image.tobytes() != a.image.tobytes() for o in others)


@pytest.mark.parametrize("index", range(12))
def test_mask_depth_and_pixels_agree_with_a_plain_redraw(index):
    scene = syn.make_scene(CFG, "test", index)
    n = CFG.image_size
    image = np.asarray(scene.image)
    assert image.shape == (n, n, 3) and scene.mask.shape == (n, n) and scene.depth.dtype == np.float32
    # Plain re-composition: each object's shape minus everything drawn after it.
    covered = np.zeros((n, n), bool)
    for obj in sorted(scene.objects, key=lambda o: -o.layer):
        full = syn.shape_mask(obj.category, obj.center, syn.SIZE_FRACTION[obj.size] * n / 2, obj.rotation, n)
        visible = full & ~covered
        covered |= full
        assert visible.sum() == obj.visible_pixels > 0
        assert visible.sum() >= CFG.min_visible_fraction * full.sum()
        assert (scene.mask[visible] == CFG.shapes.index(obj.category) + 1).all()
        assert (image[visible] == syn.RGB[obj.colour]).all()
        assert (scene.depth[visible] == CFG.background_depth - CFG.layer_step * (obj.layer + 1)).all()
    assert (scene.mask[~covered] == 0).all() and (scene.depth[~covered] == CFG.background_depth).all()
    assert [o.layer for o in scene.objects] == list(range(len(scene.objects)))
    assert 1 <= len(scene.objects) <= CFG.max_objects


def test_captions_describe_the_objects():
    for index in range(30):
        scene = syn.make_scene(CFG, "train", index)
        main = max(scene.objects, key=lambda o: (o.visible_pixels, -o.layer))
        short, medium, long = (scene.captions[g.value] for g in Granularity)
        assert short in (f"a {main.name()}", f"an {main.name()}")
        assert medium.endswith(f"on a {syn.TEXTURE_WORD[scene.texture]} background")
        for obj in scene.objects:
            assert f"{obj.size.value} {obj.name()}" in medium and obj.name() in long
        assert long.startswith(f"A {syn.TEXTURE_WORD[scene.texture]} background with {len(scene.objects)} shape")
        assert len(long) > len(medium) > len(short)


def test_long_caption_spatial_relations_on_a_hand_made_scene():
    def obj(shape, colour, center, layer):
        return syn.SceneObject(category=shape, colour=colour, size=syn.Size.MEDIUM, center=center, rotation=0.0,
                               layer=layer, visible_pixels=100 - layer)
    objects = [obj(syn.Shape.CIRCLE, syn.Colour.RED, (20.0, 20.0), 0),
               obj(syn.Shape.SQUARE, syn.Colour.BLUE, (90.0, 95.0), 1)]
    text = syn.long_caption(objects, syn.Texture.CHECKS, 112, overlaps={(1, 0)})
    assert text == ("A checkered background with 2 shapes. A medium red circle is in the top left. "
                    "A medium blue square is in the bottom right. The blue square is right of and below the "
                    "red circle. The blue square is in front of the red circle.")


def test_alt_text_noise_rate():
    clean = syn.SyntheticConfig(alt_text_noise=0.0)
    for index in range(10):
        scene = syn.make_scene(clean, "train", index)
        assert scene.alt_text == ", ".join(o.name() for o in scene.objects)
    noisy = syn.SyntheticConfig(alt_text_noise=0.3)
    kept = total = 0
    for index in range(400):
        scene = syn.make_scene(noisy, "train", index)
        tags = (scene.alt_text or "").split(", ")
        kept += sum(o.name() in tags for o in scene.objects)
        total += len(scene.objects)
    # A tag survives unchanged with probability 0.7 (a wrong tag rarely equals another object's name).
    assert 0.64 < kept / total < 0.78
    always = syn.SyntheticConfig(alt_text_noise=1.0, max_objects=1)
    single = [syn.make_scene(always, "train", i) for i in range(60)]
    assert all(s.alt_text != s.objects[0].name() for s in single)
    assert any(s.alt_text is None for s in single)   # a missing only tag leaves no alt-text (nullable column)


def test_config_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="min_objects <= max_objects, got 3, 2"):
        syn.SyntheticConfig(min_objects=3, max_objects=2)
    with pytest.raises(ValueError, match="alt_text_noise must be in"):
        syn.SyntheticConfig(alt_text_noise=1.5)
    assert syn.class_names(CFG) == ("circle", "square", "triangle", "star", "cross", "ring")


def test_write_parquet_round_trip(tmp_path):
    written = syn.write_parquet(str(tmp_path), CFG)
    assert {s: w["rows"] for s, w in written.items()} == {"train": 5, "val": 2, "test": 3}
    table = pq.read_table(written["test"]["paths"]["images"])
    assert table.schema.equals(IMAGES, check_metadata=False) and table.num_rows == 3
    ids = set()
    for index, row in enumerate(table.to_pylist()):
        scene = syn.make_scene(CFG, "test", index)
        assert row["sha256"] == hashlib.sha256(row["image"]).hexdigest() and row["id"] == row["sha256"][:32]
        assert (row["format"], row["width"], row["height"]) == ("PNG", 112, 112)
        assert row["source"] == f"synthetic://test/{index}" and row["alt_text"] == scene.alt_text
        assert Image.open(io.BytesIO(row["image"])).tobytes() == scene.image.tobytes()
        ids.add(row["id"])
    assert len(ids) == 3
    truth = pq.read_table(written["test"]["paths"]["ground_truth"]).to_pylist()
    first = syn.make_scene(CFG, "test", 0)
    np.testing.assert_array_equal(np.array(Image.open(io.BytesIO(truth[0]["mask"]))), first.mask)
    np.testing.assert_array_equal(np.load(io.BytesIO(truth[0]["depth"]), allow_pickle=False), first.depth)
    assert truth[0][caption_column("long")] == first.captions["long"]
    assert [o["category"] for o in json.loads(truth[0]["objects"])] == [o.category.value for o in first.objects]

    records = list(syn.read_split(str(tmp_path), "test", filesystem=pafs.LocalFileSystem()))
    assert [r.id for r in records] == [row["id"] for row in table.to_pylist()]
    in_memory = syn.scene_record(CFG, "test", 2)
    assert records[2].captions == in_memory.captions and records[2].id == in_memory.id
    np.testing.assert_array_equal(records[2].depth, in_memory.depth)
    assert syn.main_category(records[2]) == syn.main_category(in_memory)


def test_read_split_names_the_missing_directory(tmp_path):
    with pytest.raises(ValueError, match=r"missing directory '.*/val/images'"):
        list(syn.read_split(str(tmp_path), "val"))


def test_scene_ids_are_the_ids_ingest_gives_the_same_bytes():
    """One id rule (tipsv2.data.schema.image_id) for synthetic rows and ingested files: re-ingesting a
    written scene's PNG keeps its id, so its ground truth still joins."""
    from tipsv2.data.schema import image_id

    scene = syn.make_scene(syn.SyntheticConfig(image_size=56), "train", 3)
    image_row, truth_row = syn.scene_rows(scene, "train", 3)
    assert image_row["id"] == truth_row["id"] == image_id(hashlib.sha256(image_row["image"]).hexdigest())
    assert len(image_row["id"]) == 32


def test_label_texts_name_the_labels_alone_and_leave_the_scene_as_it_was():
    scene_cfg = syn.SyntheticConfig(image_size=64, max_objects=3, train_size=6)
    labels_cfg = dataclasses.replace(scene_cfg, texts=syn.Texts.LABELS)
    for index in range(6):
        scene, labelled = syn.make_scene(scene_cfg, "train", index), syn.make_scene(labels_cfg, "train", index)
        assert np.array_equal(np.asarray(scene.image), np.asarray(labelled.image))
        assert np.array_equal(scene.mask, labelled.mask) and scene.objects == labelled.objects
        words = [f"a {o.category.value}" for o in sorted(scene.objects, key=lambda o: (-o.visible_pixels, o.layer))]
        expected = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
        assert labelled.alt_text == expected
        assert set(labelled.captions.values()) == {expected} and set(labelled.captions) == set(scene.captions)
    one = dataclasses.replace(labels_cfg, label=syn.Label.COLOUR, max_objects=1)
    colours = {syn.make_scene(one, "train", i).alt_text for i in range(12)}
    assert colours <= {f"{'an' if c.value[0] in 'aeiou' else 'a'} {c.value}" for c in syn.Colour} and len(colours) > 1
