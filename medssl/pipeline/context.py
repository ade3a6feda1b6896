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
        talks to MLflow."""
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


def open_cache(ctx: Context):
    from medssl.preprocess.cache import VolumeCache
    return VolumeCache(ctx.cfg.preprocess.cache_dir, ctx.cfg.preprocess)


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
    from medssl.ingest.manifest import build_manifest
    if not Path(folder).is_dir():
        raise DataError(f"input folder does not exist: {folder}", where="data.folder / FOLDER",
                        fix="give the folder that holds your DICOM or NIfTI files")
    return build_manifest(folder, out, salt=pseudonym_salt(salt_env), **kwargs)
