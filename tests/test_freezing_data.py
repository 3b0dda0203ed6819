"""Chapter 06's classification data: job categories, held-out people, balanced and imbalanced variants."""

import pytest

from utils import data


def test_every_job_has_one_category_and_unknown_jobs_are_named():
    assert sorted(j for jobs in data.JOB_CATEGORIES.values() for j in jobs) == sorted(data.JOBS)
    with pytest.raises(ValueError, match="Unknown job 'pilot'"):
        data.job_category("pilot")


def test_splits_hold_out_people_and_labels_follow_the_people_table():
    people = {p.name: p for p in data.load_people()}
    groups = {s: {p.name for p in g} for s, g in data.split_people(data.load_people()).items()}
    for variant in data.CLASSIFICATION_VARIANTS:
        for split in data.SPLITS:
            rows = data.load_job_classification(variant, split)
            assert rows and {r["name"] for r in rows} <= groups[split]
            for r in rows:
                assert r["job"] == people[r["name"]].job and r["label"] == data.JOB_LABELS.index(
                    r["category"]
                )
                assert data.job_category(r["job"]) == r["category"]
                assert r["job"] not in r["text"] and r["name"] in r["text"]  # the job is never stated


def test_balanced_is_balanced_and_imbalanced_is_not():
    for split in data.SPLITS:
        counts = [
            sum(r["label"] == i for r in data.load_job_classification("balanced", split)) for i in range(4)
        ]
        assert len(set(counts)) == 1
        rows = data.load_job_classification("imbalanced", split)
        share = sum(r["category"] == "food" for r in rows) / len(rows)
        assert share > 0.4 and min(sum(r["label"] == i for r in rows) for i in range(4)) < 0.15 * len(rows)


def test_generator_is_deterministic():
    people = data.load_people()
    assert data.make_job_classification(people) == data.make_job_classification(people)


def test_bad_variant_or_split_names_the_valid_ones():
    with pytest.raises(ValueError, match="balanced or imbalanced"):
        data.load_job_classification("skewed")
    with pytest.raises(ValueError, match="train, validation, test"):
        data.load_job_classification("balanced", "dev")
