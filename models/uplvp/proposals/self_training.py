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
