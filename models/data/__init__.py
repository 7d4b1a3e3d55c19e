"""Data: COCO reading and validation (coco.py), transforms (transforms.py), datasets and
batching (dataset.py), mask helpers (masks.py) and the demo dataset (demo.py)."""
