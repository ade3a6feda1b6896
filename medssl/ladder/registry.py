"""Trained classifiers in MLflow: the model of every ladder run, and the best one per rung in the registry."""
from __future__ import annotations

import logging
import re
import tempfile
from contextlib import contextmanager

import pandas as pd
import torch
from medssl.ui import console

MAX_EXAMPLE_VALUES = 32 ** 3  # larger inputs are logged with a signature but no input example


def log_model(tracker, model, sample: torch.Tensor) -> None:
    """MLflow pytorch flavour under artifact path "model", with signature and a one-image input example.

    Saved locally then sent as artifacts through the tracker (its outbox survives a server outage).
    pip requirements are given, not inferred: inference loads the model in a subprocess (seconds per child).
    Pickle serialisation (not torch.export "pt2"): the loaded object is the Classifier itself, with its
    validation threshold buffer and `.eval()`; loading needs medssl importable.
    """
    import monai
    import mlflow.pytorch
    from mlflow.models import infer_signature
    example = sample[None].float().numpy()  # (1, C, *spatial)
    with torch.no_grad():
        logits = model.eval()(torch.from_numpy(example)).numpy()  # (1, K)
    # a 3D volume as a JSON example is megabytes per run: keep the example only for small inputs
    # (the signature still records dtype and shape)
    small = example.size <= MAX_EXAMPLE_VALUES
    with tempfile.TemporaryDirectory() as tmp, _quiet("mlflow.pytorch"):
        mlflow.pytorch.save_model(model, f"{tmp}/model", signature=infer_signature(example, logits),
                                  input_example=example if small else None, serialization_format="pickle",
                                  pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                                                    f"monai=={monai.__version__}", "medssl"])
        tracker.log_artifact(f"{tmp}/model", "model")


@contextmanager
def _quiet(logger_name: str):
    """Silence a logger's warnings for one call: MLflow warns about pickle on every save, and the choice is
    made and documented in log_model, so 36 repeats of it would only bury the ladder's own messages."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def register_best(tracker, results: pd.DataFrame, prefix: str, lineage: dict) -> dict[str, str]:
    """Per rung: the run with the best validation AUROC (any seed, init, protocol) -> a version of the
    registered model "<prefix>-<rung>", tagged with the lineage (pretraining run id, manifest digest) and the
    run's rung / seed / init / protocol. Idempotent: a run already registered under that name is not
    registered again (resumed ladders). Returns {rung: version}."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracker.tracking_uri)
    registered = {}
    ok = results[(results["status"] == "ok") & results["run_id"].fillna("").astype(bool)]
    if "model_logged" in ok:  # only runs that logged a model can be registered
        ok = ok[ok["model_logged"].astype(str).str.lower() == "true"]
    for rung, part in ok.dropna(subset=["val_auroc"]).groupby("rung"):
        best = part.loc[part["val_auroc"].idxmax()]
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{prefix}-{rung}")
        try:
            known = {v.run_id: v.version for v in client.search_model_versions(f"name='{name}'")}
        except Exception:  # noqa: BLE001 — no such model yet, or a registry that cannot search
            known = {}
        if best["run_id"] in known:
            registered[rung] = known[best["run_id"]]
            continue
        tags = {**lineage, "medssl.rung": rung, "medssl.seed": int(best["seed"]), "medssl.init": best["init"],
                "medssl.protocol": best["protocol"], "medssl.val_auroc": f"{best['val_auroc']:.4f}",
                "medssl.test_auroc": f"{best['auroc']:.4f}"}
        version = tracker.register_model("model", name, tags, run_id=best["run_id"])
        if version:
            registered[rung] = version
            console.print(f"registered [bold]{name}[/] v{version} ({best['key']}, val AUROC {best['val_auroc']:.3f})")
    return registered
