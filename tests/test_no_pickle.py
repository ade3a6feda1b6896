"""Nothing medssl loads runs code: every torch.load in the package is weights_only=True, nothing calls a
pickle/joblib/MLflow-pytorch loader, and a planted classifier file whose pickle would run code is refused."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from medssl.errors import TrainingError

PACKAGE = Path(__file__).resolve().parents[1] / "medssl"
UNSAFE = re.compile(r"\b(pickle\.loads?|joblib\.load|cloudpickle\.loads?|dill\.loads?|mlflow\.pytorch\.load_model|"
                    r"mlflow\.sklearn\.load_model|np\.load\([^)]*allow_pickle=True)")


class _Planted:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_every_loader_in_the_package_refuses_pickles():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        for call in re.finditer(r"torch\.load\(", text):
            args = text[call.end():text.find("\n", text.find(")", call.end()))]
            if "weights_only=True" not in args:
                offenders.append(f"{path.relative_to(PACKAGE)}: torch.load without weights_only=True")
        offenders += [f"{path.relative_to(PACKAGE)}: {m.group(0)}" for m in UNSAFE.finditer(text)]
    assert not offenders, offenders


def test_a_planted_classifier_file_is_refused_unrun(tmp_path):
    from medssl.evaluate import predict
    marker = tmp_path / "ran"
    torch.save({"format": predict.FORMAT, "payload": _Planted(marker)}, tmp_path / "clf.pt")
    with pytest.raises(TrainingError, match="cannot load the classifier"):
        predict.load_model(tmp_path / "clf.pt")
    assert not marker.exists()
