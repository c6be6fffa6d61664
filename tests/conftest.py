"""Shared fixtures: a small trained backbone on digits and a finished label-free pipeline on it."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", category=FutureWarning)
torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Recordings of the test run go to a temporary cache, not ~/.cache/autoexit."""
    old = os.environ.get("AUTOEXIT_CACHE")
    os.environ["AUTOEXIT_CACHE"] = str(tmp_path_factory.mktemp("autoexit-cache"))
    yield
    if old is None:
        os.environ.pop("AUTOEXIT_CACHE", None)
    else:
        os.environ["AUTOEXIT_CACHE"] = old


@pytest.fixture(scope="session")
def digits_backbone():
    """DigitsCNN trained briefly on the backbone half of digits (eval mode)."""
    from autoexit.zoo import trained_digits_cnn

    return trained_digits_cnn(width=16, epochs=12, seed=0, augment_shift=0, progress=False)


@pytest.fixture(scope="session")
def digits_data():
    from autoexit.data import load_digits

    return load_digits("inference", shifts=True)


@pytest.fixture(scope="session")
def digits_result(digits_backbone, digits_data, tmp_path_factory):
    """The core pipeline run end to end on digits (few epochs): an EnableResult."""
    from autoexit.distill import TrainConfig
    from autoexit.pipeline import EnableConfig, enable

    cfg = EnableConfig(
        tolerance=2.0,
        cache_dir=str(tmp_path_factory.mktemp("rec")),
        train=TrainConfig(epochs=8, batch_size=128),
    )
    return enable(digits_backbone, digits_data, config=cfg, progress=False)


class SkipNet(torch.nn.Module):
    """A model whose long skip connection crosses several blocks (from stem to head)."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())
        self.block1 = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU())
        self.block2 = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU())
        self.block3 = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU())
        self.block4 = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU())
        self.fc = torch.nn.Linear(16, 5)

    def forward(self, x):
        s = self.stem(x)
        h = self.block2(self.block1(s)) + s  # skip across block1 and block2
        h = self.block4(self.block3(h))
        return self.fc(h.mean(dim=(2, 3)))
