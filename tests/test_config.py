from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moekit import config
from moekit.errors import ConfigError

# Trees in which a key is always a mapping ("a", "b", "c") or always a leaf ("x", "y", "z"):
# the shape on which deep merge is associative.
leaves = st.one_of(
    st.integers(-5, 5),
    st.floats(allow_nan=False, width=32),
    st.text(max_size=4),
    st.sampled_from(["1e3", "3e-4", ".inf", "-1.5", "1_000", "0x1F", "yes", "null"]),
    st.booleans(),
    st.none(),
    st.lists(st.integers(0, 3), max_size=3),
)
trees = st.recursive(
    st.dictionaries(st.sampled_from("xyz"), leaves, max_size=3),
    lambda children: st.builds(
        lambda leaf, nested: {**leaf, **nested},
        st.dictionaries(st.sampled_from("xyz"), leaves, max_size=3),
        st.dictionaries(st.sampled_from("abc"), children, max_size=3),
    ),
    max_leaves=12,
)


@given(trees, trees, trees)
def test_deep_merge_is_associative(a, b, c):
    left = config.deep_merge(config.deep_merge(a, b), c)
    right = config.deep_merge(a, config.deep_merge(b, c))
    assert left == right


@given(trees)
def test_empty_mapping_is_the_identity(a):
    assert config.deep_merge(a, {}) == a
    assert config.deep_merge({}, a) == a


@given(trees, trees)
def test_merge_keeps_every_key_and_override_wins_on_leaves(a, b):
    merged = config.deep_merge(a, b)
    assert set(merged) == set(a) | set(b)
    for key, value in b.items():
        if not isinstance(value, dict):
            assert merged[key] == value


def test_merge_does_not_modify_inputs():
    a, b = {"m": {"x": 1}}, {"m": {"y": 2}}
    config.deep_merge(a, b)
    assert a == {"m": {"x": 1}} and b == {"m": {"y": 2}}


def test_replace_marker_replaces_instead_of_merging():
    base = {"router": {"type": "top_p", "p": 0.8}}
    child = {"router": {"_replace_": True, "type": "topk", "k": 2}}
    assert config.deep_merge(base, child) == {"router": {"type": "topk", "k": 2}}


keys = st.lists(st.sampled_from(["train", "model", "lr", "epochs", "p"]), min_size=1, max_size=3)


@given(trees, keys, leaves)
def test_added_override_then_read_returns_the_value(cfg, path, value):
    key = ".".join(path)
    try:
        updated = config.apply_overrides(cfg, [f"+{key}={config.dump_value(value)}"])
    except ConfigError:
        return  # a prefix of the path is a leaf: refusing is the right answer
    assert config.get(updated, key) == value


@given(trees, leaves, st.data())
def test_override_of_an_existing_key_then_read_returns_the_value(cfg, value, data):
    existing = config.flat_keys(cfg)
    if not existing:
        return
    key = data.draw(st.sampled_from(existing))
    updated = config.apply_overrides(cfg, [f"{key}={config.dump_value(value)}"])
    assert config.get(updated, key) == value
    others = [k for k in existing if not k.startswith(key) and not key.startswith(k)]
    for other in others:
        assert config.get(updated, other) == config.get(cfg, other), "other keys are unchanged"


@given(trees)
def test_saved_config_round_trips(tmp_path_factory, cfg):
    path = tmp_path_factory.mktemp("cfg") / "config.yaml"
    config.save(cfg, path)
    assert config.load(path) == cfg


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_base_inheritance_relative_to_file_and_in_order(tmp_path):
    write(
        tmp_path / "bases/a.yaml", "model: {type: vit, depth: 12, dim: 384}\ntrain: {epochs: 10}\n"
    )
    write(tmp_path / "bases/b.yaml", "_base_: a.yaml\nmodel: {depth: 6}\n")
    write(tmp_path / "c.yaml", "model: {dim: 192}\n")
    top = write(
        tmp_path / "exp/top.yaml", "_base_: [../bases/b.yaml, ../c.yaml]\ntrain: {epochs: 3}\n"
    )
    cfg = config.load(top)
    assert cfg == {"model": {"type": "vit", "depth": 6, "dim": 192}, "train": {"epochs": 3}}


def test_base_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="_base_ cycle"):
        config.load(tmp_path / "a.yaml")


def test_missing_base_is_an_error_naming_both_files(tmp_path):
    top = write(tmp_path / "top.yaml", "_base_: nothere.yaml\n")
    with pytest.raises(ConfigError) as err:
        config.load(top)
    assert "top.yaml" in str(err.value) and "nothere.yaml" in str(err.value)


def test_missing_file_and_bad_yaml_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "nope.yaml")
    bad = write(tmp_path / "bad.yaml", "model: {type: vit\n  depth: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+ invalid YAML"):
        config.load(bad)
    with pytest.raises(ConfigError, match="mapping at top level"):
        config.load(write(tmp_path / "list.yaml", "- 1\n- 2\n"))


def test_overrides_parse_values_as_yaml(tmp_path):
    path = write(tmp_path / "c.yaml", "train: {epochs: 10, lr: 0.1}\nmodel: {router: {p: 0.4}}\n")
    cfg = config.load(path, ["train.epochs=3", "model.router.p=0.5", "train.lr=null"])
    assert cfg["train"] == {"epochs": 3, "lr": None}
    assert cfg["model"]["router"]["p"] == 0.5
    cfg = config.load(path, ["+train.milestones=[1, 2]", "+data.root=/x"])
    assert cfg["train"]["milestones"] == [1, 2] and cfg["data"] == {"root": "/x"}


def test_override_of_unknown_key_names_closest_keys(tmp_path):
    path = write(tmp_path / "c.yaml", "train: {epochs: 10}\n")
    with pytest.raises(ConfigError) as err:
        config.load(path, ["train.epoch=3"])
    msg = str(err.value)
    assert "no such key" in msg and "train.epochs" in msg and "+train.epoch=" in msg


def test_override_into_a_leaf_and_malformed_override_are_errors():
    with pytest.raises(ConfigError, match="is a value, not a mapping"):
        config.apply_overrides({"train": 3}, ["+train.epochs=1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        config.apply_overrides({}, ["train.epochs"])


def test_override_list_element():
    cfg = config.apply_overrides({"stages": [{"lr": 1}, {"lr": 2}]}, ["stages.1.lr=5"])
    assert cfg["stages"][1]["lr"] == 5


def test_get_missing_key_raises_or_returns_default():
    assert config.get({"a": {"b": 1}}, "a.b") == 1
    assert config.get({"a": {}}, "a.c", None) is None
    with pytest.raises(ConfigError, match=r"did you mean 'a\.b'"):
        config.get({"a": {"b": 1}}, "a.bb")


def test_exponent_floats_without_a_dot_are_floats(tmp_path):
    path = write(tmp_path / "c.yaml", "lr: 3e-4\nwd: 1.0e-4\nname: 1e3x\n")
    cfg = config.load(path, ["+eps=1e-8"])
    assert cfg == {"lr": 3e-4, "wd": 1e-4, "name": "1e3x", "eps": 1e-8}


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize(
    "path",
    sorted(
        p
        for p in CONFIGS.rglob("*.yaml")
        if not p.name.startswith("_") and p.parent.name != "tasks"
    ),
    ids=lambda p: str(p.relative_to(CONFIGS)),
)
def test_every_shipped_config_resolves_and_names_registered_types(path):
    from moekit.engine.config_check import check_config

    check_config(config.load(path), source=str(path))
