"""The label ladder: repeats x rungs x seeds x arms, every child an MLflow child run with a row in results.csv.

Every arm of one (repeat, rung, seed) trains on the SAME labelled patients (the rung) with the same seed and is
scored on the same test split (see results.py for the arms and the columns). Under the default inner
validation every label a child uses is the rung's own (inner.py); the results say how many labelled patients
each child used in total.

`out_dir/results.csv` gets one row per finished child, appended (and flushed) the moment it finishes, so an
interrupted ladder resumes where it stopped: children with status "ok" are never redone, failed ones are
tried again. A failing child is recorded with its error and the ladder goes on with the others.
Children run in `finetune.workers` processes, or on the ranks of a torchrun launch (parallel.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from medssl.config import EncoderConfig, FinetuneConfig
from medssl.errors import ConfigError, DataError
from medssl.ingest.csv_safe import write_csv
from medssl.ladder.child import Child, child_dir  # noqa: F401 — child_dir: where a child's files are
from medssl.ladder.deltas import add_deltas
from medssl.ladder.parallel import run_children
from medssl.ladder.registry import register_best
from medssl.ladder.results import print_failures, read_results, settings_digest, shard_path

RESULTS = "results.csv"
LOG_MODELS = ("all", "best", "none")
# (arm, protocol) in the order a (repeat, rung, seed) runs them; deep arms follow finetune.protocols
ARM_PROTOCOLS = (("random_features", "linear"), ("ssl", "linear"), ("scratch", "finetune"), ("ssl", "finetune"),
                 ("features", "linear"))


@dataclass
class LadderContext:
    """What every child of one ladder shares (picklable: worker processes get a copy without the tracker)."""
    cfg: FinetuneConfig
    encoder_source: str
    info: dict
    encoder_cfg: EncoderConfig
    spatial_dims: int
    img_size: list[int]
    cache: object
    codes: dict                     # image id -> class code of the ladder (binary: 1 = the positive class)
    patients: dict                  # image id -> patient id
    repeats: list[dict]             # per repeat: image id -> "train" | "val" | "test" | ""
    n_classes: int
    out_dir: Path
    tracker: object
    log_models: str
    class_names: list[str]          # class_names[code]
    positive: str                   # binary: name of the positive class; multi-class: ""
    monitor: str
    first_seed: int = 0             # registrable children: repeat 0, this seed
    digest: str = ""                # settings + encoder identity: results made under other settings are not "finished"
    parent_run_id: str | None = None
    rank: int = 0                   # which shard file this process appends to (parallel.py)
    parallel: bool = False
    features: dict = field(default_factory=dict)  # {"ssl" | "random-<seed>" | "engineered": {id: (F,)}}
    data: dict = field(default_factory=dict)  # what the model package records: label, modalities, image dims
    pooling: str | None = None      # a 2D encoder on 3D volumes: slice pooling (models/slices.py); None: central

    @property
    def input_dims(self) -> int:
        """What the models read: whole volumes when slice-pooled, else the encoder's own dimensionality."""
        return 3 if self.pooling else self.spatial_dims

    def ids(self, repeat: int, split: str) -> list[str]:
        """Labelled, cached images of one split of one repeat, in a fixed order."""
        return sorted(i for i, s in self.repeats[repeat].items() if s == split and i in self.codes and self.cache.has(i))

    def dataset(self, ids: list[str]):
        from medssl.train.loaders import ImageDataset
        # every arm (features too) reads the same arrays: whole volumes when slice-pooled, else a 2D encoder
        # on 3D cached volumes sees their central axial slice (the loader's rule)
        return ImageDataset(self.cache, ids, [self.codes[i] for i in ids], spatial_dims=self.input_dims)

    def encoder(self, arm: str, seed: int):
        from medssl.models.encoders import build_encoder, load_encoder
        from medssl.models.slices import SlicePooled
        if arm == "ssl":
            encoder = load_encoder(self.encoder_source)[0]
        else:
            torch.manual_seed(seed)  # the random initialisation is part of the seed
            encoder = build_encoder(self.encoder_cfg, self.spatial_dims, self.img_size)
        return SlicePooled(encoder, self.pooling) if self.pooling else encoder

    def lineage(self) -> dict:
        return {"medssl.pretrain_run_id": self.info.get("pretrain_run_id") or "",
                "medssl.manifest_digest": self.info.get("manifest_digest") or "",
                "medssl.encoder_source": self.encoder_source}

    def result_files(self) -> list[Path]:
        main = self.out_dir / RESULTS
        return [main, shard_path(main, self.rank)] if self.parallel else [main]


def run_ladder(cfg: FinetuneConfig, encoder_source, cache, df: pd.DataFrame, label: str, rungs, out_dir,
               tracker, encoder_cfg: EncoderConfig | None = None, spatial_dims: int | None = None,
               img_size: list[int] | None = None, *, log_models: bool | str = "best", class_names: dict | None = None,
               monitor: str = "val_loss", registered_model_prefix: str | None = None,
               repeats: list[dict] | None = None, positive: int | None = None,
               positive_class=None) -> pd.DataFrame:
    """Run (or resume) the ladder; returns one row per child, failures included.

    repeats: per repeat {image id: split} (default: the manifest's `split` column, one repeat); positive: the
    manifest code of the positive class (default: `positive_class` by name/code, else the rarer class).
    log_models: "best" (default: a registrable child, repeat 0 and the first seed, logs its model when its
    inner-validation AUROC beats every earlier one of its rung), "all" (True) or "none" (False: tests, dry runs).
    The registry gets, per rung, the best logged model of repeat 0 / first seed: chosen on that rung's labels.
    """
    log_models = {True: "all", False: "none"}.get(log_models, log_models)
    if log_models not in LOG_MODELS:
        raise ConfigError(f"log_models must be one of {LOG_MODELS}, got {log_models!r}", where="finetune.log_models")
    ctx = _context(cfg, encoder_source, cache, df, label, out_dir, tracker, encoder_cfg, spatial_dims, img_size,
                   log_models, class_names, monitor, repeats, positive, positive_class, rungs)
    check_rungs(ctx, rungs)
    plan = [Child(rung, arm, protocol) for rung in rungs for arm, protocol in ARM_PROTOCOLS
            if arm in cfg.arms and (arm == "features" or protocol in cfg.protocols)]
    if not run_children(ctx, plan, ctx.out_dir / RESULTS):
        return read_results(ctx.out_dir / RESULTS)  # a torchrun rank > 0: rank 0 merges, registers, reports
    results = read_results(ctx.out_dir / RESULTS)
    if "settings_digest" in results:  # rows of earlier settings stay in the file but are not this ladder's
        results = results[results["settings_digest"].astype(str) == ctx.digest].reset_index(drop=True)
    if len(results) and (results["status"] == "ok").any():
        results = add_deltas(results, tracker, cfg.bootstrap)
        every = read_results(ctx.out_dir / RESULTS, latest=False)  # rows of other settings stay, as history
        kept = every[every["settings_digest"].astype(str) != ctx.digest] if "settings_digest" in every else every[:0]
        tmp = ctx.out_dir / (RESULTS + ".tmp")
        write_csv(pd.concat([kept, results], ignore_index=True), tmp)
        tmp.replace(ctx.out_dir / RESULTS)  # atomic, like the shards' merge
    print_failures(results)
    if cfg.register_model and log_models != "none" and getattr(tracker, "experiment", None):
        registrable = results[(results["repeat"] == 0) & (results["seed"] == ctx.first_seed)] if len(results) else results
        register_best(tracker, registrable, registered_model_prefix or f"{tracker.experiment}-{label}", ctx.lineage())
    if getattr(tracker, "active_run_id", None):  # the ladder's own run, when the caller opened one
        failed = int((results["status"] != "ok").sum())
        tracker.log_metrics({"children_ok": len(results) - failed, "children_failed": failed})
        tracker.log_params({"validation": cfg.validation, "positive_class": ctx.positive,
                            "repeats": len(ctx.repeats), "arms": list(cfg.arms)})
        tracker.log_artifact(ctx.out_dir / RESULTS, "ladder")
    return results


def _context(cfg, encoder_source, cache, df, label, out_dir, tracker, encoder_cfg, spatial_dims, img_size,
             log_models, class_names, monitor, repeats, positive, positive_class, rungs) -> LadderContext:
    from medssl.cohort.classes import binary_coding, class_names as names_of, positive_code
    from medssl.cohort.splits import label_codes
    from medssl.models.encoders import load_encoder
    _, info = load_encoder(encoder_source)  # fails early on a missing or broken encoder file
    codes = label_codes(df, label)
    labelled = codes.notna()
    if not labelled.any():  # nothing any rung could train on: one clear error instead of one per run
        raise DataError(f"the manifest has no labels in column '{label}'", where="split.label",
                        fix="give data.labels (a labels CSV) or choose a labelled column")
    names = names_of(df, codes, class_names)
    if positive is None:
        positive = positive_code(df, codes, names, positive_class)
    recode, ladder_names = binary_coding(names, positive)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = LadderContext(
        cfg=cfg, encoder_source=str(encoder_source), info=info,
        encoder_cfg=encoder_cfg or EncoderConfig.model_validate(info["encoder"]),
        spatial_dims=spatial_dims or int(info["spatial_dims"]), img_size=list(img_size or info["img_size"]),
        cache=cache, codes={i: recode[int(c)] for i, c in zip(df.loc[labelled, "image_id"], codes[labelled])},
        patients=dict(zip(df["image_id"], df["patient_id"])),
        repeats=repeats or [dict(zip(df["image_id"], df["split"].fillna("").astype(str)))],
        n_classes=len(ladder_names), out_dir=out_dir, tracker=tracker, log_models=log_models,
        class_names=ladder_names, positive=names[positive] if positive is not None else "", monitor=monitor,
        first_seed=min((r.seed for r in rungs), default=0), parent_run_id=getattr(tracker, "active_run_id", None))
    ctx.pooling = _pooling(ctx)
    ctx.digest = settings_digest(_settings(ctx, label), ctx.encoder_source)
    column = lambda name: df[name].dropna().unique() if name in df else []  # noqa: E731
    ctx.data = {"label": label, "modalities": sorted(map(str, column("modality"))),
                "image_dims": sorted(int(d) for d in column("spatial_dims"))}
    return ctx


def _pooling(ctx: LadderContext) -> str | None:
    """finetune.slice_pooling for a 2D encoder whose labelled cached images are 3D volumes, else None."""
    from medssl.models.slices import volume_pooling
    if ctx.spatial_dims != 2 or ctx.cfg.slice_pooling == "central":
        return None  # no shape is read: the setting cannot apply
    shape = getattr(ctx.cache, "shape", None) or (lambda i: ctx.cache.get(i).shape)
    shapes = (shape(i) for i in ctx.codes if ctx.cache.has(i))
    return volume_pooling(ctx.cfg.slice_pooling, ctx.spatial_dims, shapes)


def _settings(ctx: LadderContext, label: str) -> dict:
    """What a finished run depends on (see results.settings_digest); not how many processes ran it."""
    # slice pooling counts only where it applies (a 2D encoder on volumes): other ladders keep their digest
    pooled = {"slice_pooling": ctx.pooling} if ctx.pooling else {}
    return {**pooled, "finetune": ctx.cfg.model_dump(mode="json", exclude={"register_model", "workers",
                                                                           "log_models", "slice_pooling"}),
            "encoder_cfg": ctx.encoder_cfg.model_dump(mode="json"), "spatial_dims": ctx.spatial_dims,
            "img_size": ctx.img_size, "label": label, "monitor": ctx.monitor, "classes": ctx.class_names,
            "repeats": [{s: sorted(i for i, v in r.items() if v == s and i in ctx.codes) for s in ("val", "test")}
                        for r in ctx.repeats]}


def check_rungs(ctx: LadderContext, rungs) -> None:
    """Refuse a rung whose labelled patients appear in its repeat's test (or validation) split."""
    for rung in rungs:
        if rung.repeat >= len(ctx.repeats):
            raise DataError(f"rung {rung.name} (seed {rung.seed}) is of repeat {rung.repeat}, but the splits "
                            f"have {len(ctx.repeats)} repeat(s)", where=f"rung {rung.name}",
                            fix="run the 'splits' stage again")
        split = ctx.repeats[rung.repeat]
        held = {ctx.patients[i] for i, s in split.items() if s in ("test", "val") and i in ctx.patients}
        leaked = sorted({ctx.patients[i] for i in rung.image_ids} & held)
        if leaked:
            raise DataError(f"rung {rung.name} (seed {rung.seed}, repeat {rung.repeat}) holds {len(leaked)} "
                            f"patient(s) of the evaluation splits (e.g. {leaked[0]}): its numbers would be "
                            f"measured on patients it trained on", where=f"rung {rung.name}, repeat {rung.repeat}",
                            fix="draw rungs from the training split only (cohort.splits.build_ladder)")
