"""The `self` proposal engine: pseudo masks from a model fine-tuned on the user's own labels.

Self-training (what FreeSOLO and CutLER do with their own unsupervised model, here with a
supervised one): a teacher fine-tuned on the labelled images segments the unlabeled pool, and
its confident masks, already named with the dataset's own categories, become the pseudo masks
that UPLVP pre-trains the kernels on. Unlike the unsupervised engines it knows exactly the
classes and the kind of object the user labelled (nuclei, lesions), which no ImageNet or CLIP
vocabulary may cover. models.pipeline fine-tunes the teacher first when a job asks for
`proposal_engine="self"`; `uplvp propose --engine self --model M.pt` uses any trained model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from models.data.masks import decode_rle
from models.uplvp.proposals.base import PseudoMask


class SelfEngine:
    """A trained checkpoint as a proposal engine: its instances with score >= `min_score`.

    The vocabulary is the checkpoint's category names (the dataset it was fine-tuned on).
    """

    name = "self"

    def __init__(self, checkpoint: str | Path, min_score: float = 0.5, num_threads: int = 0,
                 device: str = "cpu") -> None:
        from models.engine.inference import Predictor

        self.predictor = Predictor(checkpoint, num_threads, device)
        self.vocabulary = list(self.predictor.category_names)
        self.min_score = min_score

    def propose(self, image: Image.Image, max_masks: int) -> list[PseudoMask]:
        """The teacher's confident instances on one RGB image, best first, at most `max_masks`."""
        [instances] = self.predictor.predict_images([image], score_threshold=self.min_score)
        instances = sorted(instances, key=lambda inst: -inst["score"])
        out = []
        for inst in instances:
            if inst["area"] == 0:
                continue
            out.append(PseudoMask(decode_rle(inst["segmentation"]) > 0, inst["category_name"],
                                  min(1.0, float(inst["score"]))))
            if len(out) == max_masks:
                break
        return out


# The cut where none is calibrated (what `uplvp propose --engine self` defaults to, and the calibration's fallback).
FIXED_MIN_SCORE = 0.5
# Below this the teacher's predictions are not looked at (what evaluation, too, leaves out as noise).
CALIBRATION_FLOOR = 0.05
# Held-out images the cut is chosen on at most (the first by id): predicting them is part of the job's budget.
CALIBRATION_IMAGES = 100


def calibrate_min_score(checkpoint: str | Path, val_ann: str | Path, val_images: str | Path,
                        device: str = "cpu", fallback: float = FIXED_MIN_SCORE) -> dict[str, Any]:
    """The score a teacher's mask needs to be a pseudo mask, chosen on held-out labelled images: the
    threshold of the best F1 of its masks against theirs (models.engine.evaluate.best_f1_score_threshold,
    class-aware, mask IoU >= 0.5).

    A fixed cut does not travel across data: a one-class teacher's scores run high, while one that
    spreads its class scores over several classes (endangered_animals: 7 species) kept 6 masks of
    score >= 0.5 on 910 photos. Falls back to `fallback` when none of its masks on those images is
    right. Returns {"min_score", "calibrated", "images", and the F1 summary}.
    """
    from models.data.coco import CategoryMap, CocoAnnotations, load_image
    from models.engine.evaluate import best_f1_score_threshold
    from models.engine.inference import Predictor

    predictor = Predictor(checkpoint, device=device)
    categories = CategoryMap.from_coco([{"id": i, "name": n}
                                        for i, n in zip(predictor.category_ids, predictor.category_names)])
    ann = CocoAnnotations(val_ann, val_images, categories=categories)
    images = sorted(ann.images, key=lambda im: int(im["id"]))[:CALIBRATION_IMAGES]
    gt = {**ann.raw, "images": images}
    kept = {int(im["id"]) for im in images}
    gt["annotations"] = [a for a in ann.raw["annotations"] if int(a["image_id"]) in kept]
    results = []
    for im in images:
        [instances] = predictor.predict_images([load_image(Path(val_images) / im["file_name"])],
                                               score_threshold=CALIBRATION_FLOOR)
        results += [{"image_id": int(im["id"]), "category_id": inst["category_id"],
                     "segmentation": inst["segmentation"], "score": inst["score"]} for inst in instances]
    best = best_f1_score_threshold(gt, results)
    calibrated = best["threshold"] is not None
    return {"min_score": round(best["threshold"], 4) if calibrated else fallback, "calibrated": calibrated,
            "images": len(images), **{k: v for k, v in best.items() if k != "threshold"}}
