"""What a person looks at: overlays of masks on photos (overlays.py) and a version's
pictures, its learning curve and evaluation grid (pictures.py)."""
