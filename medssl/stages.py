"""The body of each pipeline stage: turn typed settings into calls to the subsystems, record outputs.

Each `run_*` receives the shared Context and returns a dict of outputs (with "paths" that must exist for the
stage to count as finished). MLflow: every stage is a child run of the pipeline's parent run.
"""
from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from medssl.config import PipelineConfig
from medssl.errors import DataError

console = Console(stderr=True)


@dataclass
class Paths:
    root: Path

    def __getattr__(self, name: str) -> Path:
        # workdir/<name> for every stage folder (demo_data, pretrain, ladder, report, stages)
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path


@dataclass
class Context:
    cfg: PipelineConfig
    paths: Paths
    tracker: object
    outputs: dict = field(default_factory=dict)
    parent_run_id: str | None = None

    @classmethod
    def create(cls, cfg: PipelineConfig) -> "Context":
        return cls(cfg=cfg, paths=Paths(cfg.workdir / cfg.name), tracker=None)

    def open_tracker(self) -> None:
        """MLflow is opened only when work starts (a dry run touches nothing); under torchrun only rank 0
        talks to MLflow."""
        from medssl.tracking import NullTracker
        self.tracker = NullTracker() if int(os.environ.get("RANK", "0")) != 0 else _tracker(self.cfg)

    def pipeline_tags(self) -> dict:
        from medssl.tracking import lineage_tags
        return {**lineage_tags(), "medssl.pipeline": self.cfg.name}

    def child(self, name: str, **tags):
        return self.tracker.run(name, parent_run_id=self.parent_run_id, tags={"medssl.stage": name, **tags})

    @property
    def manifest_path(self) -> Path:
        return self.cfg.manifest.out

    @property
    def splits_path(self) -> Path:
        return self.manifest_path.with_suffix(".splits.json")


# ------------------------------------------------------------------------------------ salt and data
def pseudonym_salt(env_name: str = "MEDSSL_SALT", store: Path = Path(".medssl/salt")) -> str:
    """The secret that makes pseudonymous ids unlinkable to raw ids. From the environment (teams share one),
    else generated once and kept in a private file so reruns give the same pseudonyms."""
    if os.environ.get(env_name):
        return os.environ[env_name]
    if not store.is_file():
        store.parent.mkdir(parents=True, exist_ok=True)
        store.write_text(secrets.token_hex(16))
        store.chmod(0o600)
    return store.read_text().strip()


def input_listing(cfg: PipelineConfig) -> list:
    """(path, size, mtime) of every input file: a changed folder makes the manifest stage run again."""
    folder = cfg.data.folder
    if folder is None or not folder.is_dir():
        return []
    found = []
    for dirpath, _, files in os.walk(folder):
        for name in files:
            try:
                stat = os.stat(os.path.join(dirpath, name))
            except OSError:
                continue
            found.append((os.path.relpath(os.path.join(dirpath, name), folder), stat.st_size, int(stat.st_mtime)))
    labels = cfg.data.labels
    if labels is not None and labels.is_file():
        found.append((str(labels), labels.stat().st_size, int(labels.stat().st_mtime)))
    return sorted(found)


def build_manifest_with_salt(folder: Path, out: Path, salt_env: str = "MEDSSL_SALT", **kwargs):
    from medssl.data.manifest import build_manifest
    if not Path(folder).is_dir():
        raise DataError(f"input folder does not exist: {folder}", where="data.folder / FOLDER",
                        fix="give the folder that holds your DICOM or NIfTI files")
    return build_manifest(folder, out, salt=pseudonym_salt(salt_env), **kwargs)


def print_manifest_summary(summary) -> None:
    console.print(summary.render() if hasattr(summary, "render") else str(summary))


# ---------------------------------------------------------------------------------------- stages
def run_demo(ctx: Context) -> dict:
    from medssl.demo import build_demo_cohort
    cohort = build_demo_cohort(ctx.cfg.data.demo, ctx.paths.demo_data)
    return {"folder": str(cohort.folder), "labels": str(cohort.labels_csv), "paths": [str(cohort.labels_csv)]}


def data_source(ctx: Context) -> tuple[Path, Path | None]:
    if ctx.cfg.data.demo is not None:
        demo = ctx.outputs["demo"]
        return Path(demo["folder"]), Path(demo["labels"])
    return ctx.cfg.data.folder, ctx.cfg.data.labels


def run_manifest(ctx: Context) -> dict:
    folder, labels = data_source(ctx)
    m = ctx.cfg.manifest
    with ctx.child("manifest"):
        summary = build_manifest_with_salt(folder, m.out, m.salt_env, labels=labels, join_on=m.join_on,
                                           workers=m.workers, max_image_mb=m.max_image_mb,
                                           nifti_modality=ctx.cfg.data.nifti_modality)
        print_manifest_summary(summary)
        from medssl.data.manifest import read_manifest
        df, meta = read_manifest(m.out)
        if df.empty:
            raise DataError(f"no usable image was found in {folder}", where="data.folder",
                            fix=f"check the folder; every file that was seen is listed with its reason in "
                                f"{m.out.with_suffix('.skipped.csv')}")
        ctx.tracker.log_dataset(df, meta.get("digest"), ctx.cfg.name)
        ctx.tracker.log_metrics({"images": len(df), "skipped": _count_rows(m.out.with_suffix(".skipped.csv"))})
        for suffix in (".csv", ".skipped.csv", ".meta.json"):
            ctx.tracker.log_artifact(m.out.with_suffix(suffix), "manifest")
    return {"paths": [str(m.out)], "images": len(df), "digest": meta.get("digest")}


def _count_rows(csv_path: Path) -> int:
    if not csv_path.is_file():
        return 0
    return max(0, sum(1 for _ in csv_path.open()) - 1)


def run_splits(ctx: Context) -> dict:
    from medssl.data.manifest import read_manifest, write_manifest
    from medssl.data import splits
    s = ctx.cfg.split
    df, meta = read_manifest(ctx.manifest_path)
    if s.label not in df.columns or df[s.label].isna().all():
        raise DataError(f"the manifest has no labels in column '{s.label}'", where=str(ctx.manifest_path),
                        fix="give data.labels (a labels CSV) or set split.label to a labelled column")
    df["split"] = splits.assign_splits(df, s.label, s.seed, s.val_fraction, s.test_fraction)
    write_manifest(df, meta, ctx.manifest_path)
    rungs = splits.build_ladder(df, s.label, fractions=s.ladder.fractions, per_class=s.ladder.per_class,
                                seeds=s.ladder.seeds)
    splits.write_splits(ctx.splits_path, df, rungs, settings=s.model_dump(mode="json"))
    counts = df["split"].value_counts().to_dict()
    console.print(f"splits: {counts}; {len(rungs)} ladder rungs")
    return {"paths": [str(ctx.splits_path)], "counts": counts, "rungs": len(rungs)}


def open_cache(ctx: Context):
    from medssl.data.cache import VolumeCache
    return VolumeCache(ctx.cfg.preprocess.cache_dir, ctx.cfg.preprocess)


def run_cache(ctx: Context) -> dict:
    from medssl.data.manifest import read_manifest
    df, meta = read_manifest(ctx.manifest_path)
    cache = open_cache(ctx)
    failures = cache.build(df, Path(meta["root"]), workers=ctx.cfg.manifest.workers)
    for image_id, reason in failures.items():
        console.print(f"[yellow]not cached[/] {image_id}: {reason}")
    if len(failures) == len(df):
        raise DataError("no image could be preprocessed", where=str(ctx.manifest_path),
                        fix="see the reasons above; check the preprocess settings")
    return {"paths": [str(cache.dir / "index.json")], "cached": len(df) - len(failures), "failed": failures}


def _online_probe(ctx: Context, df, cache):
    """The "is it learning?" probe: labelled TRAINING images only (val/test stay unseen until evaluation)."""
    from medssl.data.splits import label_codes, labelled_ids
    from medssl.train.probe import make_probe
    if not ctx.cfg.pretrain.train.probe_every:
        return None
    ids = [i for i in labelled_ids(df, ctx.cfg.split.label, "train") if cache.has(i)]
    codes = label_codes(df, ctx.cfg.split.label).set_axis(df["image_id"])
    return make_probe(cache, ids, codes.loc[ids].astype(int).tolist(), ctx.cfg.pretrain.crop,
                      ctx.cfg.preprocess.spatial_dims, seed=ctx.cfg.pretrain.train.seed)


def run_pretrain(ctx: Context) -> dict:
    from medssl.data.manifest import read_manifest
    from medssl.data.splits import pretrain_ids
    from medssl.train.pretrain import run_pretraining
    df, meta = read_manifest(ctx.manifest_path)
    cache = open_cache(ctx)
    # pretraining sees the training split and unlabelled patients, never val/test patients (no leakage)
    ids = [i for i in pretrain_ids(df) if cache.has(i)]
    contrastive = ctx.cfg.pretrain.ssl.contrastive
    by = "study_id" if contrastive is not None and contrastive.positives == "study" else "patient_id"
    groups = dict(zip(df["image_id"], df[by]))
    digest = meta.get("digest", "")
    with ctx.child("pretrain", **{"medssl.manifest_digest": digest}) as run:
        ctx.tracker.log_dataset(df[df["image_id"].isin(ids)], digest, ctx.cfg.name)  # what the encoder saw
        encoder = run_pretraining(ctx.cfg.pretrain, cache, ids, groups, ctx.paths.pretrain, ctx.tracker,
                                  probe=_online_probe(ctx, df, cache), spatial_dims=ctx.cfg.preprocess.spatial_dims,
                                  manifest_digest=digest, keep_checkpoints=ctx.cfg.pretrain.train.keep_checkpoints)
        run_id = run.info.run_id
    return {"paths": [str(encoder)], "encoder": str(encoder), "run_id": run_id, "images": len(ids)}


def run_ladder(ctx: Context) -> dict:
    from medssl.data.manifest import read_manifest
    from medssl.data.splits import read_splits
    from medssl.finetune.ladder import run_ladder as ladder
    df, meta = read_manifest(ctx.manifest_path)
    rungs = read_splits(ctx.splits_path)["rungs"]
    pretrain = ctx.outputs["pretrain"]
    tags = {"medssl.pretrain_run_id": pretrain["run_id"], "medssl.manifest_digest": meta.get("digest", "")}
    with ctx.child("ladder", **tags):
        label = ctx.cfg.split.label
        results = ladder(ctx.cfg.finetune, pretrain["encoder"], open_cache(ctx), df, label, rungs,
                         ctx.paths.ladder, ctx.tracker, log_models=ctx.cfg.finetune.log_models,
                         monitor=ctx.cfg.finetune.monitor, class_names=meta.get("label_names", {}).get(label))
    out = ctx.paths.ladder / "results.csv"
    return {"paths": [str(out)], "results": str(out), "rows": len(results)}


def run_report(ctx: Context) -> dict:
    import pandas as pd
    from medssl.evaluate.report import build_report
    results = pd.read_csv(ctx.outputs["ladder"]["results"])
    artifacts = build_report(results, ctx.paths.report)
    ctx.tracker.log_artifacts(ctx.paths.report, "report")  # on the parent run: the reviewer's first stop
    return {"paths": [str(p) for p in artifacts.values()], **{k: str(v) for k, v in artifacts.items()}}


def where_to_look(ctx: Context) -> str:
    uri = ctx.tracker.tracking_uri or ""
    look = (f"open [cyan]{uri}[/]" if uri.startswith("http") else
            f"run [cyan]mlflow ui --backend-store-uri {uri}[/] then open http://127.0.0.1:5000")
    return (f"\n[bold]Results[/] are in MLflow experiment '{ctx.tracker.experiment}' "
            f"(parent run {ctx.parent_run_id}).\n  To look: {look}"
            f"\n  Report files: {ctx.paths.root / 'report'}")


# ------------------------------------------------------------------ external validation and inference
def _tracker(cfg: PipelineConfig):
    from medssl.tracking import Tracker
    return Tracker(cfg.tracking.experiment or cfg.name, cfg.tracking.tracking_uri,
                   outbox_dir=cfg.workdir / cfg.name / "mlflow-outbox", start_wait_s=cfg.tracking.server_wait_s)


def evaluate_external(cfg: PipelineConfig, model: str, manifest: Path, out: Path) -> dict:
    """Score a model on another manifest, preprocessed exactly as its pipeline's training data."""
    from medssl.data.cache import VolumeCache
    from medssl.data.manifest import read_manifest
    from medssl.finetune.predict import evaluate_model
    cache = VolumeCache(cfg.preprocess.cache_dir, cfg.preprocess)
    df, meta = read_manifest(manifest)
    cache.build(df, Path(meta["root"]), workers=cfg.manifest.workers)
    tracker = _tracker(cfg)
    values = evaluate_model(model, cache, df, cfg.split.label, out, tracker, n_boot=cfg.finetune.bootstrap)
    shown = {k: round(v, 4) for k, v in values.items() if isinstance(v, float)}
    console.print(f"external validation on {manifest}: {shown}\n  files: {out}")
    return values


def predict_folder(cfg: PipelineConfig, model: str, folder: Path, out: Path):
    """Index a folder of new scans, preprocess them like the training data, write one prediction per image."""
    from medssl.data.cache import VolumeCache
    from medssl.data.manifest import read_manifest
    from medssl.finetune.predict import predict
    cache = VolumeCache(cfg.preprocess.cache_dir, cfg.preprocess)
    manifest_csv = Path(out).with_suffix(".manifest.csv")
    build_manifest_with_salt(folder, manifest_csv, cfg.manifest.salt_env, workers=cfg.manifest.workers,
                             max_image_mb=cfg.manifest.max_image_mb, nifti_modality=cfg.data.nifti_modality)
    df, meta = read_manifest(manifest_csv)
    cache.build(df, Path(meta["root"]), workers=cfg.manifest.workers)
    frame = predict(model, cache, df, Path(out), tracking_uri=_tracker(cfg).tracking_uri)
    # the manifest holds only pseudonymous ids: add the files so users can find each prediction's scan
    frame = frame.merge(df[["image_id", "paths"]], on="image_id", how="left")
    frame.to_csv(out, index=False)
    console.print(f"{len(frame)} predictions written to {out} (manifest of the folder: {manifest_csv})")
    return frame
