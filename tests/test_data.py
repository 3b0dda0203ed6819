import json

import pytest

from utils import data


def test_generator_is_deterministic_and_matches_shipped_files(tmp_path):
    counts = data.write_all(tmp_path)
    for name in counts:
        assert (tmp_path / name).read_bytes() == (data.DATA_DIR / name).read_bytes(), f"{name} is stale"


def test_people_are_unique_and_split_disjointly():
    people = data.load_people()
    assert len(people) == data.N_PEOPLE == len({p.name for p in people})
    groups = data.split_people(people)
    names = [{p.name for p in g} for g in groups.values()]
    assert sum(len(n) for n in names) == len(set().union(*names)) == data.N_PEOPLE


def test_every_fact_is_stated_in_several_phrasings():
    corpus = "\n".join(data.load_corpus("train"))
    person = data.load_people()[0]
    for attribute, templates in data.CORPUS_TEMPLATES.items():
        used = [t for t in templates if t.format(name=person.name, value=person.value(attribute)) in corpus]
        assert len(used) >= 2, (attribute, used)


def test_heldout_phrasings_never_occur_in_the_corpus():
    corpus = "\n".join(data.load_corpus("train"))
    for templates in data.HELDOUT_TEMPLATES.values():
        for template in templates:
            before, after = template.split("{name}")
            stem = (
                after.split("{value}")[0].strip()
                if len(after.split("{value}")[0].strip()) > 3
                else before.strip()
            )
            assert stem and stem not in corpus, stem


def test_splits_share_no_prompt_and_test_people_never_appear_in_training():
    prompts = {}
    for split in data.SPLITS:
        rows = data.load_instructions(split)
        prompts[split] = {r["messages"][0]["content"] for r in rows}
        assert len(rows) > 0
    assert not prompts["train"] & prompts["test"]
    assert not prompts["train"] & prompts["validation"]
    assert not prompts["validation"] & prompts["test"]
    train_text = "\n".join(prompts["train"])
    for person in data.split_people(data.load_people())["test"]:
        assert person.name not in train_text


def test_instruction_rows_have_the_conversational_format():
    ds = data.load_instructions("test")
    assert ds.column_names == ["messages", "task"] or set(ds.column_names) == {"messages", "task"}
    row = ds[0]
    assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
    assert row["messages"][1]["content"].strip()
    assert 400 <= len(ds) <= 600


def test_answers_are_correct_for_sums_and_lists():
    for row in data.load_instructions("validation"):
        q, a = row["messages"][0]["content"], row["messages"][1]["content"]
        if row["task"] == "sum":
            nums = [int(t.strip("?.+")) for t in q.split() if t.strip("?.+").isdigit()]
            assert int(a) == sum(nums), q
        elif row["task"] == "count_words":
            assert int(a) == len(q.split(":")[1].strip(" ?").split()), q


def test_unknown_split_names_the_valid_ones():
    with pytest.raises(ValueError, match="train, validation, test"):
        data.load_instructions("tset")


def test_fact_answers_agree_with_the_people_table():
    people = {p.name: p for p in data.load_people()}
    for line in (data.DATA_DIR / "facts_heldout.jsonl").read_text().splitlines():
        fact = json.loads(line)
        assert people[fact["name"]].value(fact["attribute"]) == fact["answer"]
