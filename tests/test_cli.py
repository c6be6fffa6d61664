"""The real command line: quickstart, enable, inspect; bad input -> one line on stderr, exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch

import autoexit


def _run(args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "autoexit", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=900, env=env)


def test_digits_backbone_repeats_in_a_new_process(tmp_path):
    """The quickstart's backbone (``zoo.trained_digits_cnn``) is the same network in every process for a seed: torch
    seeds its global generator at random per process, so the initial weights must be drawn with the seed too."""
    code = ("import hashlib, torch; from autoexit.zoo import trained_digits_cnn; "
            "import sys; m = trained_digits_cnn(width=4, epochs=1, seed=int(sys.argv[1]), progress=False); "
            "print(hashlib.sha256(b''.join(v.numpy().tobytes() for v in m.state_dict().values())).hexdigest())")
    digests = [subprocess.run([sys.executable, "-c", code, str(seed)], cwd=tmp_path, capture_output=True, text=True,
                              timeout=300, check=True).stdout.strip() for seed in (0, 0, 1)]
    assert digests[0] == digests[1] and digests[0] != digests[2]


def test_quickstart_emits_a_loadable_artifact(tmp_path):
    r = _run(["quickstart", "--out", str(tmp_path / "qs"), "--epochs", "4", "--head-epochs", "3",
              "--no-latency", "--quiet"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "FLOPs saved" in r.stdout and "kept exits" in r.stdout
    art = autoexit.load(tmp_path / "qs" / "artifact")
    x = torch.rand(5, 1, 8, 8)
    logits, idx = art.model(x)
    assert logits.shape == (5, 10) and idx.shape == (5,)
    r = _run(["inspect", str(tmp_path / "qs" / "artifact")], tmp_path)
    assert r.returncode == 0 and "checksums OK" in r.stdout


def test_enable_with_factory_weights_and_tensor_file(tmp_path, digits_backbone, digits_data):
    (tmp_path / "mymodels.py").write_text(textwrap.dedent("""
        from autoexit.zoo import DigitsCNN
        def make():
            return DigitsCNN(width=16)
    """))
    torch.save(digits_backbone.state_dict(), tmp_path / "w.pt")
    x, y = digits_data.dataset.tensors
    torch.save({"x": x[:600], "y": y[:600]}, tmp_path / "data.pt")
    r = _run(["enable", "--model", "mymodels:make", "--weights", "w.pt", "--data", "data.pt",
              "--tolerance", "2", "--out", "art", "--epochs", "3", "--no-latency", "--quiet",
              "--cache-dir", str(tmp_path / "cache"), "--teacher", "augmented", "--teacher-shift", "1",
              "--head", "cheap"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert m["backbone"]["class"] == "DigitsCNN" and m["data"]["n"] == 600
    assert m["head_training"] == {"teacher": "augmented", "epochs": 3, "label_free": True,
                                 "epoch_kept": "last", "head": "cheap"}
    assert "cheap heads" in r.stdout  # the summary's "heads trained" row
    # --head cheap: SDN's head (no conv, 2x2 average pool, one linear layer) at every exit it deployed
    assert all(e["head_spec"]["conv_layers"] == 0 and e["head_spec"]["pool"] == "avg2"
               and e["head_spec"]["fc_layers"] == 1 for e in m["exits"])
    # same command again: the artifact exists -> a clear error, not a silent overwrite
    r = _run(["enable", "--model", "mymodels:make", "--weights", "w.pt", "--data", "data.pt",
              "--tolerance", "2", "--out", "art", "--epochs", "1", "--no-latency", "--quiet",
              "--cache-dir", str(tmp_path / "cache")], tmp_path)
    assert r.returncode == 2 and "already exists" in r.stderr


def test_bad_input_gives_one_line_and_exit_2(tmp_path):
    torch.save({"x": torch.rand(60, 1, 8, 8)}, tmp_path / "d.pt")
    cases = [
        (["enable", "--model", "nope:make", "--data", "d.pt", "--tolerance", "1", "--out", "o"], "cannot import"),
        (["enable", "--model", "autoexit.zoo:DigitsCNN", "--data", "d.pt", "--tolerance", "0", "--out", "o"],
         "tolerance must be > 0"),
        (["enable", "--model", "autoexit.zoo:DigitsCNN", "--data", "d.pt", "--tolerance", "1", "--out", "o",
          "--teacher", "mixup", "--teacher-shift", "-2"], "shift must be an integer >= 0"),
        (["enable", "--model", "autoexit.zoo:DigitsCNN", "--data", "missing.pt", "--tolerance", "1", "--out", "o"],
         "cannot"),
        (["enable", "--model", "autoexit.zoo:DigitsCNN", "--data", "d.pt", "--tolerance", "1", "--out", "o",
          "--gate-target", "harmless"], "--gate-target applies to --policy gate"),
        (["enable", "--model", "autoexit.zoo:DigitsCNN", "--data", "d.pt", "--tolerance", "1", "--out", "o",
          "--policy", "gate", "--gate-target", "harmless"], "target 'harmless'"),
        (["enable", "--model", "autoexit.zoo:DigitsCNN", "--data", "d.pt", "--tolerance", "1", "--out", "o",
          "--cost-optimized"], "--cost-optimized applies to --cost latency"),
        (["enable", "--model", "autoexit.zoo:DigitsCNN", "--data", "d.pt", "--tolerance", "1", "--out", "o",
          "--head", "tiny"], "head 'tiny' is not a preset; use one of: default, cheap"),
        (["enable", "--model", "autoexit.zoo:DigitsCNN", "--data", "d.pt", "--tolerance", "1", "--out", "o",
          "--head", '{"conv": "fancy"}'], "--head: HeadSpec.conv 'fancy' is unknown"),
        (["inspect", "nowhere"], "not an autoexit artifact"),
    ]
    for args, needle in cases:
        r = _run(args, tmp_path)
        assert r.returncode == 2, (args, r.stderr[-500:])
        lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("autoexit:")]
        assert len(lines) == 1 and needle in lines[0], r.stderr[-500:]
    assert not (tmp_path / "o").exists()
