import pytest

from labscale.config import load_experiment, parse_experiment
from labscale.errors import ConfigError

BASE = {"name": "x", "models": ["embedded:smollm2-135m-instruct"], "tasks": ["fact-check"]}


def test_short_and_long_model_forms_agree():
    a = parse_experiment(BASE)
    b = parse_experiment({**BASE, "models": [{"id": "embedded:smollm2-135m-instruct"}]})
    assert a.models == b.models and a.config_hash() == b.config_hash()
    assert a.settings == ["zero-shot"] and a.generation.max_new_tokens == 64


def test_config_hash_changes_with_content():
    assert parse_experiment(BASE).config_hash() != parse_experiment({**BASE, "seed": 1}).config_hash()


@pytest.mark.parametrize(
    "patch, match",
    [
        ({"limit": 0}, "at 'limit'"),
        ({"models": []}, "at 'models'"),
        ({"modles": ["x"]}, "unknown key 'modles' — did you mean 'models'"),
        ({"name": "has space"}, "at 'name'"),
        ({"models": ["a", "a"]}, "model listed twice: a"),
        ({"generation": {"max_new_tokens": "many"}}, "generation.max_new_tokens"),
        ({"tasks": [{"name": "t", "data": "x.csv"}]}, "tasks"),
    ],
)
def test_bad_config_is_one_line(patch, match):
    with pytest.raises(ConfigError, match=match) as e:
        parse_experiment({**BASE, **patch})
    assert "\n" not in str(e.value)


def test_malformed_yaml_names_the_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("name: x\nmodels: [a, b\ntasks: [c]\n")
    with pytest.raises(ConfigError, match=r"malformed YAML in .*bad.yaml' at line \d+"):
        load_experiment(f)


def test_not_a_mapping_and_missing_file(tmp_path):
    f = tmp_path / "list.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_experiment(f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_experiment(tmp_path / "nope.yaml")


def test_quickstart_example_parses():
    exp = load_experiment("examples/quickstart.yaml")
    assert exp.limit == 20 and exp.settings == ["zero-shot", "few-shot:3"]


def test_new_model_fields_leave_old_config_hashes_alone():
    before = parse_experiment(BASE).config_hash()
    for extra in ({"device_map": "auto"}, {"id": "llamacpp:x.gguf", "server": {"parallel": 2}}):
        spec = {"id": "embedded:smollm2-135m-instruct", **extra}
        assert parse_experiment({**BASE, "models": [spec]}).config_hash() != before
    unset = parse_experiment({**BASE, "models": [{"id": "embedded:smollm2-135m-instruct"}]})
    assert unset.config_hash() == before
