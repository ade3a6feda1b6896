"""`medssl run pipelines/NAME.yaml`: the stages of one imaging dataset, in order, skipping finished work.

Each stage has a fingerprint: a hash of the settings it reads, its code revision, plus the fingerprints of
the stages it depends on (and, for the manifest, a listing of the input folder). A stage whose recorded
fingerprint matches and whose outputs exist is skipped, so a rerun after an interruption or a failure redoes
only what changed.
Everything runs under one MLflow experiment (named after the pipeline) with one parent run per `medssl run`.
Under torchrun every rank runs this; ranks.py says which stages run on every rank and which on rank 0 alone.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rich.table import Table

from medssl.config import PipelineConfig
from medssl.errors import MedsslError
from medssl.pipeline.stages import (cache as cache_stage, demo as demo_stage, ladder as ladder_stage,
                                    manifest as manifest_stage, pretrain as pretrain_stage,
                                    report as report_stage, seg_ladder as seg_stage, splits as splits_stage)
from medssl.pipeline import ranks
from medssl.pipeline.context import Context, input_listing, where_to_look
from medssl.pipeline.scale import apply_scale
from medssl.ui import console



@dataclass(frozen=True)
class Stage:
    name: str
    needs: tuple[str, ...]
    settings: Callable[[PipelineConfig], object]   # the part of the config this stage reads
    run: Callable[[Context], dict]               # returns the outputs to record (paths, counts)
    doc: str
    # raise when the stage's code writes something else for the same settings (e.g. the split order changed):
    # finished work recorded under the old revision then reruns after an upgrade instead of being reused
    revision: int = 1


STAGES: tuple[Stage, ...] = (
    Stage("demo", (), lambda c: c.data.demo, demo_stage.run_demo, "build the demo cohort from real anatomy"),
    Stage("manifest", ("demo",), lambda c: (c.data, c.manifest), manifest_stage.run_manifest,
          "scan the folder, assemble DICOM series, join labels"),
    # the validation mode decides whether a validation split is drawn at all
    Stage("splits", ("manifest",), lambda c: (c.split, c.finetune.validation), splits_stage.run_splits,
          "patient-level train/val/test splits and label ladders",
          revision=3),  # 2: ordered by source path; 3: repeats, rungs in patients, positive class
    Stage("cache", ("splits",), lambda c: c.preprocess, cache_stage.run_cache,
          "decode, orient, resample and normalise every image once"),
    Stage("pretrain", ("cache",), lambda c: c.pretrain, pretrain_stage.run_pretrain,
          "self-supervised pretraining of the encoder"),
    Stage("ladder", ("pretrain",), lambda c: c.finetune, lambda ctx: _by_task(ctx, ladder_stage.run_ladder,
          seg_stage.run_seg_ladder), "fine-tune at each label budget, SSL vs scratch, features and random features",
          revision=2),  # 2: inner validation, arms, repeats
    Stage("report", ("ladder",), lambda c: c.evaluate if c.finetune.task == "classification" else "segmentation",
          lambda ctx: _by_task(ctx, report_stage.run_report, seg_stage.run_seg_report),
          "label-efficiency curve and table"),
)


def _by_task(ctx: Context, classification: Callable, segmentation: Callable) -> dict:
    """finetune.task picks the ladder and report stages (stages/seg_ladder.py for segmentation)."""
    return (segmentation if ctx.cfg.finetune.task == "segmentation" else classification)(ctx)


def _digest(value: object) -> str:
    text = json.dumps(value, sort_keys=True, default=_jsonable)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _jsonable(value: object):
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    return str(value)


class Pipeline:
    def __init__(self, cfg: PipelineConfig, source: Path | None = None):
        self.cfg = apply_scale(cfg)
        self.source = source
        self.ctx = Context.create(self.cfg)
        self.stages = [s for s in STAGES if s.name != "demo" or self.cfg.data.demo is not None]

    # ------------------------------------------------------------------ fingerprints and records
    def fingerprints(self) -> dict[str, str]:
        prints: dict[str, str] = {}
        for stage in self.stages:
            upstream = [prints[n] for n in stage.needs if n in prints]
            extra = input_listing(self.cfg) if stage.name == "manifest" and not self.cfg.data.demo else ""
            prints[stage.name] = _digest([stage.name, stage.revision, stage.settings(self.cfg), upstream, extra])
        return prints

    def _record_path(self, name: str) -> Path:
        return self.ctx.paths.root / "stages" / f"{name}.json"

    def _is_done(self, name: str, fingerprint: str) -> bool:
        path = self._record_path(name)
        if not path.is_file():
            return False
        record = json.loads(path.read_text())
        outputs = [Path(p) for p in record.get("paths", [])]
        return record.get("fingerprint") == fingerprint and all(p.exists() for p in outputs)

    # ------------------------------------------------------------------------------- running
    def plan(self, force: list[str], until: str | None) -> list[tuple[Stage, str, bool]]:
        unknown = (set(force) | ({until} if until else set())) - {s.name for s in self.stages}
        if unknown:
            raise MedsslError(f"unknown stage(s) {sorted(unknown)}", where="--force / --until",
                              fix=f"choose from {[s.name for s in self.stages]}")
        prints, rows, dirty = self.fingerprints(), [], set()
        for stage in self.stages:
            todo = (stage.name in force or not self._is_done(stage.name, prints[stage.name])
                    or any(n in dirty for n in stage.needs))
            if todo:
                dirty.add(stage.name)
            rows.append((stage, prints[stage.name], todo))
            if stage.name == until:
                break
        return rows

    def run(self, dry_run: bool = False, force: list[str] = (), until: str | None = None) -> None:
        plan = self.plan(list(force), until)
        if dry_run or ranks.rank() == 0:
            self._print_plan(plan)
        if dry_run:
            return
        ok = False
        try:
            self._run_plan(ranks.shared_plan(plan))  # under torchrun: rank 0's plan (stages, ranks.py)
            ok = True
        finally:
            ranks.finish(ok)
        if ranks.rank() == 0:
            console.print(where_to_look(self.ctx))

    def _run_plan(self, plan: list) -> None:
        self._check_writable()  # before MLflow: a run must never be opened by work that cannot be saved
        self.ctx.open_tracker()
        with self.ctx.tracker.run(f"{self.cfg.name}-pipeline", tags=self.ctx.pipeline_tags()) as parent:
            self.ctx.parent_run_id = parent.info.run_id
            self.ctx.tracker.log_params({"pipeline": self.cfg.model_dump(mode="json")})
            for stage, fingerprint, todo in plan:
                self._run_stage(stage, fingerprint, todo)

    def _check_writable(self) -> None:
        """The workdir, the cache and the manifest's folder take files, or a clear error now."""
        places = {"workdir": self.ctx.paths.root, "preprocess.cache_dir": self.cfg.preprocess.cache_dir,
                  "manifest.out": self.cfg.manifest.out.parent}
        for setting, folder in places.items():
            try:
                Path(folder).mkdir(parents=True, exist_ok=True)
                probe = Path(folder) / f".medssl-write-test-{os.getpid()}"
                probe.write_text("")
                probe.unlink()
            except OSError as err:
                raise MedsslError(f"cannot write in {folder}: {err.strerror or err}", where=setting,
                                  fix=f"make it writable, or point {setting} at a folder you can write "
                                      f"(e.g. {setting}=/path/you/own on the command line)") from None

    def _run_stage(self, stage: Stage, fingerprint: str, todo: bool) -> None:
        # under torchrun a rank > 0 speaks only of the stages it takes part in (ranks.py)
        loud = ranks.rank() == 0 or ranks.on_every_rank(stage.name)
        say = console.print if loud else (lambda *_: None)
        if not todo:
            self.ctx.outputs[stage.name] = json.loads(self._record_path(stage.name).read_text())
            say(f"[green]✓[/] {stage.name}: up to date, skipped")
            return
        if loud:
            console.rule(f"[bold]{stage.name}[/]: {stage.doc}")
        start = time.perf_counter()
        try:
            outputs = ranks.run_stage(stage.name, lambda: stage.run(self.ctx))
        except MedsslError as err:
            raise type(err)(f"stage '{stage.name}' failed: {err.what}", err.where,
                            (err.fix or "") + " — finished stages are kept; rerun the same command to resume"
                            ) from None
        outputs = {**outputs, "fingerprint": fingerprint, "seconds": round(time.perf_counter() - start, 1)}
        self.ctx.outputs[stage.name] = outputs
        if ranks.rank() == 0:
            self._record_path(stage.name).parent.mkdir(parents=True, exist_ok=True)
            self._record_path(stage.name).write_text(json.dumps(outputs, indent=2, default=str))
        say(f"[green]✓[/] {stage.name} done in {outputs['seconds']} s")

    def _print_plan(self, plan) -> None:
        table = Table(title=f"pipeline {self.cfg.name}" + (f" ({self.source})" if self.source else ""))
        for column in ("stage", "what", "status", "fingerprint"):
            table.add_column(column)
        for stage, fingerprint, todo in plan:
            table.add_row(stage.name, stage.doc, "[yellow]run[/]" if todo else "[green]skip[/]", fingerprint)
        console.print(table)
