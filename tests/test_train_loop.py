"""Training loop: schedule, gradient accumulation, non-finite loss handling, gradient clipping, checkpoints."""
from __future__ import annotations

import math
import time

import pytest
import torch
from torch import nn

from medssl.config import TrainConfig
from medssl.errors import TrainingError
from medssl.train import checkpoint as ckpt
from medssl.train.distributed import ResumableBatchSampler, sharded_loader
from medssl.train.loop import train
from medssl.train.schedule import WarmupCosine, warmup_cosine
from memory_cache import MemoryCache

torch.set_num_threads(1)


class Regression(torch.utils.data.Dataset):
    """y = x . w_true + noise, fixed per index."""

    def __init__(self, n: int = 32, dim: int = 5):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, dim, generator=g)
        self.y = self.x @ torch.arange(1.0, dim + 1) + 0.1 * torch.randn(n, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


class Linear(nn.Module):
    def __init__(self, dim: int = 5, scale: float = 1.0):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Linear(dim, 1)
        self.scale = scale  # multiplies the loss: large values make huge gradients

    def forward(self, batch):
        pred = self.encoder(batch["x"]).squeeze(1)
        return {"loss": self.scale * (pred - batch["y"]).pow(2).mean(), "pred_mean": pred.mean()}


class Recorder:
    def __init__(self):
        self.metrics = []

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))


def _cfg(**kw) -> TrainConfig:
    base = dict(steps=6, batch_size=4, lr=0.05, warmup_steps=2, grad_clip=None, checkpoint_every=2, log_every=2)
    return TrainConfig(**{**base, **kw})


# ---------------------------------------------------------------------------------------------- schedule
def test_warmup_then_cosine_values():
    fn = WarmupCosine(warmup_steps=4, total_steps=12)
    assert [fn(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert fn(4) == pytest.approx(1.0)
    assert fn(8) == pytest.approx(0.5)  # half-way through the 8 decay steps
    assert fn(12) == pytest.approx(0.0, abs=1e-12)
    decay = [fn(s) for s in range(4, 13)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert WarmupCosine(0, 10, min_ratio=0.1)(10) == pytest.approx(0.1)


def test_scheduler_state_restores_the_same_lr():
    def make():
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
        return opt, warmup_cosine(opt, 3, 20)
    opt, sched = make()
    for _ in range(7):
        opt.step(), sched.step()
    opt2, sched2 = make()
    sched2.load_state_dict(sched.state_dict())
    opt.step(), sched.step(), opt2.step(), sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * WarmupCosine(3, 20)(8))


# ---------------------------------------------------------------------------------------- accumulation
def test_accumulating_two_batches_equals_one_double_batch(tmp_path):
    data = Regression()
    small, big = Linear(), Linear()
    # with shuffle off, micro-batches (0-3, 4-7) of the accumulated run form batch 0-7 of the other
    train(small, sharded_loader(data, 4, seed=1, shuffle=False), _cfg(accumulate=2), tmp_path / "a",
          Recorder(), "cpu")
    train(big, sharded_loader(data, 8, seed=1, shuffle=False), _cfg(batch_size=8), tmp_path / "b",
          Recorder(), "cpu")
    for p, q in zip(small.parameters(), big.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(small.encoder.weight, Linear().encoder.weight)  # training did move them


# ------------------------------------------------------------------------------------------ non-finite
class ExplodesAt(Linear):
    """Loss becomes NaN on the given call (micro-batch) of forward."""

    def __init__(self, call: int):
        super().__init__()
        self.calls, self.bad = 0, call

    def forward(self, batch):
        self.calls += 1
        out = super().forward(batch)
        if self.calls == self.bad:
            out["loss"] = out["loss"] * float("nan")
        return out


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    method = ExplodesAt(call=5)  # step 5
    with pytest.raises(TrainingError) as info:
        train(method, sharded_loader(Regression(), 4, seed=0), _cfg(steps=10), tmp_path, Recorder(), "cpu")
    message = str(info.value)
    assert "step 5" in message and "step-00000004.pt" in message and "lr" in message and "grad_clip" in message
    last = ckpt.latest_checkpoint(tmp_path)
    assert last.name == "step-00000004.pt"
    state = ckpt.load_checkpoint(last)
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values())
    # the NaN step did not reach the weights
    assert all(torch.isfinite(p).all() for p in method.parameters())


def test_corrupt_newest_checkpoint_falls_back_and_foreign_file_is_refused(tmp_path):
    loader = sharded_loader(Regression(), 4, seed=0)
    train(Linear(), loader, _cfg(steps=4), tmp_path, Recorder(), "cpu")
    ckpt.checkpoint_path(tmp_path, 4).write_bytes(b"not a checkpoint")
    with pytest.raises(TrainingError, match="cannot be read"):
        ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path, 4))
    result = train(Linear(), loader, _cfg(steps=6), tmp_path, Recorder(), "cpu")
    assert result["resumed_from"].endswith("step-00000002.pt") and result["step"] == 6
    with pytest.raises(TrainingError, match="does not fit the model"):
        train(Wider(), loader, _cfg(steps=8), tmp_path, Recorder(), "cpu")


class Wider(Linear):
    def __init__(self):
        super().__init__()
        self.extra = nn.Linear(2, 2)


def test_changed_batch_size_refuses_to_resume(tmp_path):
    train(Linear(), sharded_loader(Regression(), 4, seed=0), _cfg(steps=2), tmp_path, Recorder(), "cpu")
    with pytest.raises(TrainingError, match="batch_size: 4 -> 8"):
        train(Linear(), sharded_loader(Regression(), 8, seed=0), _cfg(steps=4, batch_size=8), tmp_path,
              Recorder(), "cpu")


class OutOfMemory(Linear):
    def forward(self, batch):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_becomes_a_training_error_naming_the_settings(tmp_path):
    with pytest.raises(TrainingError) as info:
        train(OutOfMemory(), sharded_loader(Regression(), 4, seed=0), _cfg(), tmp_path, Recorder(), "cpu")
    message = str(info.value)
    assert "out of memory at step 1" in message and "batch_size" in message and "pretrain.crop" in message


def test_a_failing_probe_does_not_stop_training(tmp_path):
    def broken_probe(encoder, device):
        raise RuntimeError("shape mismatch")
    result = train(Linear(), sharded_loader(Regression(), 4, seed=0), _cfg(steps=4, probe_every=2), tmp_path,
                   Recorder(), "cpu", probe=broken_probe)
    assert result["step"] == 4 and ckpt.latest_checkpoint(tmp_path).name == "step-00000004.pt"


# ---------------------------------------------------------------------------------------------- clipping
def test_gradient_clipping_bounds_the_norm_the_optimizer_sees(tmp_path, monkeypatch):
    seen = []
    original = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    recorder = Recorder()
    train(Linear(scale=1000.0), sharded_loader(Regression(), 4, seed=0), _cfg(steps=4, grad_clip=0.5),
          tmp_path / "clip", recorder, "cpu")
    assert len(seen) == 4 and max(seen) == pytest.approx(0.5, rel=1e-4)
    logged = [m["train/grad_norm"] for _, m in recorder.metrics]
    assert min(logged) > 10  # the logged norm is the one before clipping
    seen.clear()
    train(Linear(scale=1000.0), sharded_loader(Regression(), 4, seed=0), _cfg(steps=4, grad_clip=None),
          tmp_path / "free", Recorder(), "cpu")
    assert min(seen) > 10


# ---------------------------------------------------------------------------------------- logging & files
def test_metrics_checkpoints_and_sampler(tmp_path):
    recorder, steps = Recorder(), []
    result = train(Linear(), sharded_loader(Regression(), 4, seed=0), _cfg(steps=6, accumulate=2), tmp_path,
                   recorder, "cpu", on_step=lambda s, m: steps.append(s), keep_checkpoints=2)
    assert steps == [1, 2, 3, 4, 5, 6] and [s for s, _ in recorder.metrics] == [2, 4, 6]
    metrics = recorder.metrics[-1][1]
    assert {"train/loss", "train/lr", "train/samples_per_s", "train/data_wait", "train/pred_mean"} <= set(metrics)
    assert 0 <= metrics["train/data_wait"] <= 1 and metrics["train/samples_per_s"] > 0
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000004.pt", "step-00000006.pt"]
    assert result["checkpoint"].endswith("step-00000006.pt") and math.isfinite(result["loss"])
    state = ckpt.load_checkpoint(result["checkpoint"])
    assert set(state) >= {"model", "optimizer", "scheduler", "scaler", "step", "rng", "data", "config"}
    # 8 micro-batches an epoch; 6 steps x 2 micro-batches = epoch 1, 4 micro-batches in
    assert state["data"] == {"seed": 0, "epoch": 1, "position": 4}
    # resume skips without reading: a sampler started at batch 3 yields the tail of the same order
    full = list(ResumableBatchSampler(32, 4, seed=3, epoch=1))
    assert list(ResumableBatchSampler(32, 4, seed=3, epoch=1, start=3)) == full[3:]
    assert full != list(ResumableBatchSampler(32, 4, seed=3, epoch=2))


class SlowCounting(Regression):
    """Counts reads and makes the loader the bottleneck (sleeps per sample)."""

    def __init__(self, delay: float = 0.0):
        super().__init__()
        self.reads, self.delay = [], delay

    def __getitem__(self, i):
        self.reads.append(i)
        time.sleep(self.delay)
        return super().__getitem__(i)


def test_resume_reads_no_skipped_sample_and_data_wait_is_measured(tmp_path):
    data = SlowCounting()
    train(Linear(), sharded_loader(data, 4, seed=0), _cfg(steps=3), tmp_path, Recorder(), "cpu")
    later = SlowCounting(delay=0.01)
    recorder = Recorder()
    train(Linear(), sharded_loader(later, 4, seed=0), _cfg(steps=5), tmp_path, recorder, "cpu")
    assert len(later.reads) == 2 * 4 and set(later.reads).isdisjoint(data.reads)  # steps 4-5 only
    assert recorder.metrics[-1][1]["train/data_wait"] > 0.5  # the sleeping loader dominates each step


def test_prefixes_from_ddp_and_compile_are_stripped():
    sd = {"module._orig_mod.encoder.weight": 1, "encoder.bias": 2}
    assert ckpt.strip_prefixes(sd) == {"encoder.weight": 1, "encoder.bias": 2}


# ----------------------------------------------------------------------- end to end: run_pretraining
class CallRecorder:
    def __init__(self):
        self.calls, self.active_run_id = [], "run-123"

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))


def _t1_cohort(n: int) -> MemoryCache:
    """Pseudo-subjects from a real T1 brain MR (nibabel's anatomical.nii, (33, 41, 25)): flips and contrast."""
    import nibabel as nib
    import numpy as np
    from pathlib import Path
    path = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"
    volume = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    volume = (volume - volume.mean()) / volume.std()
    rng = np.random.default_rng(0)
    arrays = {}
    for i in range(n):
        v = volume[::-1] if i % 2 else volume
        arrays[f"img-{i:012x}"] = (v * rng.uniform(0.8, 1.2))[None].astype(np.float16)  # (1, X, Y, Z)
    return MemoryCache(arrays)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_run_pretraining_end_to_end_writes_a_loadable_encoder(tmp_path, spatial_dims):
    from medssl.config import EncoderConfig, MaskedConfig, PretrainConfig, SSLConfig
    from medssl.models.encoders import load_encoder
    from medssl.train.pretrain import run_pretraining
    cache = _t1_cohort(6)
    vit = EncoderConfig(name="vit", patch_size=8, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=16)
    cfg = PretrainConfig(encoder=vit, ssl=SSLConfig(masked=MaskedConfig(decoder_dim=16, decoder_depth=1,
                                                                         decoder_heads=2)),
                         crop=[16] * spatial_dims,
                         train=TrainConfig(steps=3, batch_size=2, warmup_steps=1, checkpoint_every=2, log_every=1))
    tracker = CallRecorder()
    path = run_pretraining(cfg, cache, list(cache.arrays), None, tmp_path, tracker, spatial_dims=spatial_dims,
                           device="cpu")
    encoder, info = load_encoder(path)
    assert info["spatial_dims"] == spatial_dims and info["pretrain_run_id"] == "run-123"
    assert encoder(torch.zeros(1, 1, *cfg.crop)).shape == (1, encoder.out_features)
    names = [c[0] for c in tracker.calls]
    assert {"log_params", "log_figure", "log_metrics", "log_artifact"} <= set(names)
    artifacts = {c[1][1] for c in tracker.calls if c[0] == "log_artifact"}
    assert artifacts == {"encoder", "checkpoints"}
    params = next(c[1][0] for c in tracker.calls if c[0] == "log_params")
    assert params["train"]["steps"] == 3 and params["spatial_dims"] == spatial_dims
    assert all(math.isfinite(c[1][0]["train/loss"]) for c in tracker.calls
               if c[0] == "log_metrics" and "train/loss" in c[1][0])


def test_run_pretraining_resumes_exactly_through_the_real_loader_and_method(tmp_path):
    """The real stack (CropDataset + make_loader + SimCLR with on-device views + BatchNorm ResNet): a rerun
    from the step-2 checkpoint ends with the weights of the uninterrupted 4-step run."""
    from medssl.config import EncoderConfig, PretrainConfig
    from medssl.models.encoders import load_encoder
    from medssl.tracking.tracker import NullTracker
    from medssl.train import checkpoint as ckpt
    from medssl.train.pretrain import run_pretraining
    cache = _t1_cohort(5)
    cfg = PretrainConfig(encoder=EncoderConfig(name="resnet10"), crop=[16, 16],
                         train=TrainConfig(steps=4, batch_size=2, warmup_steps=1, checkpoint_every=2, seed=3))
    path = run_pretraining(cfg, cache, list(cache.arrays), None, tmp_path, NullTracker(), spatial_dims=2,
                           device="cpu")
    uninterrupted = load_encoder(path)[0].state_dict()
    ckpt.checkpoint_path(tmp_path, 4).unlink()  # as if the run had died between steps 2 and 4
    path.unlink()
    run_pretraining(cfg, cache, list(cache.arrays), None, tmp_path, NullTracker(), spatial_dims=2, device="cpu")
    resumed = load_encoder(path)[0].state_dict()
    at_step_2 = ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path, 2))["model"]
    assert not torch.equal(at_step_2["encoder.conv1.weight"], uninterrupted["conv1.weight"])  # steps 3-4 moved it
    for name, value in uninterrupted.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-5, atol=1e-6)


def test_changed_method_settings_refuse_to_resume_a_finished_run(tmp_path):
    """A finished run 'resumed' with other views would train no step and return the old encoder as new."""
    from medssl.config import EncoderConfig, PretrainConfig, ViewsConfig
    from medssl.train.pretrain import run_pretraining
    cache = _t1_cohort(4)

    def pretrain(views, steps=2):
        cfg = PretrainConfig(encoder=EncoderConfig(name="resnet10"), crop=[16, 16], views=views,
                             train=TrainConfig(steps=steps, batch_size=2, warmup_steps=1))
        return run_pretraining(cfg, cache, list(cache.arrays), None, tmp_path, CallRecorder(), spatial_dims=2,
                               device="cpu", view_examples=0)
    pretrain(ViewsConfig())
    pretrain(ViewsConfig(), steps=3)  # longer: resumable
    with pytest.raises(TrainingError, match=r"views.rotate_degrees: 10.0 -> 20.0") as err:
        pretrain(ViewsConfig(rotate_degrees=20), steps=3)
    assert "move" in err.value.fix and "checkpoints" in err.value.fix
