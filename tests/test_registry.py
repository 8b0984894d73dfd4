import pytest

from moekit.errors import RegistryError
from moekit.registry import REGISTRIES, Registry, accepted_kwargs, import_builtins


def make_registry() -> Registry:
    reg = Registry("ROUTERS")

    @reg.register("top_p")
    class TopP:
        """Dynamic top-p routing."""

        def __init__(self, dim: int, p: float = 0.4, *, min_k: int = 1) -> None:
            self.dim, self.p, self.min_k = dim, p, min_k

    @reg.register
    def topk(dim: int, k: int = 2) -> tuple[int, int]:
        return dim, k

    @reg.register("anything")
    def anything(**kwargs):
        return kwargs

    return reg


def test_build_uses_config_then_defaults():
    reg = make_registry()
    obj = reg.build({"type": "top_p", "p": 0.8}, dim=16)
    assert (obj.dim, obj.p, obj.min_k) == (16, 0.8, 1)
    # the config wins over defaults
    assert reg.build({"type": "topk", "dim": 3}, dim=16) == (3, 2)
    assert reg.build("topk", dim=5) == (5, 2)


def test_register_uses_function_name_without_explicit_name():
    assert "topk" in make_registry().names()


def test_unknown_name_lists_valid_names_and_suggests():
    reg = make_registry()
    with pytest.raises(RegistryError) as err:
        reg.build({"type": "top-p", "dim": 3})
    msg = str(err.value)
    assert "unknown type 'top-p'" in msg
    assert "valid: anything, top_p, topk" in msg
    assert "did you mean 'top_p'" in msg
    assert "\n" not in msg


def test_unknown_kwarg_names_kwarg_type_and_accepted():
    reg = make_registry()
    with pytest.raises(RegistryError) as err:
        reg.build({"type": "top_p", "dim": 3, "min_kk": 2})
    msg = str(err.value)
    assert "ROUTERS 'top_p' does not accept 'min_kk'" in msg
    assert "did you mean 'min_k'" in msg
    assert "accepted: dim, p, min_k" in msg


def test_var_kwargs_accept_anything():
    assert make_registry().build({"type": "anything", "x": 1}) == {"x": 1}


def test_missing_type_key_is_an_error():
    with pytest.raises(RegistryError, match="no 'type' key"):
        make_registry().build({"dim": 3})


def test_non_mapping_config_is_an_error():
    with pytest.raises(RegistryError, match="expected a mapping"):
        make_registry().build(["top_p"])


def test_duplicate_registration_names_both_definitions():
    reg = make_registry()

    def other_top_p():
        return None

    with pytest.raises(RegistryError) as err:
        reg.register("top_p")(other_top_p)
    msg = str(err.value)
    assert "'top_p' is registered twice" in msg
    assert "TopP" in msg and "other_top_p" in msg


def test_reregistering_the_same_object_is_allowed():
    reg = make_registry()
    entry = reg.get("topk")
    assert reg.register("topk")(entry) is entry


def test_accepted_kwargs_skips_self_and_reports_var_kw():
    class A:
        def __init__(self, a, *args, b=1, **kw):
            pass

    assert accepted_kwargs(A) == (["a", "b"], True)


def test_builtin_registries_exist_and_import():
    import_builtins()
    assert set(REGISTRIES) == {
        "ROUTERS",
        "EXPERTS",
        "MOE_LAYERS",
        "BACKBONES",
        "HEADS",
        "MODELS",
        "TASK_LOSSES",
        "AUX_LOSSES",
        "WEIGHTINGS",
        "DATASETS",
        "METRICS",
        "TRANSFORMS",
        "OPTIMIZERS",
        "LR_SCHEDULERS",
        "SAMPLERS",
        "PREPROCESS",
    }
