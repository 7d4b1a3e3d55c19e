"""The machinery around a network: the training loop (train.py), checkpoints, inference
(inference.py, predict.py for post-processing) and COCO evaluation (evaluate.py)."""
