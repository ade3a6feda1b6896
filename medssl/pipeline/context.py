"""What every stage shares: the settings, the workdir folders, the tracker, the outputs of earlier stages;
and the pseudonym salt and the input listing the manifest stage is fingerprinted with."""
from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from medssl.config import PipelineConfig
from medssl.errors import DataError


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
        opens the pipeline's runs (the other ranks' ladder children get their own client: ladder/parallel.py)."""
        from medssl.tracking.tracker import NullTracker
        self.tracker = NullTracker() if int(os.environ.get("RANK", "0")) != 0 else open_tracker(self.cfg)

    def pipeline_tags(self) -> dict:
        from medssl.tracking.tracker import lineage_tags
        return {**lineage_tags(), "medssl.pipeline": self.cfg.name}

    def child(self, name: str, **tags):
        return self.tracker.run(name, parent_run_id=self.parent_run_id, tags={"medssl.stage": name, **tags})

    @property
    def manifest_path(self) -> Path:
        return self.cfg.manifest.out

    @property
    def splits_path(self) -> Path:
        return self.manifest_path.with_suffix(".splits.json")


def read_data(ctx: Context):
    """(manifest rows with their `split` from the splits file, meta). The splits stage never rewrites the
    manifest, so the digest the manifest stage logged is the one every later stage and run records."""
    from medssl.cohort.splits import read_splits
    from medssl.ingest.manifest import read_manifest
    df, meta = read_manifest(ctx.manifest_path)
    doc = read_splits(ctx.splits_path)
    made_for = doc["settings"].get("manifest_digest")
    if made_for is not None and made_for != meta.get("digest"):
        raise DataError("the splits were made for another version of the manifest", where=str(ctx.splits_path),
                        fix="run the 'splits' stage again (medssl run PIPELINE --force splits)")
    df["split"] = df["image_id"].map(doc["splits"]).fillna("").astype(str)
    return df, meta


def open_cache(ctx: Context, meta: dict):
    """The training cache of the manifest whose meta is given (its root is the dataset's identity)."""
    from medssl.preprocess.cache import VolumeCache
    return VolumeCache(ctx.cfg.preprocess.cache_dir, ctx.cfg.preprocess, meta["root"])


def open_external_cache(cfg: PipelineConfig, meta: dict):
    """`evaluate` / `predict` preprocess into their own folder under the workdir, never into the training
    cache: a later `medssl run` skips its cache stage by fingerprint and must find only its own images."""
    from medssl.preprocess.cache import VolumeCache
    return VolumeCache(cfg.workdir / cfg.name / "external_cache", cfg.preprocess, meta["root"])


def data_source(ctx: Context) -> tuple[Path, Path | None]:
    if ctx.cfg.data.demo is not None:
        demo = ctx.outputs["demo"]
        return Path(demo["folder"]), Path(demo["labels"])
    return ctx.cfg.data.folder, ctx.cfg.data.labels


def open_tracker(cfg: PipelineConfig):
    from medssl.tracking.tracker import Tracker
    return Tracker(cfg.tracking.experiment or cfg.name, cfg.tracking.tracking_uri,
                   outbox_dir=cfg.workdir / cfg.name / "mlflow-outbox", start_wait_s=cfg.tracking.server_wait_s)


def where_to_look(ctx: Context) -> str:
    uri = ctx.tracker.tracking_uri or ""
    look = (f"open [cyan]{uri}[/]" if uri.startswith("http") else
            f"run [cyan]mlflow ui --backend-store-uri {uri}[/] then open http://127.0.0.1:5000")
    return (f"\n[bold]Results[/] are in MLflow experiment '{ctx.tracker.experiment}' "
            f"(parent run {ctx.parent_run_id}).\n  To look: {look}"
            f"\n  Report files: {ctx.paths.root / 'report'}")


SALT_FILE = "salt"   # workdir/salt: beside the outputs it pseudonymises, whatever the current directory


def pseudonym_salt(workdir: Path, env_name: str = "MEDSSL_SALT") -> str:
    """The secret that makes pseudonymous ids unlinkable to raw ids. From the environment (teams share one),
    else generated once and kept in a private file in the workdir, so reruns (from any directory) give the
    same pseudonyms."""
    if os.environ.get(env_name):
        return os.environ[env_name]
    store = Path(workdir).expanduser().resolve() / SALT_FILE
    if not store.is_file():
        store.parent.mkdir(parents=True, exist_ok=True)
        # created private (0600) before the secret is written: never readable by others, even briefly
        fd = os.open(store, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(16))
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


def build_manifest_with_salt(folder: Path, out: Path, salt_env: str = "MEDSSL_SALT", *, workdir: Path, **kwargs):
    from medssl.ingest.manifest import build_manifest
    if not Path(folder).is_dir():
        raise DataError(f"input folder does not exist: {folder}", where="data.folder / FOLDER",
                        fix="give the folder that holds your DICOM or NIfTI files")
    return build_manifest(folder, out, salt=pseudonym_salt(workdir, salt_env), **kwargs)
