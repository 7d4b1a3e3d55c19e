import json

import pytest

from models.errors import ConfigError
from models.uplvp.proposals.vocabulary import COCO_CLASSES, parse_vocabulary


def test_builtin_coco_has_the_80_classes():
    v = parse_vocabulary("coco")
    assert v == COCO_CLASSES and len(v) == 80 and v[0] == "person" and v[-1] == "toothbrush"


def test_comma_string_is_trimmed_and_deduplicated():
    assert parse_vocabulary(" cat, dog ,,Cat, traffic_light ") == ["cat", "dog", "traffic light"]


def test_text_file_one_name_per_line_with_comments(tmp_path):
    f = tmp_path / "v.txt"
    f.write_text("# my classes\nbolt\n\nnut  # metric\nwasher\n")
    assert parse_vocabulary(str(f)) == ["bolt", "nut", "washer"]


def test_json_list_and_coco_categories(tmp_path):
    a = tmp_path / "a.json"
    a.write_text(json.dumps(["apple", "pear"]))
    b = tmp_path / "b.json"
    b.write_text(json.dumps({"categories": [{"id": 3, "name": "kiwi"}, {"id": 9, "name": "plum"}]}))
    assert parse_vocabulary(str(a)) == ["apple", "pear"]
    assert parse_vocabulary(str(b)) == ["kiwi", "plum"]


@pytest.mark.parametrize("spec", ["", " , ,", "# nothing"])
def test_empty_vocabulary_is_an_error(spec, tmp_path):
    if spec.startswith("#"):
        f = tmp_path / "empty.txt"
        f.write_text(spec)
        spec = str(f)
    with pytest.raises(ConfigError, match="empty"):
        parse_vocabulary(spec)


def test_missing_file_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        parse_vocabulary(str(tmp_path / "nope.txt"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        parse_vocabulary(str(bad))
