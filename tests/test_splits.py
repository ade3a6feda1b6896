"""Patient-level splits and nested label ladders on a manifest-shaped table (no pixels needed)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medssl.cohort.splits import (Rung, assign_splits, build_ladder, labelled_ids, pretrain_ids, read_splits,
                                write_splits)
from medssl.errors import DataError


def cohort(n_patients=80, rare=4, positive=12, unlabelled_patients=10, seed=0) -> pd.DataFrame:
    """Manifest rows: 1-3 images per patient; classes 0 (most), 1 (positive), 2 (rare, `rare` patients);
    some unlabelled patients and some unlabelled extra images of labelled patients."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients + unlabelled_patients):
        code = 2 if p < rare else 1 if p < rare + positive else 0
        for k in range(int(rng.integers(1, 4))):
            unlabelled = p >= n_patients or (k == 2)
            rows.append({"image_id": f"img-{p:04d}{k}", "patient_id": f"pat-{p:04d}",
                         "label": "" if unlabelled else str(code)})
    return pd.DataFrame(rows).sample(frac=1.0, random_state=seed).reset_index(drop=True)


def with_splits(df, seed=0, val=0.2, test=0.3):
    df = df.copy()
    df["split"] = assign_splits(df, "label", seed, val, test)
    return df


def test_no_patient_spans_two_splits_and_unlabelled_patients_get_empty():
    df = with_splits(cohort())
    assert (df.groupby("patient_id")["split"].nunique() == 1).all()
    unlabelled_patients = df.groupby("patient_id")["label"].apply(lambda s: (s == "").all())
    for patient, none_labelled in unlabelled_patients.items():
        splits = set(df.loc[df.patient_id == patient, "split"])
        assert (splits == {""}) == none_labelled


def test_stratified_by_patient_label_including_the_rare_class():
    df = with_splits(cohort(n_patients=200, positive=40, rare=4))
    per_patient = df[df.label != ""].groupby("patient_id").agg(split=("split", "first"), label=("label", "max"))
    table = pd.crosstab(per_patient["label"], per_patient["split"])
    # class 1: 40 patients -> 12 test, 8 val, 20 train exactly (rounded shares per stratum)
    assert table.loc["1"].to_dict() == {"test": 12, "train": 20, "val": 8}
    # rare class (4 patients): one in test, one in val, the rest trains
    assert table.loc["2", "test"] == 1 and table.loc["2", "val"] == 1 and table.loc["2", "train"] == 2
    overall = per_patient["split"].value_counts(normalize=True)
    assert abs(overall["test"] - 0.3) < 0.03 and abs(overall["val"] - 0.2) < 0.03


def test_deterministic_in_seed_and_independent_of_row_order():
    df = cohort()
    a = with_splits(df, seed=3).set_index("image_id")["split"]
    b = with_splits(df.sample(frac=1.0, random_state=9), seed=3).set_index("image_id")["split"]
    c = with_splits(df, seed=4).set_index("image_id")["split"]
    assert a.sort_index().equals(b.sort_index())
    assert not a.sort_index().equals(c.sort_index())


def test_pretraining_never_sees_val_or_test_patients():
    df = with_splits(cohort())
    seen = set(pretrain_ids(df))
    evaluation_patients = set(df.loc[df.split.isin(["val", "test"]), "patient_id"])
    assert not evaluation_patients & set(df.loc[df.image_id.isin(seen), "patient_id"])
    assert set(df.loc[df.split == "", "image_id"]) <= seen
    # evaluation picks labelled images only (val/test rows may be unlabelled images of those patients)
    assert all(df.set_index("image_id").loc[i, "label"] != "" for i in labelled_ids(df, "label", "test"))


@pytest.mark.parametrize("kind", ["fractions", "per_class"])
def test_ladder_nested_every_class_in_train_only(kind):
    df = with_splits(cohort(n_patients=150, positive=20, rare=5))
    budgets = {"fractions": [0.01, 0.05, 0.1, 0.25, 1.0], "per_class": [1, 5, 10, 25]}[kind]
    rungs = build_ladder(df, "label", seeds=[0, 1], **{kind: budgets})
    assert len(rungs) == 2 * len(budgets)
    labels = df.set_index("image_id")["label"]
    train_labelled = set(df.loc[(df.split == "train") & (df.label != ""), "image_id"])
    for seed in (0, 1):
        chain = [r for r in rungs if r.seed == seed]
        for small, big in zip(chain, chain[1:]):
            assert set(small.image_ids) <= set(big.image_ids) and len(small.image_ids) < len(big.image_ids)
        for rung in chain:
            assert set(rung.image_ids) <= train_labelled
            assert set(labels[list(rung.image_ids)]) == {"0", "1", "2"}, rung.name
    if kind == "fractions":
        assert set(rungs[len(budgets) - 1].image_ids) == train_labelled       # 100% = all of train
    else:
        rare_train = df.loc[(df.split == "train") & (df.label == "2"), "patient_id"].nunique()
        rung = [r for r in rungs if r.name == "per_class_5" and r.seed == 0][0]
        assert rung.counts == {0: 5, 1: 5, 2: min(5, rare_train)}           # patients, capped by availability
        patient = df.set_index("image_id")["patient_id"]
        chosen = set(patient[list(rung.image_ids)])
        assert len(chosen) == 5 + 5 + min(5, rare_train)                     # rungs count patients ...
        every_image = set(df.loc[df.patient_id.isin(chosen) & (df.label != ""), "image_id"])
        assert set(rung.image_ids) == every_image                           # ... with all their labelled images
    assert set(rungs[0].image_ids) != set(rungs[len(budgets)].image_ids)     # seeds differ


def test_rare_class_missing_from_train_is_a_clear_error():
    df = with_splits(cohort(rare=1))               # one rare patient: it trains ...
    df.loc[df.label == "2", "split"] = "test"      # ... unless moved to test: no rare image left to learn from
    with pytest.raises(DataError) as err:
        build_ladder(df, "label", per_class=[5], seeds=[0])
    assert "class 2" in str(err.value) and "per_class_5" in str(err.value)


def test_two_patient_rare_class_stays_in_train_and_test():
    df = with_splits(cohort(rare=2))
    rare_splits = set(df.loc[df.label == "2", "split"])
    assert rare_splits == {"train", "test"}


def test_write_read_roundtrip_and_changed_settings(tmp_path):
    df = with_splits(cohort())
    rungs = build_ladder(df, "label", fractions=[0.1, 1.0], seeds=[0])
    settings = {"label": "label", "seed": 0, "val_fraction": 0.2, "test_fraction": 0.3}
    path = write_splits(tmp_path / "demo.splits.json", df, rungs, settings)
    back = read_splits(path, expect=settings)
    assert back["rungs"] == rungs and isinstance(back["rungs"][0], Rung)
    assert back["rungs"][0].counts == rungs[0].counts
    assert back["splits"] == dict(zip(df.image_id, df.split))
    with pytest.raises(DataError, match="test_fraction"):
        read_splits(path, expect={**settings, "test_fraction": 0.25})


def test_non_integer_labels_and_bad_fractions_are_errors():
    df = cohort()
    df.loc[0, "label"] = "pneumonia"
    with pytest.raises(DataError, match="non-integer"):
        assign_splits(df, "label", 0, 0.2, 0.3)
    with pytest.raises(DataError, match="no training data"):
        assign_splits(cohort(), "label", 0, 0.5, 0.5)
    with pytest.raises(DataError, match="no label column"):
        assign_splits(cohort(), "diagnosis", 0, 0.2, 0.3)


def test_splits_and_rungs_do_not_depend_on_the_pseudonymisation_salt():
    """The same files and seed give the same split on every machine, whatever salt made the ids."""
    import hashlib

    from medssl.cohort.splits import assign_splits, build_ladder

    def manifest(salt: str) -> pd.DataFrame:
        rows = []
        for p in range(40):
            for k in range(2):
                path = f"pat{p:02d}/img{k}.nii.gz"
                rows.append({"image_id": "img-" + hashlib.sha256((salt + path).encode()).hexdigest()[:12],
                             "patient_id": "pat-" + hashlib.sha256((salt + str(p)).encode()).hexdigest()[:12],
                             "paths": path, "label": int(p % 5 == 0)})
        return pd.DataFrame(rows)

    views = []
    for salt in ("one salt", "another salt"):
        df = manifest(salt)
        df["split"] = assign_splits(df, "label", 0, 0.2, 0.3)
        rungs = build_ladder(df, "label", per_class=[2, 4], seeds=[0])
        by_id = dict(zip(df["image_id"], df["paths"]))
        views.append((dict(zip(df["paths"], df["split"])), [sorted(by_id[i] for i in r.image_ids) for r in rungs]))
    assert views[0] == views[1]


def test_repeats_redraw_the_test_patients_and_pretraining_sees_none_of_them():
    from medssl.cohort.splits import HELDOUT, assign_repeats, manifest_split
    df = cohort(n_patients=120, positive=20, rare=6)
    repeats = assign_repeats(df, "label", 0, 0.0, 0.25, 3)
    assert repeats[0].equals(assign_splits(df, "label", 0, 0.0, 0.25))  # repeat 0 = the plain split
    test_sets = [set(df.loc[r == "test", "patient_id"]) for r in repeats]
    assert test_sets[0] != test_sets[1] and test_sets[1] != test_sets[2]
    for r in repeats:  # each repeat is a patient-level split of its own, every class in test
        assert (df.assign(s=r).groupby("patient_id")["s"].nunique() == 1).all()
        assert set(df.loc[(r == "test") & (df.label != ""), "label"]) == {"0", "1", "2"}
    df["split"] = manifest_split(repeats)
    held_anywhere = set().union(*test_sets)
    seen = set(df.set_index("image_id").loc[pretrain_ids(df), "patient_id"])
    assert not seen & held_anywhere and (df["split"] == HELDOUT).any()
    # the rungs of repeat r come from that repeat's training patients
    rungs = build_ladder(df, "label", per_class=[3], seeds=[0], split=repeats[2], repeat=2)
    patient = df.set_index("image_id")["patient_id"]
    assert rungs[0].repeat == 2 and not set(patient[list(rungs[0].image_ids)]) & test_sets[2]


def test_positive_class_is_the_rarer_class_by_patients_never_the_alphabet():
    from medssl.cohort.classes import binary_coding, class_names, positive_code
    from medssl.cohort.splits import label_codes
    rows = [{"image_id": f"i{p}-{k}", "patient_id": f"p{p}", "label": int(p >= 3)}
            for p in range(20) for k in range(1 if p >= 3 else 4)]  # 3 'bleed' patients (12 images), 17 'normal'
    df = pd.DataFrame(rows)
    names = {0: "bleed", 1: "normal"}  # as ingest codes names: alphabetically, so code 1 is the healthy class
    codes = label_codes(df, "label")
    assert positive_code(df, codes, class_names(df, codes, names)) == 0       # rarer in patients (not images)
    assert positive_code(df, codes, names, "normal") == 1                     # named by the user
    assert positive_code(df, codes, names, 0) == 0                            # or by its code
    assert binary_coding(names, 0) == ({1: 0, 0: 1}, ["normal", "bleed"])     # the condition becomes code 1
    with pytest.raises(DataError, match="not a class of the label.*bleed"):
        positive_code(df, codes, names, "tumour")
    balanced = df[df.patient_id.isin(["p0", "p1", "p3", "p4"])].groupby("patient_id").head(1)
    codes = label_codes(balanced, "label")
    with pytest.raises(DataError, match="equally frequent"):
        positive_code(balanced, codes, names)
    assert positive_code(balanced, codes, {0: "0", 1: "1"}) == 1              # plain 0/1 codes: 1, as usual


def test_splits_file_keeps_repeats_and_classes(tmp_path):
    from medssl.cohort.splits import assign_repeats
    df = cohort()
    repeats = assign_repeats(df, "label", 0, 0.2, 0.3, 2)
    df["split"] = repeats[0]
    rungs = [r for i, s in enumerate(repeats) for r in build_ladder(df, "label", per_class=[2], seeds=[0],
                                                                    split=s, repeat=i)]
    path = write_splits(tmp_path / "x.splits.json", df, rungs, {"a": 1}, repeats=repeats,
                        classes={"names": {0: "a", 1: "b", 2: "c"}, "positive": None})
    back = read_splits(path)
    assert back["rungs"] == rungs and [r.repeat for r in back["rungs"]] == [0, 1]
    assert back["repeats"][1] == dict(zip(df.image_id, repeats[1])) and back["classes"]["names"][2] == "c"
