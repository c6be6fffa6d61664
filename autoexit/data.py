"""Inference data, the recorded cache and the 50/20/30 split.

Loaders return an :class:`InferenceData`: a ``Dataset`` of input tensors, the
ground-truth labels when known (used only for reporting, never for training
unless asked), and an identity string for the cache key.

``record`` makes one pass of the backbone over the data and stores, per sample,
the activation at every candidate exit point and the backbone's logits, in
memory-mapped ``.npy`` files under a directory keyed by the backbone hash, the
data identity and the points. A second run with the same backbone and data
reuses it. Every later step (head training, calibration, subset choice, the
outer search) reads these files and never runs the backbone again.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .errors import DataError
from .points import ExitPoint, TracedBackbone

__all__ = [
    "InferenceData",
    "Recording",
    "load_digits",
    "load_idx",
    "load_image_folder",
    "load_tensors",
    "as_inference_data",
    "record",
    "split_indices",
    "default_cache_dir",
    "MIN_SAMPLES",
]

MIN_SAMPLES = 50
SPLIT = (0.5, 0.2, 0.3)
CACHE_VERSION = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("AUTOEXIT_CACHE", Path.home() / ".cache" / "autoexit"))


@dataclass
class InferenceData:
    """Unlabelled inference data (labels, when known, are kept for reporting only)."""

    dataset: Dataset
    identity: str
    name: str = "data"
    labels: torch.Tensor | None = None
    class_names: list[str] | None = None

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def example(self) -> torch.Tensor:
        if len(self) == 0:
            raise DataError(f"{self.name} holds no samples; give autoexit at least {MIN_SAMPLES} inputs")
        x = _first(self.dataset[0])
        if not isinstance(x, torch.Tensor):
            raise DataError(f"{self.name} yields {type(x).__name__} items; autoexit needs tensors (apply a transform)")
        return x.unsqueeze(0)


def _first(item):
    return item[0] if isinstance(item, (tuple, list)) else item


def _hash_tensor(h, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(str(tuple(t.shape)).encode())
    h.update(str(t.dtype).encode())
    h.update(t.numpy().tobytes())


def _from_tensors(x: torch.Tensor, y: torch.Tensor | None, name: str, class_names=None) -> InferenceData:
    if not isinstance(x, torch.Tensor):
        raise DataError(f"{name}: inputs must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise DataError(f"{name}: inputs have shape {tuple(x.shape)}; give a batch of samples [N, ...]")
    if not torch.is_floating_point(x):
        x = x.float()
    h = hashlib.sha256()
    _hash_tensor(h, x)
    if y is not None:
        y = torch.as_tensor(y).long().view(-1)
        if y.numel() != x.shape[0]:
            raise DataError(f"{name}: {x.shape[0]} inputs but {y.numel()} labels; give one label per input")
    ds = TensorDataset(x) if y is None else TensorDataset(x, y)
    return InferenceData(ds, identity=f"tensors:{h.hexdigest()}", name=name, labels=y, class_names=class_names)


def load_digits(part: str = "all", seed: int = 0, shifts: bool = False) -> InferenceData:
    """scikit-learn's digits (1,797 8x8 images, 10 classes) as [N, 1, 8, 8] floats in [0, 1].

    ``part``: ``all``, ``backbone`` (the half the quickstart trains its backbone
    on) or ``inference`` (the other half, the workload autoexit sees).
    ``shifts``: add the eight one-pixel shifts of every image (zero fill), nine
    times the samples: 899 held-out digits are too few to estimate a 1-2 %
    accuracy budget on a 20 % validation split.
    """
    from sklearn.datasets import load_digits as _ld

    if part not in ("all", "backbone", "inference"):
        raise DataError(f"load_digits part must be all, backbone or inference, got {part!r}")
    d = _ld()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    if part != "all":
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(x), generator=g)
        half = len(x) // 2
        idx = perm[:half] if part == "backbone" else perm[half:]
        x, y = x[idx], y[idx]
    if shifts:
        padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
        views = [padded[:, :, 1 + dy : 9 + dy, 1 + dx : 9 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        x = torch.cat(views)
        y = y.repeat(len(views))
    name = f"digits[{part}{'+shifts' if shifts else ''}]"
    return _from_tensors(x.contiguous(), y, name, class_names=[str(i) for i in range(10)])


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number); give a (gzipped) IDX file such as "
                        "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    code, ndim = raw[2], raw[3]
    if code not in dtypes:
        raise DataError(f"{path}: unsupported IDX element type 0x{code:02x}")
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=dtypes[code], offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: truncated IDX file ({data.size} values for shape {dims})")
    return data.reshape(dims)


def load_idx(images: str | Path, labels: str | Path | None = None, limit: int | None = None) -> InferenceData:
    """IDX image file (MNIST / Fashion-MNIST layout, optionally gzipped) as [N, 1, H, W] in [0, 1]."""
    images = Path(images)
    arr = _read_idx(images)
    if arr.ndim != 3:
        raise DataError(f"{images}: IDX images must be 3-D [N, H, W], got shape {arr.shape}")
    x = torch.from_numpy(arr.astype(np.float32) / 255.0).unsqueeze(1)
    y = None
    if labels is not None:
        y = torch.from_numpy(_read_idx(Path(labels)).astype(np.int64))
    if limit:
        x = x[:limit]
        y = y[:limit] if y is not None else None
    return _from_tensors(x, y, images.name)


class _ImageFolder(Dataset):
    def __init__(self, files: list[Path], labels: list[int], transform):
        self.files, self.targets, self.transform = files, labels, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.files[i]) as im:
            x = self.transform(im.convert("RGB"))
        return x, self.targets[i]


def load_image_folder(
    root: str | Path,
    size: int | Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    limit: int | None = None,
) -> InferenceData:
    """Images under ``root`` (``root/<class>/*.jpg`` or a flat folder) as RGB tensors in [0, 1],
    optionally resized to ``size`` and normalised with ``mean``/``std``."""
    from torchvision import transforms

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist; give a directory of images (root/<class>/*.jpg)")
    exts = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".gif"}
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    files: list[Path] = []
    labels: list[int] = []
    class_names: list[str] | None = None
    if subdirs:
        class_names = [p.name for p in subdirs]
        for ci, d in enumerate(subdirs):
            for f in sorted(d.rglob("*")):
                if f.suffix.lower() in exts:
                    files.append(f)
                    labels.append(ci)
    else:
        files = sorted(f for f in root.iterdir() if f.suffix.lower() in exts)
        labels = [-1] * len(files)
    if not files:
        raise DataError(f"no images ({', '.join(sorted(exts))}) under {root}")
    if limit:
        files, labels = files[:limit], labels[:limit]
    tf = []
    if size is not None:
        tf.append(transforms.Resize(size))
        tf.append(transforms.CenterCrop(size))
    tf.append(transforms.ToTensor())
    if mean is not None and std is not None:
        tf.append(transforms.Normalize(list(mean), list(std)))
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}".encode())
    h.update(repr((size, mean, std)).encode())
    y = torch.tensor(labels, dtype=torch.long) if subdirs else None
    ds = _ImageFolder(files, labels, transforms.Compose(tf))
    return InferenceData(ds, identity=f"folder:{h.hexdigest()}", name=root.name, labels=y, class_names=class_names)


def load_tensors(path: str | Path) -> InferenceData:
    """A ``.pt`` file holding a tensor ``x`` or a dict ``{"x": inputs, "y": labels (optional)}``.

    Loaded with ``weights_only=True``: no pickled code is ever executed.
    """
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"cannot load tensors from {path}: {str(exc).splitlines()[0]}; save them with "
                        "torch.save({'x': inputs, 'y': labels}, path)") from None
    if isinstance(obj, torch.Tensor):
        return _from_tensors(obj, None, path.name)
    if isinstance(obj, dict) and "x" in obj:
        return _from_tensors(obj["x"], obj.get("y"), path.name)
    raise DataError(f"{path} must hold a tensor or a dict with key 'x' (and optionally 'y')")


def as_inference_data(data, labels=None, name: str | None = None) -> InferenceData:
    """Normalise what a user passes: InferenceData, tensors, (x, y), a Dataset, or a path
    (directory = image folder, ``.pt`` = tensors, IDX file)."""
    if isinstance(data, InferenceData):
        return data
    if isinstance(data, torch.Tensor):
        return _from_tensors(data, labels, name or "tensors")
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        return _from_tensors(data[0], data[1], name or "tensors")
    if isinstance(data, (str, Path)):
        p = Path(data)
        if data == "digits":
            return load_digits("inference")
        if p.is_dir():
            return load_image_folder(p)
        if p.suffix in (".pt", ".pth"):
            return load_tensors(p)
        if "idx" in p.name or p.suffix == ".gz":
            return load_idx(p, labels)
        raise DataError(f"cannot tell what kind of data {p} is; give an image folder, a .pt file or an IDX file")
    if isinstance(data, Dataset):
        h = hashlib.sha256(type(data).__qualname__.encode())
        n = len(data)  # type: ignore[arg-type]
        h.update(str(n).encode())
        for i in range(n):  # a loading pass only (no model): cheap next to recording
            _hash_tensor(h, torch.as_tensor(_first(data[i])))
        return InferenceData(data, identity=f"dataset:{h.hexdigest()}", name=name or type(data).__name__)
    raise DataError(
        f"unsupported data of type {type(data).__name__}; give a tensor, (inputs, labels), a Dataset, "
        "an image folder, a .pt file or an IDX file"
    )


def split_indices(n: int, seed: int = 0, fractions: Sequence[float] = SPLIT) -> dict[str, torch.Tensor]:
    """Seeded, stratify-free train / val / test split (50/20/30 by default, as in paper 003)."""
    if abs(sum(fractions) - 1.0) > 1e-6 or len(fractions) != 3 or min(fractions) <= 0:
        raise DataError(f"split fractions must be three positive numbers summing to 1, got {tuple(fractions)}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    return {
        "train": perm[:n_train].sort().values,
        "val": perm[n_train : n_train + n_val].sort().values,
        "test": perm[n_train + n_val :].sort().values,
    }


@dataclass
class Recording:
    """Activations at every exit point and backbone logits, per sample, on disk."""

    path: Path
    points: list[ExitPoint]
    num_classes: int
    backbone_hash: str
    data_identity: str
    n: int
    seed: int = 0
    split_fractions: tuple[float, float, float] = SPLIT
    reused: bool = False
    _cache: dict = field(default_factory=dict, repr=False)

    # ----------------------------------------------------------------- arrays
    def _load(self, name: str) -> np.ndarray:
        if name not in self._cache:
            self._cache[name] = np.load(self.path / f"{name}.npy", mmap_mode="r")
        return self._cache[name]

    @property
    def splits(self) -> dict[str, torch.Tensor]:
        if "splits" not in self._cache:
            self._cache["splits"] = split_indices(self.n, self.seed, self.split_fractions)
        return self._cache["splits"]

    def _select(self, arr: np.ndarray, split: str | None, first: int | None = None) -> torch.Tensor:
        if split is None:
            return torch.from_numpy(np.array(arr[:first]))  # a writable copy of the memory-mapped file
        if split not in ("train", "val", "test"):
            raise DataError(f"split must be train, val or test, got {split!r}")
        return torch.from_numpy(np.ascontiguousarray(arr[self.splits[split][:first].numpy()]))

    def point(self, name: str) -> ExitPoint:
        for p in self.points:
            if p.name == name:
                return p
        raise DataError(f"no exit point '{name}' in this recording; it has: {', '.join(p.name for p in self.points)}")

    def activations(self, point: str | ExitPoint, split: str | None = None) -> torch.Tensor:
        p = point if isinstance(point, ExitPoint) else self.point(point)
        i = self.points.index(p)
        return self._select(self._load(f"act_{i}"), split).float()

    def logits(self, split: str | None = None) -> torch.Tensor:
        return self._select(self._load("logits"), split)

    def inputs(self, split: str | None = None, first: int | None = None) -> torch.Tensor:
        """The recorded inputs of ``split`` (all when None); ``first``: only that many, in the split's order (read
        from the memory-mapped file without loading the rest)."""
        if not (self.path / "inputs.npy").exists():
            raise DataError("this recording was made without storing inputs (store_inputs=False)")
        return self._select(self._load("inputs"), split, first)

    def labels(self, split: str | None = None) -> torch.Tensor | None:
        """Ground-truth labels, or None when unknown (-1 marks an unknown label)."""
        y = self._select(self._load("labels"), split).long()
        return None if bool((y < 0).all()) else y

    def backbone_pred(self, split: str | None = None) -> torch.Tensor:
        return self.logits(split).argmax(1)


def _cache_key(backbone_hash: str, data_identity: str, points: Sequence[ExitPoint], dtype: str) -> str:
    h = hashlib.sha256()
    h.update(f"v{CACHE_VERSION}|{backbone_hash}|{data_identity}|{dtype}".encode())
    for p in points:
        h.update(f"|{p.name}:{p.node}".encode())
    return h.hexdigest()[:24]


@torch.no_grad()
def record(
    backbone: TracedBackbone,
    points: Sequence[ExitPoint],
    data,
    cache_dir: str | Path | None = None,
    batch_size: int = 128,
    seed: int = 0,
    split: Sequence[float] = SPLIT,
    store_inputs: bool = True,
    dtype: str = "float32",
    progress: bool = True,
    num_workers: int = 0,
) -> Recording:
    """One pass over ``data``: activations at ``points`` and the backbone's logits, cached on disk."""
    data = as_inference_data(data)
    n = len(data)
    if n < MIN_SAMPLES:
        raise DataError(
            f"{data.name} has {n} samples; autoexit needs at least {MIN_SAMPLES} "
            "(it splits them 50/20/30 into train/val/test) — give more inference data"
        )
    if not points:
        raise DataError("no exit points to record; the backbone offers none at this granularity "
                        "(try granularity=2 or 'node')")
    example = data.example()
    if tuple(example.shape[1:]) != tuple(backbone.example_input.shape[1:]):
        raise DataError(
            f"{data.name} has inputs of shape {tuple(example.shape[1:])} but the backbone was traced with "
            f"{tuple(backbone.example_input.shape[1:])}; give data shaped like the model's input"
        )
    if dtype not in ("float32", "float16"):
        raise DataError(f"dtype must be float32 or float16, got {dtype!r}")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = _cache_key(backbone.hash, data.identity, points, dtype)
    final = cache_dir / key
    meta_path = final / "meta.json"
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("version") == CACHE_VERSION and meta.get("n") == n:
                return Recording(final, list(points), meta["num_classes"], backbone.hash, data.identity, n,
                                 seed, tuple(split), reused=True)
        except (OSError, json.JSONDecodeError):
            pass  # corrupt cache entry: record again
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=cache_dir))
    try:
        cap = backbone.capture_module([p.node for p in points])
        np_dtype = np.float16 if dtype == "float16" else np.float32
        acts = [
            np.lib.format.open_memmap(tmp / f"act_{i}.npy", mode="w+", dtype=np_dtype, shape=(n, *p.shape))
            for i, p in enumerate(points)
        ]
        logits = np.lib.format.open_memmap(tmp / "logits.npy", mode="w+", dtype=np.float32,
                                           shape=(n, backbone.num_classes))
        labels = np.full((n,), -1, dtype=np.int64)
        inputs = (
            np.lib.format.open_memmap(tmp / "inputs.npy", mode="w+", dtype=np.float32, shape=(n, *example.shape[1:]))
            if store_inputs
            else None
        )
        loader = DataLoader(data.dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        pos = 0
        it = loader
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(loader, desc=f"recording {data.name}", unit="batch", leave=False)
        for batch in it:
            if isinstance(batch, (list, tuple)):
                x = batch[0]
                y = batch[1] if len(batch) > 1 else None
            else:
                x, y = batch, None
            x = x.float()
            b = x.shape[0]
            try:
                outs = cap(x)
            except Exception as exc:  # noqa: BLE001
                raise DataError(
                    f"the backbone fails on a batch of shape {tuple(x.shape)}: {str(exc).splitlines()[0]}; "
                    "give data shaped like the model's input"
                ) from None
            for i, a in enumerate(outs[:-1]):
                if not torch.isfinite(a).all():
                    raise DataError(
                        f"activations at exit point '{points[i].name}' contain NaN/inf (samples {pos}-{pos + b - 1}); "
                        "check the input normalisation and the backbone weights"
                    )
                acts[i][pos : pos + b] = a.numpy().astype(np_dtype, copy=False)
            out = outs[-1]
            if not torch.isfinite(out).all():
                raise DataError(
                    f"the backbone's output contains NaN/inf (samples {pos}-{pos + b - 1}); "
                    "check the input normalisation and the backbone weights"
                )
            logits[pos : pos + b] = out.numpy()
            if y is not None:
                labels[pos : pos + b] = torch.as_tensor(y).view(-1).numpy()
            if inputs is not None:
                inputs[pos : pos + b] = x.numpy()
            pos += b
        for a in acts:
            a.flush()
        logits.flush()
        del acts, logits, inputs
        np.save(tmp / "labels.npy", labels)
        meta = {
            "version": CACHE_VERSION,
            "n": n,
            "num_classes": backbone.num_classes,
            "backbone_hash": backbone.hash,
            "data_identity": data.identity,
            "data_name": data.name,
            "dtype": dtype,
            "points": [p.to_dict() for p in points],
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Recording(final, list(points), backbone.num_classes, backbone.hash, data.identity, n, seed, tuple(split))
