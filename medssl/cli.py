"""The `medssl` command. Thin: parse arguments, load validated config, call one stage, print errors nicely.

Nothing below this module sees argv; everything below config.py sees typed settings, never YAML.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from medssl.errors import MedsslError
from medssl.ui import console

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Self-supervised pretraining and few-label evaluation for medical imaging.")
manifest_app = typer.Typer(no_args_is_help=True, help="Index a folder of DICOM / NIfTI into a manifest.")
app.add_typer(manifest_app, name="manifest")

OVERRIDES = typer.Argument(None, help="settings to override, e.g. pretrain.train.steps=500")


@manifest_app.command("build")
def manifest_build(
    folder: Path = typer.Argument(..., help="folder to scan recursively (DICOM by content, .nii/.nii.gz)"),
    out: Path = typer.Option(..., "--out", help="manifest CSV to write, e.g. data_manifests/NAME.csv"),
    labels: Optional[Path] = typer.Option(None, "--labels", help="labels CSV (see data_manifests/README.md)"),
    join_on: str = typer.Option("auto", help="auto | patient_id | study_uid | series_uid | path"),
    workers: Optional[int] = typer.Option(None, help="header-reading processes (default: all cores)"),
    max_image_mb: float = typer.Option(4096, help="refuse images whose declared size exceeds this"),
    nifti_modality: str = typer.Option("MR", help="modality recorded for NIfTI files"),
    workdir: Path = typer.Option(Path(".medssl"), help="the workdir whose salt pseudonymises (as the pipeline's "
                                                       "workdir; $MEDSSL_SALT overrides)"),
):
    """Scan FOLDER and write the manifest, its skipped report and its metadata."""
    from medssl.pipeline.commands import build_manifest_with_salt, print_manifest_summary
    summary = build_manifest_with_salt(folder, out, workdir=workdir, labels=labels, join_on=join_on, workers=workers,
                                       max_image_mb=max_image_mb, nifti_modality=nifti_modality)
    print_manifest_summary(summary)


@app.command()
def run(pipeline: Path = typer.Argument(..., help="pipelines/NAME.yaml"),
        overrides: Optional[list[str]] = OVERRIDES,
        dry_run: bool = typer.Option(False, "--dry-run", help="print the plan, run nothing"),
        force: Optional[list[str]] = typer.Option(None, "--force", help="rerun this stage even if up to date"),
        until: Optional[str] = typer.Option(None, "--until", help="stop after this stage (e.g. cache)")):
    """Run every stage of a pipeline: demo data, manifest, splits, cache, pretrain, ladder, report."""
    _run_stages(pipeline, overrides, dry_run=dry_run, force=force or [], only=until)


def _stage_command(stage: str, doc: str):
    def command(pipeline: Path = typer.Argument(..., help="pipelines/NAME.yaml"),
                overrides: Optional[list[str]] = OVERRIDES,
                dry_run: bool = typer.Option(False, "--dry-run", help="print the plan, run nothing")):
        _run_stages(pipeline, overrides, dry_run=dry_run, force=[stage], only=stage)
    command.__doc__ = doc
    return command


app.command("pretrain")(_stage_command(
    "pretrain", "Pretrain the encoder of a pipeline (earlier stages run first if missing)."))
app.command("finetune")(_stage_command(
    "ladder", "Run the label ladder (SSL vs scratch) of a pipeline (earlier stages run first if missing)."))
app.command("report")(_stage_command("report", "Rebuild the label-efficiency report of a pipeline."))


@app.command("demo-data")
def demo_data(out: Path = typer.Argument(Path(".medssl/demo_data"), help="folder to write"),
              subjects: int = typer.Option(60), seed: int = typer.Option(0), size: int = typer.Option(48)):
    """Write the embedded demo cohort (DICOM series + NIfTI + labels.csv) built from real anatomy."""
    from medssl.config import DemoConfig
    from medssl.demo.cohort import build_demo_cohort
    cohort = build_demo_cohort(DemoConfig(subjects=subjects, seed=seed, size=size), out)
    console.print(f"demo cohort written to {cohort.folder} (labels: {cohort.labels_csv})")


@app.command()
def evaluate(model: str = typer.Argument(..., help="model folder/file, runs:/ID/model or models:/NAME/VERSION"),
             overrides: Optional[list[str]] = OVERRIDES,
             pipeline: Path = typer.Option(..., "--pipeline", help="pipeline whose preprocessing to use"),
             manifest: Path = typer.Option(..., "--manifest", help="manifest of the external set"),
             out: Path = typer.Option(Path("outputs/evaluate"), "--out")):
    """Score a saved or registered model on another manifest (external validation)."""
    from medssl.pipeline.commands import evaluate_external
    evaluate_external(_load(pipeline, overrides), model, manifest, out)


@app.command()
def predict(model: str = typer.Argument(..., help="model folder/file, runs:/ID/model or models:/NAME/VERSION"),
            folder: Path = typer.Argument(..., help="folder of new scans"),
            overrides: Optional[list[str]] = OVERRIDES,
            pipeline: Path = typer.Option(..., "--pipeline", help="pipeline whose preprocessing to use"),
            out: Path = typer.Option(Path("outputs/predictions.csv"), "--out")):
    """Write a predictions CSV for a folder of new scans."""
    from medssl.pipeline.commands import predict_folder
    predict_folder(_load(pipeline, overrides), model, folder, out)


@app.command()
def export(model: str = typer.Argument(..., help="model folder, runs:/ID/model or models:/NAME/VERSION"),
           fmt: str = typer.Option(..., "--format", help="onnx | torchscript | bundle (MONAI bundle)"),
           out: Path = typer.Option(..., "--out", help="file (onnx, torchscript) or folder (bundle) to write")):
    """Export a medssl model for deployment; the export is checked for output parity with PyTorch."""
    from medssl.export.formats import export as export_model
    from medssl.export.resolve import open_model
    parity = export_model(open_model(model), fmt, out)
    console.print(f"{fmt} written to {parity['path']} (max |Δ probability| vs PyTorch "
                  f"{parity['max_abs_diff']:.1e}, tolerance {parity['tolerance']:.0e})")


def _load(pipeline: Path, overrides):
    from medssl.config import load_pipeline
    return load_pipeline(pipeline, overrides or [])


def _run_stages(pipeline: Path, overrides, *, dry_run: bool, force: list[str], only: str | None):
    from medssl.pipeline.runner import Pipeline
    Pipeline(_load(pipeline, overrides), source=pipeline).run(dry_run=dry_run, force=force, until=only)


def main(argv: list[str] | None = None) -> int:
    try:
        app(args=argv, standalone_mode=False)
    except MedsslError as err:
        console.print(f"[bold red]error:[/] {err.render()}", highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: finished stages and checkpoints are kept; rerun to resume")
        return 130
    except (typer.Exit, SystemExit) as done:
        return getattr(done, "exit_code", getattr(done, "code", 0)) or 0
    except Exception as err:  # click usage errors arrive here in standalone_mode=False
        import click
        if isinstance(err, click.ClickException):
            err.show()
            return err.exit_code
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
