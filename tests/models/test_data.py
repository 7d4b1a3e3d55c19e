import json

import numpy as np
import pytest
import torch
from PIL import Image

from models.data import (CategoryMap, CocoAnnotations, CocoDataset, TransformConfig, aspect_grouped_batches,
                         collate, load_image, make_loader, resized_shape)
from models.errors import DataError
from models.masks import encode_rle


def _coco(cats=((3, "cat"), (17, "dog"), (1000, "yak")), crowd=False):
    m = np.zeros((40, 60), np.uint8)
    m[5:20, 10:40] = 1
    anns = [
        {"id": 1, "image_id": 7, "category_id": 17, "segmentation": [[10, 5, 40, 5, 40, 20, 10, 20]], "iscrowd": 0},
        {"id": 2, "image_id": 7, "category_id": 1000, "segmentation": encode_rle(m), "iscrowd": 0},
    ]
    if crowd:
        anns.append({"id": 3, "image_id": 7, "category_id": 3, "segmentation": encode_rle(m), "iscrowd": 1})
    return {"images": [{"id": 7, "file_name": "a.jpg", "height": 40, "width": 60}],
            "annotations": anns, "categories": [{"id": i, "name": n} for i, n in cats]}


def test_category_ids_map_to_contiguous_and_back():
    cm = CategoryMap.from_coco([{"id": 1000, "name": "yak"}, {"id": 3, "name": "cat"}, {"id": 17, "name": "dog"}])
    assert cm.ids == (3, 17, 1000) and cm.names == ("cat", "dog", "yak")
    assert [cm.index_of(i) for i in (3, 17, 1000)] == [0, 1, 2]
    assert [cm.id_of(i) for i in range(3)] == [3, 17, 1000]
    assert CategoryMap.from_coco(cm.to_coco()) == cm


def test_dataset_labels_masks_and_crowd(write_coco):
    ann_path, images = write_coco(_coco(crowd=True))
    ann = CocoAnnotations(ann_path, images)
    s = CocoDataset(ann, TransformConfig(short_side=80, max_long_side=200, flip_prob=0.0), train=True)[0]
    assert s.labels.tolist() == [1, 2]  # crowd (cat) dropped in training; dog=1, yak=2
    assert s.input_size == (80, 120) and s.masks.shape == (2, 80, 120)
    assert s.orig_size == (40, 60)
    ev = CocoDataset(ann, TransformConfig(short_side=80, max_long_side=200), train=False)[0]
    assert ev.labels.tolist() == [1, 2, 0]  # evaluation keeps crowd regions
    assert torch.allclose(s.boxes[1], torch.tensor([20.0, 10.0, 80.0, 40.0]))


def test_categories_mapped_by_name_to_a_model(write_coco):
    ann_path, images = write_coco(_coco(cats=((5, "dog"), (6, "yak"), (3, "cat"))))
    model_cats = CategoryMap((1, 2, 3), ("yak", "cat", "dog"))
    coco = json.loads(ann_path.read_text())
    for a in coco["annotations"]:
        a["category_id"] = {17: 5, 1000: 6}[a["category_id"]]
    ann_path.write_text(json.dumps(coco))
    ann = CocoAnnotations(ann_path, images, categories=model_cats)
    s = CocoDataset(ann, TransformConfig(40, 60, flip_prob=0.0), train=True)[0]
    assert s.labels.tolist() == [2, 0]
    with pytest.raises(DataError, match="not among the model"):
        CocoAnnotations(ann_path, images, categories=CategoryMap((1,), ("zebra",)))


def test_resize_keeps_aspect_and_collate_pads_to_32(tmp_path):
    from skimage import data as skdata

    t = TransformConfig(short_side=100, max_long_side=150)
    assert resized_shape(512, 512, t) == (100, 100)
    assert resized_shape(400, 600, t) == (100, 150)
    assert resized_shape(300, 900, t) == (50, 150)  # long side capped
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    for i, (name, arr) in enumerate([("astronaut", skdata.astronaut()), ("coffee", skdata.coffee()),
                                     ("chelsea", skdata.chelsea())]):
        Image.fromarray(arr).save(tmp_path / f"{name}.png")
        h, w = arr.shape[:2]
        m = np.zeros((h, w), np.uint8)
        m[h // 4: h // 2, w // 4: w // 2] = 1
        coco["images"].append({"id": i, "file_name": f"{name}.png", "height": h, "width": w})
        coco["annotations"].append({"id": i, "image_id": i, "category_id": 1, "segmentation": encode_rle(m),
                                    "iscrowd": 0})
    (tmp_path / "a.json").write_text(json.dumps(coco))
    ds = CocoDataset(CocoAnnotations(tmp_path / "a.json", tmp_path), t, train=False)
    batch = collate([ds[0], ds[1], ds[2]])
    assert batch.images.shape[-2] % 32 == 0 and batch.images.shape[-1] % 32 == 0
    assert batch.images.shape[-2:] == (128, 160)
    for i, tg in enumerate(batch.targets):
        h, w = tg["input_size"]
        assert tg["masks"].shape[-2:] == batch.images.shape[-2:]
        assert tg["masks"][:, h:].sum() == 0 and tg["masks"][:, :, w:].sum() == 0
        assert torch.equal(batch.images[i, :, :h, :w], ds[i].image)
        assert batch.images[i, :, h:].abs().sum() == 0


def test_flip_moves_masks_and_boxes_with_the_image(write_coco):
    ann_path, images = write_coco(_coco())
    ann = CocoAnnotations(ann_path, images)
    a = CocoDataset(ann, TransformConfig(40, 60, flip_prob=0.0), train=True)[0]
    b = CocoDataset(ann, TransformConfig(40, 60, flip_prob=1.0), train=True)[0]
    assert torch.equal(b.image, a.image.flip(-1)) and torch.equal(b.masks, a.masks.flip(-1))
    w = a.input_size[1]
    assert torch.allclose(b.boxes[:, [0, 2]], w - a.boxes[:, [2, 0]])


def test_aspect_grouped_batches_never_mix_orientations():
    landscape = [True, False, True, True, False, False, True]
    gen = torch.Generator().manual_seed(0)
    batches = aspect_grouped_batches(landscape, 2, gen)
    assert sorted(i for b in batches for i in b) == list(range(7))
    assert all(len({landscape[i] for i in b}) == 1 for b in batches)


def test_loader_is_deterministic_by_seed(voc_coco):
    ann = CocoAnnotations(*voc_coco)
    ds = CocoDataset(ann, TransformConfig(64, 96), train=False)
    assert len(list(make_loader(ds, 1, shuffle=True, seed=3))) == 1


BAD = [
    ("not json", lambda c: "{nope", "not valid JSON"),
    ("not coco", lambda c: {"hello": 1}, "'images' must be a list"),
    ("ann -> missing image", lambda c: {**c, "annotations": [{**c["annotations"][0], "image_id": 99}]},
     "points at image id 99"),
    ("polygon < 3 points", lambda c: {**c, "annotations": [{**c["annotations"][0], "segmentation": [[1, 2, 3, 4]]}]},
     "2 points"),
    ("unknown category", lambda c: {**c, "annotations": [{**c["annotations"][0], "category_id": 4}]},
     "category_id 4"),
    ("rle size mismatch", lambda c: {**c, "annotations": [{**c["annotations"][1],
                                                           "segmentation": encode_rle(np.zeros((5, 5), np.uint8))}]},
     "RLE size"),
    ("duplicate category", lambda c: {**c, "categories": c["categories"] + [{"id": 3, "name": "again"}]},
     "category id 3 appears twice"),
]


@pytest.mark.parametrize("name,mutate,message", BAD, ids=[b[0] for b in BAD])
def test_bad_annotations_raise_data_error_naming_the_file(write_coco, tmp_path, name, mutate, message):
    bad = mutate(_coco())
    ann_path, images = write_coco(_coco())
    if isinstance(bad, str):
        ann_path.write_text(bad)
    else:
        ann_path.write_text(json.dumps(bad))
    with pytest.raises(DataError, match=message) as exc:
        CocoAnnotations(ann_path, images)
    assert str(ann_path) in str(exc.value)


def test_missing_and_undecodable_images(write_coco, tmp_path):
    ann_path, images = write_coco(_coco(), make_images=False)
    with pytest.raises(DataError, match="a.jpg"):
        CocoAnnotations(ann_path, images)
    (images / "a.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    ann = CocoAnnotations(ann_path, images)
    with pytest.raises(DataError, match="cannot decode"):
        CocoDataset(ann, TransformConfig(), train=True)[0]
    with pytest.raises(DataError, match="not found"):
        load_image(tmp_path / "nope.png")
