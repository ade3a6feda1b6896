"""Which class is the condition: the positive class of every binary metric.

String labels get their codes alphabetically at manifest time (ingest/labels.py), so code 1 is not the
condition in general ("bleed" / "normal": code 1 is "normal"). A binary task therefore names its positive
class: `split.positive_class` (a class name or code), by default the RARER class counted in labelled patients
(then in images), never the alphabet. The ladder recodes binary labels so the positive class is code 1 in
everything it trains, scores and writes (`binary_coding`), which is the convention of evaluate/metrics.py.
"""
from __future__ import annotations

import pandas as pd

from medssl.errors import DataError


def class_names(df: pd.DataFrame, codes: pd.Series, names: dict | None) -> dict[int, str]:
    """{code: name} for every labelled code (names from the manifest's label_names, else the code itself)."""
    names = {int(k): str(v) for k, v in (names or {}).items()}
    return {int(c): names.get(int(c), str(int(c))) for c in sorted(codes.dropna().unique())}


def positive_code(df: pd.DataFrame, codes: pd.Series, names: dict[int, str], positive_class=None) -> int | None:
    """The manifest code of the positive class of a binary label (None for multi-class labels)."""
    present = sorted(names)
    if positive_class is not None:
        wanted = str(positive_class)
        match = [c for c in present if names[c] == wanted] or [c for c in present if str(c) == wanted]
        if not match:
            raise DataError(f"split.positive_class {positive_class!r} is not a class of the label "
                            f"(classes: {', '.join(f'{c} ({names[c]})' for c in present)})",
                            where="split.positive_class", fix="name one of the classes listed")
        if len(present) != 2:
            raise DataError(f"split.positive_class is for binary labels, but the label has {len(present)} classes",
                            where="split.positive_class", fix="leave it out for a multi-class label")
        return match[0]
    if len(present) != 2:
        return None
    labelled = codes.notna()
    patients = df.loc[labelled].groupby(codes[labelled].astype(int))["patient_id"].nunique()
    images = codes[labelled].astype(int).value_counts()
    key = {c: (int(patients.get(c, 0)), int(images.get(c, 0))) for c in present}
    if key[present[0]] != key[present[1]]:
        return min(present, key=lambda c: key[c])
    numeric = all(names[c] == str(c) for c in present)
    if numeric:  # integer codes 0/1 with nothing to tell them apart: 1 is the usual "has the condition"
        return present[1]
    raise DataError(f"classes {names[present[0]]!r} and {names[present[1]]!r} are equally frequent, so the "
                    f"condition cannot be told from the data", where="split.positive_class",
                    fix="name the condition: split.positive_class: <class name>")


def binary_coding(names: dict[int, str], positive: int | None) -> tuple[dict[int, int], list[str]]:
    """({manifest code: ladder code}, ladder class names). Binary: the positive class -> 1, the other -> 0;
    multi-class: codes unchanged."""
    present = sorted(names)
    if positive is None or len(present) != 2:
        return {c: c for c in present}, [names.get(c, str(c)) for c in range(max(present) + 1)]
    negative = next(c for c in present if c != positive)
    return {negative: 0, positive: 1}, [names[negative], names[positive]]
