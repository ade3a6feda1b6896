"""The segmentation ladder: rungs (labelled volumes) x seeds x {scratch, SSL}, Dice on the test split.

Each rung's labelled images with a usable mask are its training volumes; scratch runs first, then SSL on the
SAME volumes, seed, step budget and test volumes, and the SSL row carries the paired SSL - scratch Dice
(per patient, patient bootstrap). Nothing is chosen on labels outside the rung (segmenter.py: a fixed step
budget), and the registered model of a rung is the run with the lowest final training loss on the rung's own
volumes. `out_dir/seg_results.csv` gets one row per child as it finishes (resumable, like the classification
ladder); `children/<key>/scores.csv` holds its per-image, per-class Dice / HD95 / surface Dice. Under torchrun the
rungs are shared out across the ranks, both children of a rung on one rank (ladder/parallel.run_on_ranks).
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from medssl.config import EncoderConfig, FinetuneConfig
from medssl.errors import ConfigError, DataError, MedsslError
from medssl.ingest.csv_safe import write_csv
from medssl.evaluate.seg_metrics import image_scores, paired_delta, summarise
from medssl.evaluate.seg_report import overlay_figure
from medssl.ladder.parallel import run_on_ranks, run_share
from medssl.ladder.results import finished_keys, print_failures, read_results, settings_digest, shard_path
from medssl.ladder.seg_registry import register_best, seg_lineage
from medssl.ladder.segmenter import segment, train_segmenter
from medssl.ui import console

INITS = ("scratch", "ssl")
RESULTS = "seg_results.csv"


@dataclass
class SegContext:
    cfg: FinetuneConfig
    encoder_source: str
    info: dict
    encoder_cfg: EncoderConfig
    spatial_dims: int
    patch: list[int]
    images: object            # VolumeCache
    masks: object             # MaskCache
    patients: dict
    spacing: dict             # {image_id: mm per axis of the cached array}
    test_ids: list[str]
    out_dir: Path
    tracker: object
    digest: str = ""
    parent_run_id: str | None = None  # the ladder's run (every child's parent, whichever rank runs it)
    rank: int = 0                     # torchrun: which shard this process appends to (parallel.py)
    parallel: bool = False

    @property
    def n_classes(self) -> int:
        return len(self.cfg.segmentation.classes) + 1

    def result_files(self) -> list[Path]:
        main = self.out_dir / RESULTS
        return [main, shard_path(main, self.rank)] if self.parallel else [main]


@dataclass(frozen=True)
class SegChild:
    rung: object
    init: str

    @property
    def key(self) -> str:
        return child_key(self.rung, self.init)


def check_mask_labels(masks, ids: list[str], classes: dict[int, str]) -> None:
    """Every label value in the masks must be background or a configured class."""
    named = set(classes) | {0}
    odd = {i: sorted(set(masks.labels(i)) - named) for i in ids}
    odd = {i: v for i, v in odd.items() if v}
    if odd:
        first = ", ".join(f"{i}: {v}" for i, v in list(odd.items())[:3])
        raise ConfigError(f"{len(odd)} mask(s) hold labels the config does not name ({first})",
                          where="finetune.segmentation.classes",
                          fix=f"name every label value (now {dict(classes)}), or relabel the masks")


def make_context(cfg: FinetuneConfig, encoder_source, images, masks, df: pd.DataFrame, spacing: dict,
                 out_dir: Path, tracker) -> SegContext:
    from medssl.models.encoders import load_encoder
    _, info = load_encoder(encoder_source)
    with_mask = [i for i in df["image_id"] if masks.has(i)]
    check_mask_labels(masks, with_mask, cfg.segmentation.classes)
    test_ids = [i for i in df.loc[df["split"] == "test", "image_id"] if i in set(with_mask) and images.has(i)]
    if not test_ids:
        raise DataError("no test image has a usable mask", where="manifest 'mask' / 'split' columns",
                        fix="give masks for more patients (the test split needs some), or check the manifest's "
                            "problems column for masks that were refused")
    spatial_dims, img_size = int(info["spatial_dims"]), list(info["img_size"])
    ctx = SegContext(cfg, str(encoder_source), info, EncoderConfig.model_validate(info["encoder"]), spatial_dims,
                     list(cfg.segmentation.patch or img_size), images, masks,
                     dict(zip(df["image_id"], df["patient_id"])), spacing, test_ids, Path(out_dir), tracker,
                     parent_run_id=getattr(tracker, "active_run_id", None))
    if len(ctx.patch) != spatial_dims:
        raise ConfigError(f"segmentation.patch {ctx.patch} has {len(ctx.patch)} values for a {spatial_dims}D encoder",
                          where="finetune.segmentation.patch")
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    ctx.digest = settings_digest({"finetune": cfg.model_dump(mode="json", exclude={"register_model"}),
                                  "test": sorted(test_ids), "task": "segmentation"}, ctx.encoder_source)
    return ctx


def run_seg_ladder(cfg: FinetuneConfig, encoder_source, images, masks, df: pd.DataFrame, rungs, spacing: dict,
                   out_dir, tracker, registered_model_prefix: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run (or resume) the ladder -> (results, per-image scores of every finished child)."""
    ctx = make_context(cfg, encoder_source, images, masks, df, spacing, out_dir, tracker)
    results_csv = ctx.out_dir / RESULTS
    done = finished_keys(results_csv, ctx.digest)
    todo = [(i, c) for i, c in enumerate(SegChild(r, init) for r in rungs for init in INITS) if c.key not in done]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # torchrun: both children of a rung on one rank, scratch first (the SSL child pairs with its scores)
        if not run_on_ranks(ctx, todo, results_csv, _run_planned, unit=lambda index, _: index // len(INITS)):
            return read_results(results_csv), pd.DataFrame()  # a rank > 0: rank 0 merges, registers, reports
    else:
        run_share(ctx, todo, results_csv, _run_planned)
    results = read_results(results_csv)
    results = results[results["settings_digest"].astype(str) == ctx.digest].reset_index(drop=True)
    print_failures(results)
    if cfg.register_model and getattr(tracker, "experiment", None):
        register_best(ctx, results, registered_model_prefix or f"{tracker.experiment}-segmentation")
    return results, collect_scores(results)


def child_key(rung, init: str) -> str:
    return f"{rung.name}/seed{rung.seed}/segmentation/{init}"


def child_dir(ctx: SegContext, rung, init: str) -> Path:
    return ctx.out_dir / "children" / re.sub(r"[^A-Za-z0-9_.-]+", "__", child_key(rung, init))


def _run_planned(ctx: SegContext, child: SegChild) -> dict:
    return _safe_child(ctx, child.rung, child.init)


def _safe_child(ctx: SegContext, rung, init: str) -> dict:
    train_ids = [i for i in rung.image_ids if ctx.masks.has(i) and ctx.images.has(i)]
    base = {"key": child_key(rung, init), "settings_digest": ctx.digest, "rung": rung.name, "seed": rung.seed,
            "init": init, "arm": init, "protocol": "segmentation", "n_labelled": len(train_ids),
            "n_labelled_patients": len({ctx.patients[i] for i in train_ids})}
    try:
        if not train_ids:
            raise DataError(f"rung {rung.name} (seed {rung.seed}) has no labelled volume with a usable mask",
                            where=f"rung {rung.name}", fix="check the manifest's mask and problems columns")
        return {**base, **_run_child(ctx, rung, init, train_ids), "status": "ok", "error": ""}
    except Exception as err:  # noqa: BLE001 — recorded and reported; the other rungs go on
        console.print(f"[red]failed[/] {base['key']}: {err}")
        if not isinstance(err, MedsslError):
            import traceback
            console.print(traceback.format_exc(limit=-3), style="dim")
        return {**base, "status": "failed", "error": str(err).splitlines()[0][:300]}


def _network(ctx: SegContext, init: str, seed: int):
    from medssl.models.decoders import build_segmenter, load_pretrained_encoder
    from medssl.models.encoders import build_encoder, load_encoder
    torch.manual_seed(seed)   # decoder (and scratch encoder) initialisation is part of the seed
    encoder = build_encoder(ctx.encoder_cfg, ctx.spatial_dims, list(ctx.info["img_size"]))
    net = build_segmenter(encoder, ctx.n_classes, ctx.spatial_dims, ctx.encoder_cfg.in_channels,
                          ctx.cfg.segmentation.feature_size)
    keys = {"missing": [], "unexpected": []}
    if init == "ssl":
        keys = load_pretrained_encoder(net, load_encoder(ctx.encoder_source)[0].state_dict(), ctx.encoder_source)
    return net, keys


def _volume(ctx: SegContext, image_id: str) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(ctx.images.get(image_id), np.float32), np.asarray(ctx.masks.get(image_id))


def _run_child(ctx: SegContext, rung, init: str, train_ids: list[str]) -> dict:
    seg, seed = ctx.cfg.segmentation, ctx.cfg.seed + rung.seed
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net, keys = _network(ctx, init, seed)
    folder = child_dir(ctx, rung, init)
    folder.mkdir(parents=True, exist_ok=True)
    tags = {"medssl.stage": "finetune", "medssl.task": "segmentation", **seg_lineage(ctx), "medssl.rung": rung.name,
            "medssl.seed": rung.seed, "medssl.init": init, **({"medssl.rank": ctx.rank} if ctx.parallel else {})}
    with ctx.tracker.run(f"{rung.name} seed{rung.seed} segmentation {init}", ctx.parent_run_id, tags) as run:
        ctx.tracker.log_params({"rung": rung.name, "seed": rung.seed, "init": init, "n_labelled": len(train_ids),
                                "patch": ctx.patch, "segmentation": seg.model_dump(), "n_test": len(ctx.test_ids),
                                "decoder_keys_trained_from_scratch": len(keys["missing"])})
        start = time.perf_counter()
        result = train_segmenter(net, [_volume(ctx, i) for i in train_ids], seg, ctx.cfg, ctx.patch, seed, device,
                                 where=f"rung {rung.name} (seed {rung.seed}, {len(train_ids)} volumes)")
        for row in result.history:
            ctx.tracker.log_metrics({"train_loss": row["loss"]}, step=row["step"])
        scores, shown = _evaluate(ctx, result.model, device)
        write_csv(scores, folder / "scores.csv")
        values = summarise(scores, ctx.cfg.bootstrap, seed)
        delta = _paired(ctx, rung, scores, seed) if init == "ssl" else {}
        ctx.tracker.log_metrics({**{f"test_{k}": v for k, v in values.items() if np.isfinite(v)},
                                 **{k: v for k, v in delta.items() if np.isfinite(v)},
                                 "final_train_loss": result.final_loss})
        ctx.tracker.log_artifact(folder / "scores.csv", "evaluation")
        title = f"{rung.name} seed{rung.seed} {init}"
        for n, (image_id, image, truth, pred) in enumerate(shown):   # a few test images (3D: a few slices each)
            ctx.tracker.log_figure(overlay_figure(image, truth, pred, seg.overlays, f"{title} test {n + 1}"),
                                   f"overlays/test_{n + 1}_{image_id}.png")
        logged = _should_log(ctx, rung.name, result.final_loss)
        if logged:
            _log_model(ctx, rung, init, result.model.cpu(), values)
        run_id = run.info.run_id
    return {"run_id": run_id or "", "model_logged": logged, "scores": str((folder / "scores.csv").resolve()),
            "final_train_loss": result.final_loss, "train_seconds": round(time.perf_counter() - start, 1),
            "bootstrap_seed": seed, "bootstrap_n": ctx.cfg.bootstrap, **values, **delta}


def _should_log(ctx: SegContext, rung_name: str, loss: float) -> bool:
    """finetune.log_models: "all", "none", or "best" (default): only a model that could be registered, i.e.
    one with a lower final training loss than every model of this rung logged before (an MLflow model is
    seconds to save and megabytes to keep; most runs could never be the registered one)."""
    if ctx.cfg.log_models == "none" or not getattr(ctx.tracker, "experiment", None):
        return False
    done = pd.concat([read_results(path) for path in ctx.result_files()], ignore_index=True)
    if ctx.cfg.log_models == "all" or "model_logged" not in done:
        return True
    logged = done[(done["status"] == "ok") & (done["rung"] == rung_name)
                  & (done["model_logged"].astype(str).str.lower() == "true")]
    logged = logged[logged["settings_digest"].astype(str) == ctx.digest]
    return not len(logged) or loss < float(logged["final_train_loss"].min())


def _log_model(ctx: SegContext, rung, init: str, net, values: dict) -> None:
    """The network as a pickle-free segmentation package (export/seg_package.py) under artifact path "model"."""
    import tempfile
    from medssl.export.seg_package import save_segmenter
    seg = ctx.cfg.segmentation
    spec = {"architecture": {"encoder": ctx.encoder_cfg.model_dump(mode="json"), "spatial_dims": ctx.spatial_dims,
                             "img_size": list(ctx.info["img_size"]), "in_channels": ctx.encoder_cfg.in_channels,
                             "n_classes": ctx.n_classes, "feature_size": seg.feature_size},
            "classes": {str(k): v for k, v in seg.classes.items()}, "patch": ctx.patch, "overlap": seg.overlap,
            "preprocess": ctx.images.cfg.model_dump(mode="json", exclude={"cache_dir"}),
            "lineage": {**seg_lineage(ctx), "rung": rung.name, "seed": rung.seed, "init": init},
            "test": {k: values.get(k) for k in ("dice", "dice_low", "dice_high", "patients")}}
    with tempfile.TemporaryDirectory() as tmp:
        ctx.tracker.log_artifact(save_segmenter(Path(tmp) / "model", net, spec), "model")


def _evaluate(ctx: SegContext, net, device: str) -> tuple[pd.DataFrame, tuple]:
    rows, shown = [], []
    for image_id in ctx.test_ids:
        image, mask = _volume(ctx, image_id)
        pred = segment(net, image, ctx.patch, ctx.cfg.segmentation.overlap, device)
        truth = mask[0].astype(np.int32)
        for row in image_scores(pred, truth, ctx.n_classes, ctx.spacing[image_id], ctx.cfg.segmentation.tolerance_mm):
            rows.append({"image_id": image_id, "patient_id": ctx.patients[image_id], **row})
        if len(shown) < max(1, min(ctx.cfg.segmentation.overlays, 3)):
            shown.append((image_id, image, truth, pred))
    return pd.DataFrame(rows), shown


def _paired(ctx: SegContext, rung, scores: pd.DataFrame, seed: int) -> dict:
    scratch = child_dir(ctx, rung, "scratch") / "scores.csv"
    if not scratch.is_file():
        return {}
    diff, low, high = paired_delta(scores, pd.read_csv(scratch), "dice", ctx.cfg.bootstrap, seed)
    return {"delta_dice": diff, "delta_dice_low": low, "delta_dice_high": high}


def collect_scores(results: pd.DataFrame) -> pd.DataFrame:
    """Per-image scores of every finished child, with its rung / seed / init / n_labelled."""
    parts = []
    for _, row in results[results["status"] == "ok"].iterrows():
        part = pd.read_csv(row["scores"], dtype={"image_id": str, "patient_id": str})
        parts.append(part.assign(rung=row["rung"], seed=row["seed"], init=row["init"], n_labelled=row["n_labelled"]))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
