import numpy as np
import torch
from PIL import Image

from models.data.transforms import IMAGENET_MEAN, IMAGENET_STD, to_tensor


def test_to_tensor_is_the_imagenet_normalisation_of_the_pixels():
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    x = to_tensor(Image.fromarray(rgb))
    want = (torch.from_numpy(rgb).permute(2, 0, 1).double() / 255 - torch.tensor(IMAGENET_MEAN, dtype=torch.double)
            .view(3, 1, 1)) / torch.tensor(IMAGENET_STD, dtype=torch.double).view(3, 1, 1)
    assert x.shape == (3, 5, 7) and x.dtype == torch.float32 and x.is_contiguous()
    assert torch.allclose(x.double(), want, atol=1e-6)
    x[0, 0, 0] = 99.0  # the tensor owns its memory: writing to it leaves the image alone
    assert to_tensor(Image.fromarray(rgb))[0, 0, 0] != 99.0
