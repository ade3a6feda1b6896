"""What goes into a run: params flattened and cut to MLflow's limits, lineage tags, the pseudonym check."""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any, Mapping

import mlflow

import medssl
from medssl.errors import TrackingError

MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value; longer values are cut with a marker
MAX_TAG_CHARS = 8000
DIGEST_CHARS = 32  # MLflow keeps at most 36 characters of a dataset digest; the full one goes in a tag
PSEUDONYM = {"patient_id": r"pat-[0-9a-f]{12}", "study_id": r"stu-[0-9a-f]{12}", "series_id": r"ser-[0-9a-f]{12}"}


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}; values become strings of at most MAX_PARAM_CHARS characters."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = cut(str(value), MAX_PARAM_CHARS)
    return flat


def cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 15] + "...[truncated]"


def lineage_tags() -> dict[str, str]:
    """What produced a run: medssl version and git commit of the code (no host or user names)."""
    import platform
    import torch
    tags = {"mlflow.source.name": "medssl", "medssl.version": medssl.__version__,
            "medssl.python": platform.python_version(),
            "medssl.torch": torch.__version__, "medssl.mlflow": mlflow.__version__}
    repo = Path(medssl.__file__).resolve().parent.parent
    sha = _git(repo, "rev-parse", "HEAD")
    if sha:
        dirty = bool(_git(repo, "status", "--porcelain", "--untracked-files=no"))
        tags.update({"mlflow.source.git.commit": sha, "medssl.git_sha": sha, "medssl.git_dirty": str(dirty).lower()})
    return tags


def _git(repo: Path, *args: str) -> str:
    try:
        done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def check_pseudonymous(df) -> None:
    for column, pattern in PSEUDONYM.items():
        if column in df.columns:
            values = df[column].dropna().astype(str)
            bad = values[~values.str.fullmatch(pattern)]
            if len(bad):
                raise TrackingError(f"manifest column '{column}' holds {len(bad)} values that are not pseudonyms",
                                    where="Tracker.log_dataset",
                                    fix="log only manifests written by medssl.data.manifest (salted-hash ids)")
