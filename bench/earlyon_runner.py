"""Run ``earlyon`` (PyPI, MIT) the way its documentation intends, on an autoexit recording's data and split.

earlyon's documented two-stage recipe (README "Usage", ``docs/CALIBRATION_AND_BENCHMARK_CONTRACT.md``):

1. ``earlyon.models.custom_ee(backbone, exit_layers=[module names], num_classes, input_shape)``:
   exits attached by forward hooks at named submodules; every head is
   global-average-pool -> Linear(C, 128) -> ReLU -> Dropout(0.2) -> Linear(128, K);
2. ``earlyon.training.stage2_train_exits(model, train_loader)``: backbone frozen
   (``requires_grad=False`` + BatchNorm in eval), heads trained with *labels*
   (equal-weight cross-entropy over all exits, Adam, lr 1e-3, 20 epochs: its defaults);
3. ``earlyon.core.thresholds.calibrate_thresholds(model, val_loader, target_accuracy_drop=b)``:
   greedy per-exit max-softmax threshold on its fixed grid (0.99 ... 0.5), accuracy drop
   measured with labels on the calibration split; optionally per-head temperature
   scaling first (``fit_temperature=True``; its contract wants a separate temperature
   split, which a 50/20/30 split does not have: the variant here fits it on val, as
   autoexit does, and earlyon warns about it);
4. inference: ``model(x, mode="inference")`` (batch 1 only) and
   ``model.forward_inference_batched(x)`` (a batch exits only when every sample is confident).

The data are the recording's stored inputs and labels, split exactly as autoexit splits
them (``rec.splits``: 50/20/30, seeded). Exits go at the same block boundaries as
autoexit's candidate points wherever earlyon allows (a point must be a submodule's output:
functional ops such as a top-level ``F.relu`` cannot be hooked). FLOPs are recounted with
``autoexit.cost.count_flops`` (true FLOPs, heads included) so both tools use the same units;
earlyon's own estimate (fvcore MACs of the backbone only) is kept for reference.

The backbone is deep-copied: earlyon mutates the module it wraps. Trained heads are cached
under ``~/.cache/autoexit/earlyon`` keyed by backbone, data, split, exits and training settings.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

TRAIN_DEFAULTS = {"epochs": 20, "lr": 1e-3, "batch_size": 128}  # stage2_train_exits defaults, its CLI's batch size


def earlyon_available() -> bool:
    try:
        import earlyon  # noqa: F401
    except ImportError:
        return False
    return True


def earlyon_version() -> str | None:
    try:
        import earlyon
    except ImportError:
        return None
    return getattr(earlyon, "__version__", "?")


def hookable_points(backbone: nn.Module, points) -> tuple[list, list[str]]:
    """The points earlyon can hook (module outputs, each module called once) and why the others cannot."""
    modules = dict(backbone.named_modules())
    ok, refused = [], []
    for p in points:
        if p.name in modules and p.name:
            ok.append(p)
        else:
            refused.append(f"{p.name} (not a submodule's output: earlyon hooks modules only)")
    return ok, refused


class EarlyonRun:
    """earlyon wrapped around a copy of ``backbone`` at ``points``, heads trained (or loaded from the cache)."""

    def __init__(self, backbone: nn.Module, rec, points, *, epochs: int = TRAIN_DEFAULTS["epochs"],
                 lr: float = TRAIN_DEFAULTS["lr"], batch_size: int = TRAIN_DEFAULTS["batch_size"], seed: int = 0,
                 cache_dir: str | Path | None = None, log=print):
        from earlyon.models import custom_ee

        from autoexit.cost import count_flops

        self.rec = rec
        self.log = log
        self.points, self.refused = hookable_points(backbone, points)
        if not self.points:
            raise RuntimeError("earlyon can hook none of the exit points")
        self.names = [p.name for p in self.points]
        x_all = rec.inputs()
        self.y_all = rec.labels()
        if self.y_all is None:
            raise RuntimeError("earlyon trains and calibrates with labels; this recording has none")
        self.x_all = x_all
        self.idx = {k: v.clone() for k, v in rec.splits.items()}
        self.in_shape = (1, *x_all.shape[1:])
        torch.manual_seed(seed)
        self.backbone = copy.deepcopy(backbone).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model = custom_ee(self.backbone, exit_layers=self.names, num_classes=rec.num_classes,
                                   input_shape=self.in_shape)
        self.train_cfg = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed}
        self.head_train_s = 0.0
        self.cached = self._load_or_train(cache_dir)
        # costs in autoexit's units: true FLOPs per sample
        self.head_flops = [count_flops(self.model.exit_heads[ep.name].eval(), torch.zeros(1, *p.shape))
                           for ep, p in zip(self.model.config.exit_points, self.points)]
        self.flops_before = [p.flops_before for p in self.points]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fe = self.model.flops_estimate
        self.own_estimate = {"method": fe.method, "reliable": fe.reliable, "fractions": dict(fe.fractions)}
        self.caches = {s: self._collect(s) for s in ("val", "test")}

    # ------------------------------------------------------------------ data
    def loader(self, split: str, batch_size: int, shuffle: bool = False) -> DataLoader:
        ds = Subset(TensorDataset(self.x_all, self.y_all), self.idx[split].tolist())
        g = torch.Generator().manual_seed(self.train_cfg["seed"])
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g if shuffle else None)

    def _key(self) -> str:
        from autoexit.points import backbone_hash

        h = hashlib.sha256()
        h.update(json.dumps({"v": 1, "backbone": backbone_hash(self.backbone), "data": self.rec.data_identity,
                             "seed_split": self.rec.seed, "n": self.rec.n, "exits": self.names,
                             "train": self.train_cfg, "earlyon": earlyon_version()}, sort_keys=True).encode())
        return h.hexdigest()[:24]

    def _load_or_train(self, cache_dir) -> bool:
        from earlyon.training import stage2_train_exits

        from autoexit.data import default_cache_dir

        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "earlyon"
        f = cache / f"heads-{self._key()}.pt"
        if f.is_file():
            try:
                blob = torch.load(f, map_location="cpu", weights_only=True)
                self.model.exit_heads.load_state_dict(blob["state_dict"])
                self.head_train_s = float(blob.get("train_s", 0.0))
                self.train_log = blob.get("log", [])
                self.log(f"earlyon: heads loaded from {f}")
                return True
            except Exception:  # noqa: BLE001 - a damaged cache entry is retrained
                pass
        self.train_log: list[dict] = []

        def on_epoch(entry):
            d = {"epoch": entry.epoch, "loss": entry.loss, "per_exit_accuracy": entry.per_exit_accuracy}
            self.train_log.append(d)
            self.log(f"earlyon head epoch {entry.epoch}: loss {entry.loss:.4f}")

        torch.manual_seed(self.train_cfg["seed"])
        t0 = time.perf_counter()
        stage2_train_exits(self.model, self.loader("train", self.train_cfg["batch_size"], shuffle=True),
                           epochs=self.train_cfg["epochs"], lr=self.train_cfg["lr"], device="cpu",
                           on_epoch_end=on_epoch)
        self.head_train_s = time.perf_counter() - t0
        assert not any(p.requires_grad for p in self.model.backbone.parameters()), "earlyon left the backbone trainable"
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".{f.name}.tmp"
        torch.save({"state_dict": self.model.exit_heads.state_dict(), "train_s": self.head_train_s,
                    "log": self.train_log}, tmp)
        tmp.replace(f)
        return False

    def _collect(self, split: str):
        from earlyon.core.thresholds import collect_head_logits

        return collect_head_logits(self.model, self.loader(split, 256), "cpu")

    # ------------------------------------------------------------------ calibration
    def calibrate(self, budget: float, temperature: bool = False) -> dict:
        """earlyon's calibrate_thresholds at ``budget`` (a fraction: 0.01 = 1 point) on the val split."""
        from earlyon.core.thresholds import calibrate_thresholds

        if not temperature:  # an earlier calibration with temperatures left them on the config
            self.model.config.temperatures = {k: 1.0 for k in self.model.config.temperatures}
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the val-reuse warning for temperatures is expected and documented
            cal = calibrate_thresholds(self.model, self.loader("val", 256), target_accuracy_drop=budget,
                                       device="cpu", fit_temperature=temperature,
                                       temperature_loader=self.loader("val", 256) if temperature else None)
        return {"thresholds": list(cal.thresholds), "enabled": list(cal.enabled_exits),
                "temperatures": dict(self.model.config.temperatures),
                "val_baseline_accuracy": cal.baseline_accuracy, "val_accuracy": cal.final_accuracy,
                "val_drop": cal.accuracy_delta, "val_own_flops_fraction": cal.avg_computation_used,
                "val_exit_distribution": dict(cal.exit_distribution), "seconds": time.perf_counter() - t0}

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def route_bs1(self, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
        """Per-sample prediction and exit (-1 = backbone) through earlyon's batch-1 router."""
        self.model.eval()
        x = self.x_all[self.idx[split]]
        preds, exits = np.empty(len(x), dtype=np.int64), np.empty(len(x), dtype=np.int64)
        for i in range(len(x)):
            r = self.model(x[i : i + 1], mode="inference")
            preds[i] = int(r.prediction.argmax(-1).item())
            exits[i] = int(r.exit_taken)
        return preds, exits

    @torch.no_grad()
    def route_batched(self, batch: int = 32, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
        """Per-sample prediction and exit through ``forward_inference_batched`` (whole-batch exits)."""
        self.model.eval()
        x = self.x_all[self.idx[split]]
        preds, exits = np.empty(len(x), dtype=np.int64), np.empty(len(x), dtype=np.int64)
        for i in range(0, len(x), batch):
            r = self.model.forward_inference_batched(x[i : i + batch])
            preds[i : i + batch] = r.predictions.argmax(-1).numpy()
            exits[i : i + batch] = int(r.exit_taken)
        return preds, exits

    def simulated(self, split: str = "test") -> tuple[float, dict]:
        """earlyon's own vectorised replay (``simulate_policy``) on the cached logits: accuracy, distribution."""
        from earlyon.core.thresholds import simulate_policy

        ev = simulate_policy(self.caches[split], self.model)
        return ev.accuracy, dict(ev.exit_distribution)

    # ------------------------------------------------------------------ metrics in autoexit's units
    def metrics(self, preds: np.ndarray, exits: np.ndarray, base_flops: float, split: str = "test") -> dict:
        """Accuracy, drop, agreement, exit shares, expected true FLOPs (heads included) and the oracle."""
        from autoexit.subset import oracle_flops

        cache = self.caches[split]
        y = cache.targets.numpy()
        bpred = cache.logits[-1].argmax(1).numpy()
        enabled = list(self.model.config.enabled_exits)
        k = len(self.names)
        head = np.array(self.head_flops, dtype=float) * np.array(enabled, dtype=float)
        spent = np.cumsum(head)
        cost = np.where(exits < 0, base_flops + spent[-1],
                        np.array(self.flops_before, dtype=float)[np.clip(exits, 0, k - 1)] + spent[np.clip(exits, 0, k - 1)])
        rates = [float((exits == i).mean()) for i in range(k)] + [float((exits < 0).mean())]
        agree = np.stack([lg.argmax(1).numpy() == bpred for lg in cache.logits[:-1]])
        oracle = oracle_flops(agree, self.head_flops, self.flops_before, base_flops).mean()
        acc, base_acc = float((preds == y).mean()), float((bpred == y).mean())
        return {
            "n": int(len(y)), "accuracy": acc, "backbone_accuracy": base_acc, "accuracy_drop": base_acc - acc,
            "agreement": float((preds == bpred).mean()), "expected_flops": float(cost.mean()),
            "base_flops": float(base_flops), "saving": float(1 - cost.mean() / base_flops),
            "oracle_flops": float(oracle), "oracle_saving": float(1 - oracle / base_flops),
            "exit_rates": rates, "exit_names": [*self.names, "backbone"],
        }

    def bs1_callable(self):
        model = self.model

        def run(x):
            return model(x, mode="inference")

        return run

    def batched_callable(self):
        return self.model.forward_inference_batched
