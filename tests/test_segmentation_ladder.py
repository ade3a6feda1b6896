"""The Dice ladder end to end on a tiny segmentation demo cohort (real brain MR anatomy with inserted lesions
and their exact masks): manifest -> splits -> cache + mask cache -> rungs x {scratch, SSL} -> scores, paired
deltas and the pooled report; and the clear errors for unnamed labels and rungs without foreground."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch

from medssl.cohort.splits import assign_splits, build_ladder
from medssl.config import DemoConfig, EncoderConfig, FinetuneConfig, PreprocessConfig
from medssl.demo.seg_cohort import build_seg_demo
from medssl.errors import ConfigError, DataError
from medssl.evaluate.seg_report import pooled_summary, write_report
from medssl.ingest.manifest import build_manifest, read_manifest
from medssl.ladder.seg_ladder import check_mask_labels, run_seg_ladder
from medssl.ladder.segmenter import check_foreground, segment, train_segmenter
from medssl.models.decoders import build_segmenter
from medssl.models.encoders import build_encoder, save_encoder
from medssl.preprocess.cache import VolumeCache
from medssl.preprocess.masks import MaskCache
from medssl.tracking.tracker import NullTracker

ENCODER = EncoderConfig(name="resnet10", width=0.25)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions: one intra-op thread (on a CPU shared by many processes, two threads made these
    steps 30x slower, measured: 4 s vs 0.14 s a step)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cohort(tmp_path, dims: int, subjects: int = 10):
    labels = build_seg_demo(DemoConfig(subjects=subjects, size=32, out=tmp_path / "demo"), spatial_dims=dims,
                            progress=False)
    build_manifest(labels.parent / "images", tmp_path / "m.csv", labels=labels, progress=False, workers=1)
    df, meta = read_manifest(tmp_path / "m.csv")
    assert (df["mask_grid"] == "same").all() and (df["has_mask"] == 1).all(), df["problems"].tolist()
    cfg = PreprocessConfig(spatial_dims=dims, size=[32] * dims, cache_dir=tmp_path / "cache")
    images = VolumeCache(cfg.cache_dir, cfg, meta["root"])
    assert images.build(df, meta["root"], workers=1) == {}
    masks = MaskCache(images)
    assert masks.build(df, meta["root"]) == {}
    return df, meta, images, masks


class Figures(NullTracker):
    """Records the figures a run logs."""

    def __init__(self):
        self.figures = []

    def log_figure(self, fig, name, run_id=None):
        assert fig.axes and fig.axes[0].images        # an image with the contours drawn over it
        self.figures.append(name)


@pytest.fixture(scope="module")
def cohort2d(tmp_path_factory):
    return _cohort(tmp_path_factory.mktemp("seg2d"), 2)


def test_demo_masks_are_the_lesions(cohort2d):
    df, _, images, masks = cohort2d
    for image_id in df["image_id"]:
        image, mask = np.asarray(images.get(image_id), np.float32), np.asarray(masks.get(image_id))
        assert mask.shape == image.shape and mask.any()
        # the inserted lesions are T1-hypointense: darker inside the mask than in the tissue around it
        ring = np.zeros_like(mask, bool)
        ys, xs = np.nonzero(mask[0])
        ring[0, max(0, ys.min() - 3):ys.max() + 4, max(0, xs.min() - 3):xs.max() + 4] = True
        ring &= (mask == 0) & (image > 0.1)
        assert image[mask > 0].mean() < image[ring].mean()


def test_tiny_ladder_scratch_vs_ssl(cohort2d, tmp_path):
    df, _, images, masks = cohort2d
    df["split"] = assign_splits(df, "has_mask", 0, 0.1, 0.4)
    rungs = build_ladder(df, "has_mask", per_class=[1, 2], seeds=[0])
    torch.manual_seed(1)
    encoder = save_encoder(tmp_path / "encoder.pt", build_encoder(ENCODER, 2, [32, 32]), ENCODER, 2, [32, 32])
    cfg = FinetuneConfig(task="segmentation", bootstrap=50,
                         segmentation={"patch": [32, 32], "steps": 2, "batch_size": 2})
    spacing = {i: [2.0, 2.0] for i in df["image_id"]}
    tracker = Figures()
    results, scores = run_seg_ladder(cfg, encoder, images, masks, df, rungs, spacing, tmp_path / "ladder", tracker)
    n_test = int((df["split"] == "test").sum())
    assert len(tracker.figures) == 4 * min(3, n_test) and all(n.startswith("overlays/") for n in tracker.figures)
    assert list(results["status"]) == ["ok"] * 4, results["error"].tolist()
    assert sorted(results["n_labelled"]) == [1, 1, 2, 2]
    test = set(df.loc[df["split"] == "test", "image_id"])
    assert set(scores["image_id"]) == test and scores["dice"].between(0, 1).all()
    for rung, part in results.groupby("rung"):   # the SSL row's delta is the patient-mean difference
        ssl, scratch = (pd.read_csv(part.loc[part["init"] == k, "scores"].item()) for k in ("ssl", "scratch"))
        by_patient = lambda s: s.groupby("patient_id")["dice"].mean()   # noqa: E731
        expected = (by_patient(ssl) - by_patient(scratch)).mean()
        assert part.loc[part["init"] == "ssl", "delta_dice"].item() == pytest.approx(expected)
    summary = pooled_summary(scores, n_boot=50)
    assert set(summary["init"]) == {"ssl", "scratch"} and summary["dice"].between(0, 1).all()
    paths = write_report(summary, tmp_path / "report")
    assert paths["curve"].stat().st_size > 1000
    again, _ = run_seg_ladder(cfg, encoder, images, masks, df, rungs, spacing, tmp_path / "ladder", NullTracker())
    assert list(again["key"]) == list(results["key"])      # resumed: nothing redone, same rows


def _seg_rank(rank: int, port: int, args: tuple) -> None:
    """One rank of a torchrun-like launch (its environment) running the whole segmentation ladder call; rank 0
    alone has an MLflow run open (as under `medssl run`), rank 1 gets the parent from it."""
    from medssl.tracking.tracker import Tracker
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    cfg, encoder, images, masks, df, rungs, spacing, out, store = args
    if rank:
        run_seg_ladder(cfg, encoder, images, masks, df, rungs, spacing, out, NullTracker())
        return
    tracker = Tracker("seg-ranks", store, outbox_dir=out.parent / "outbox", end_grace_s=0)
    with tracker.run("ladder") as parent:
        run_seg_ladder(cfg, encoder, images, masks, df, rungs, spacing, out, tracker)
    (out.parent / "parent.txt").write_text(parent.info.run_id)


def test_two_ranks_share_the_rungs_and_give_the_serial_results(cohort2d, tmp_path):
    """Under 2 gloo ranks the rungs are shared out (both children of a rung on one rank: the SSL row's delta
    pairs with its scratch run); the merged file equals the serial one and every child is an MLflow run under
    rank 0's ladder run, whichever rank ran it."""
    import socket
    from mlflow.tracking import MlflowClient
    from medssl.ladder.results import read_results
    df, _, images, masks = cohort2d
    df = df.assign(split=assign_splits(df, "has_mask", 0, 0.1, 0.4))
    rungs = build_ladder(df, "has_mask", per_class=[1, 2], seeds=[0])
    torch.manual_seed(1)
    encoder = save_encoder(tmp_path / "encoder.pt", build_encoder(ENCODER, 2, [32, 32]), ENCODER, 2, [32, 32])
    cfg = FinetuneConfig(task="segmentation", bootstrap=20, log_models="none",
                         segmentation={"patch": [32, 32], "steps": 2, "batch_size": 2, "overlays": 1})
    spacing = {i: [2.0, 2.0] for i in df["image_id"]}
    serial, _ = run_seg_ladder(cfg, encoder, images, masks, df, rungs, spacing, tmp_path / "serial", NullTracker())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = (cfg, encoder, images, masks, df, rungs, spacing, tmp_path / "ranks" / "ladder", store)
    torch.multiprocessing.start_processes(_seg_rank, args=(port, args), nprocs=2, start_method="spawn")
    shared = read_results(tmp_path / "ranks" / "ladder" / "seg_results.csv")
    assert list(shared["key"]) == list(serial["key"]) and (shared["status"] == "ok").all()
    assert not list((tmp_path / "ranks" / "ladder").glob("seg_results.rank*.csv"))
    for column in ("dice", "delta_dice", "final_train_loss"):
        assert np.allclose(shared[column], serial[column], atol=1e-5, equal_nan=True), column
    client = MlflowClient(store)
    parent = (tmp_path / "ranks" / "parent.txt").read_text()
    runs = {r.info.run_id: r for r in client.search_runs([client.get_experiment_by_name("seg-ranks").experiment_id])}
    assert set(shared["run_id"]) == {i for i, r in runs.items() if r.data.tags.get("mlflow.parentRunId") == parent}
    assert {runs[i].data.tags["medssl.rank"] for i in shared["run_id"]} == {"0", "1"}
    by_rank = {(runs[i].data.tags["medssl.rank"], k.split("/")[0]) for i, k in zip(shared["run_id"], shared["key"])}
    assert len({rung for _, rung in by_rank}) == len(by_rank)  # each rung on one rank


def test_segmenter_3d_trains_and_segments(tmp_path):
    df, _, images, masks = _cohort(tmp_path, 3, subjects=4)
    volumes = [(np.asarray(images.get(i), np.float32), np.asarray(masks.get(i))) for i in df["image_id"]]
    net = build_segmenter(build_encoder(ENCODER, 3, [32] * 3), 2, 3)
    cfg = FinetuneConfig(task="segmentation", segmentation={"steps": 2, "batch_size": 2})
    result = train_segmenter(net, volumes, cfg.segmentation, cfg, [32] * 3, seed=0)
    assert len(result.history) == 2 and np.isfinite(result.final_loss)
    pred = segment(result.model, volumes[0][0], [32] * 3, 0.25)
    assert pred.shape == volumes[0][0].shape[1:] and set(np.unique(pred)) <= {0, 1}


class EmptyTraining:
    """The cohort's masks, but the training split's are all background (a rung with nothing to learn)."""

    def __init__(self, masks, empty_ids):
        self.masks, self.empty = masks, set(empty_ids)

    def has(self, image_id):
        return self.masks.has(image_id)

    def labels(self, image_id):
        return self.masks.labels(image_id)

    def get(self, image_id):
        mask = np.asarray(self.masks.get(image_id))
        return np.zeros_like(mask) if image_id in self.empty else mask


def test_rung_without_foreground_fails_clearly(cohort2d, tmp_path):
    df, _, images, masks = cohort2d
    df = df.assign(split=assign_splits(df, "has_mask", 0, 0.1, 0.4))
    rungs = build_ladder(df, "has_mask", per_class=[1], seeds=[0])
    encoder = save_encoder(tmp_path / "encoder.pt", build_encoder(ENCODER, 2, [32, 32]), ENCODER, 2, [32, 32])
    cfg = FinetuneConfig(task="segmentation", bootstrap=20, segmentation={"patch": [32, 32], "steps": 1, "batch_size": 2})
    empty = EmptyTraining(masks, df.loc[df["split"] == "train", "image_id"])
    results, _ = run_seg_ladder(cfg, encoder, images, empty, df, rungs, {i: [2.0, 2.0] for i in df["image_id"]},
                                tmp_path / "ladder", NullTracker())
    assert list(results["status"]) == ["failed", "failed"]
    assert results["error"].str.contains("rung per_class_1 .* no foreground voxel").all()


def test_bad_labels_and_empty_rungs(cohort2d):
    df, _, _, masks = cohort2d
    with pytest.raises(ConfigError, match="labels the config does not name"):
        check_mask_labels(masks, list(df["image_id"]), {2: "edema"})     # the masks hold label 1
    check_mask_labels(masks, list(df["image_id"]), {1: "lesion"})
    with pytest.raises(DataError, match="no foreground"):
        check_foreground([np.zeros((1, 8, 8), np.uint8)] * 2, "rung per_class_1")
