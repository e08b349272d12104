import numpy as np
import pytest
import torch

from purifier.errors import InvalidInputError
from purifier.validation import to_float_images

SHAPE = (1, 8, 8)


def test_accepts_float_and_uint8():
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(to_float_images(x, SHAPE), x)
    u = np.full((2, 1, 8, 8), 255, np.uint8)
    assert float(to_float_images(u, SHAPE).max()) == 1.0


@pytest.mark.parametrize("x, message", [
    (torch.rand(0, 1, 8, 8), "empty batch"),
    (torch.rand(1, 8, 8), "shape"),
    (torch.rand(2, 3, 8, 8), "channel"),
    (torch.rand(2, 1, 9, 8), "8x8"),
    (torch.full((1, 1, 8, 8), float("nan")), "NaN"),
    (torch.full((1, 1, 8, 8), float("inf")), "NaN or Inf"),
    (torch.full((1, 1, 8, 8), 1.5), r"\[0, 1\]"),
    (torch.full((1, 1, 8, 8), -0.1), r"\[0, 1\]"),
    (torch.zeros(1, 1, 8, 8, dtype=torch.int32), "uint8"),
    (np.zeros((1, 1, 8, 8), np.int16), "uint8"),
    ("not an image", "tensor"),
])
def test_bad_input_is_named(x, message):
    with pytest.raises(InvalidInputError, match=message):
        to_float_images(x, SHAPE)


def test_batch_limit():
    with pytest.raises(InvalidInputError, match="above the limit of 4"):
        to_float_images(torch.rand(5, 1, 8, 8), SHAPE, max_batch=4)
