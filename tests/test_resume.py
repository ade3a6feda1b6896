"""Exact resume: a run SIGKILLed mid-way and restarted ends with the same weights and per-step losses as an
uninterrupted run (model, optimizer, scheduler, RNG streams and data order all restored)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
STEPS = 24

# A real training run in its own process: a tiny 2-D conv method whose views use the torch, numpy and python
# random streams (all three must be restored), an in-memory cohort of 36 images (4.5 steps an epoch with
# batch 4 x accumulate 2, so resumes land mid-epoch and steps straddle epochs), a checkpoint every 4 steps.
SCRIPT = r'''
import json, random, sys, time
import numpy as np, torch
from torch import nn
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
from medssl.config import TrainConfig
from medssl.train.distributed import sharded_loader
from medssl.train.loop import train

out, log_path, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])

class Cohort(torch.utils.data.Dataset):
    def __len__(self):
        return 36
    def __getitem__(self, i):
        g = torch.Generator().manual_seed(100 + i)
        return {"image": torch.rand(1, 12, 12, generator=g), "index": i}

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Dropout(0.2),
                                     nn.Linear(4 * 100, 8))
    def forward(self, batch):
        x = batch["image"]
        a = x + 0.2 * torch.randn_like(x)
        b = x * (1 + 0.1 * random.random()) + float(np.random.normal(0, 0.05))
        za, zb = self.encoder(a), self.encoder(b)
        loss = (za - zb).pow(2).mean() + (1 - za.std(0)).clamp(min=0).mean()
        return {"loss": loss, "z_std": za.std(0).mean()}

class NoTracker:
    def log_metrics(self, metrics, step=None):
        pass

log = open(log_path, "a")
def on_step(step, metrics):
    log.write(json.dumps({"step": step, "loss": metrics["loss"]}) + "\n")
    log.flush()
    time.sleep(delay)

torch.manual_seed(0)
method = Tiny()
cfg = TrainConfig(steps=%d, batch_size=4, accumulate=2, lr=3e-3, warmup_steps=3, checkpoint_every=4,
                  log_every=5, seed=7)
result = train(method, sharded_loader(Cohort(), 4, seed=7), cfg, out, NoTracker(), "cpu", on_step=on_step)
torch.save(method.state_dict(), out + "/final_weights.pt")
json.dump(result, open(out + "/result.json", "w"))
''' % STEPS


def _start(script: Path, out: Path, log: Path, delay: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script), str(out), str(log), str(delay)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=240)   # an upper bound for a hang, not a speed target (loaded CPUs)
    assert proc.returncode == 0, err


def _losses(log: Path) -> dict[int, float]:
    """step -> loss; a step redone after the resume overrides the killed run's entry; a line cut by the kill
    is ignored."""
    losses = {}
    for line in log.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        losses[entry["step"]] = entry["loss"]
    return losses


def _wait_for_checkpoint(out: Path, min_step: int, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        names = [p.name for p in (out / "checkpoints").glob("step-*.pt")]
        if any(int(n[5:13]) >= min_step for n in names):
            return
        assert proc.poll() is None, "the run ended before it was interrupted"
        time.sleep(0.05)
    pytest.fail(f"no checkpoint past step {min_step} within {timeout} s")


@pytest.mark.timeout(900)   # three training runs in subprocesses: generous on a loaded CPU
def test_sigkilled_run_resumes_to_identical_weights_and_losses(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    full, broken = tmp_path / "full", tmp_path / "broken"
    full.mkdir(), broken.mkdir()

    # one after the other: on a loaded CPU a slow reference would let the interrupted run finish unkilled
    _finish(_start(script, full, full / "losses.jsonl", 0.0))
    interrupted = _start(script, broken, broken / "losses.jsonl", 0.2)
    _wait_for_checkpoint(broken, 8, interrupted)
    time.sleep(0.3)  # die between checkpoints, after a few more logged steps that must be redone
    interrupted.send_signal(signal.SIGKILL)
    interrupted.wait()
    killed_at = max(_losses(broken / "losses.jsonl"))
    assert 8 <= killed_at < STEPS

    _finish(_start(script, broken, broken / "losses.jsonl", 0.0))

    result = json.loads((broken / "result.json").read_text())
    assert result["resumed_from"] is not None and result["step"] == STEPS
    expected, got = _losses(full / "losses.jsonl"), _losses(broken / "losses.jsonl")
    assert sorted(got) == list(range(1, STEPS + 1)) == sorted(expected)
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), f"step {step}"
    a = torch.load(full / "final_weights.pt")
    b = torch.load(broken / "final_weights.pt")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-7)
    # the uninterrupted run really moved the weights (the comparison is not trivially of initial weights)
    assert result["loss"] != pytest.approx(expected[1])



# ------------------------------------------------------------------ nothing in a checkpoint runs code
class _Planted:
    """A pickle whose loading would run a command (what a planted checkpoint does)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_capture_rng_round_trips_through_a_weights_only_load(tmp_path):
    import random
    import numpy as np
    from medssl.train import checkpoint as ckpt
    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    torch.save({"rng": ckpt.capture_rng()}, tmp_path / "rng.pt")
    expected = (random.random(), np.random.normal(size=3), torch.rand(3))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    ckpt.restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    assert random.random() == expected[0]
    np.testing.assert_array_equal(np.random.normal(size=3), expected[1])
    torch.testing.assert_close(torch.rand(3), expected[2], rtol=0, atol=0)


def test_planted_checkpoint_is_refused_without_running(tmp_path):
    from medssl.errors import TrainingError
    from medssl.train import checkpoint as ckpt
    marker = tmp_path / "ran"
    path = ckpt.checkpoint_path(tmp_path / "run", 4)
    path.parent.mkdir(parents=True)
    torch.save({"format": ckpt.FORMAT, "model": {}, "payload": _Planted(marker)}, path)
    with pytest.raises(TrainingError) as err:
        ckpt.load_checkpoint(path)
    assert not marker.exists()
    assert "refused without running" in err.value.what and "weights_only=False" not in str(err.value)


def test_resume_skips_a_planted_newest_checkpoint(tmp_path):
    """The loop's resume meets the planted file first (newest step): refused, never run; training goes on."""
    from torch import nn
    from medssl.config import TrainConfig
    from medssl.train import checkpoint as ckpt
    from medssl.train.distributed import sharded_loader
    from medssl.train.loop import train

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Linear(4, 2)

        def forward(self, batch):
            return {"loss": self.encoder(batch["image"]).pow(2).mean()}

    class Tracker:
        def log_metrics(self, metrics, step=None):
            pass

    data = [{"image": torch.full((4,), float(i)), "index": i} for i in range(8)]
    marker = tmp_path / "ran"
    planted = ckpt.checkpoint_path(tmp_path, 99)
    planted.parent.mkdir(parents=True)
    torch.save({"format": ckpt.FORMAT, "payload": _Planted(marker)}, planted)
    result = train(Tiny(), sharded_loader(data, 4, seed=0), TrainConfig(steps=2, warmup_steps=0), tmp_path,
                   Tracker(), "cpu")
    assert not marker.exists() and result["resumed_from"] is None and result["step"] == 2
