"""The shipped M4oE configs and the ablation study: every config checks against a GAMMA (or
mammography) replica, the CPU fragment sizes every variant, the study resolves its runs."""

import pytest
import yaml

from moekit import config
from moekit.cli import main
from moekit.data.replicas.gamma import make_gamma_replica
from moekit.data.replicas.mammography import make_mammography_replica

MODELS = {
    "gamma": "m4oe",
    "gamma_late_fusion": "late_fusion",
    "gamma_mmoe": "mmoe_fusion",
    "gamma_fundus_only": "late_fusion",
    "gamma_oct_only": "late_fusion",
    "gamma_no_msoe": "m4oe",
    "gamma_no_mtoe": "m4oe",
    "gamma_no_mi": "m4oe",
    "gamma_topk": "m4oe",
}


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    return make_gamma_replica(
        tmp_path_factory.mktemp("gamma") / "replica", n_train=10, n_test=4, num_bscans=8,
        fundus_size=(64, 64), oct_size=(32, 64), seed=1,
    )  # fmt: skip


def test_paper_scale_configs_differ_only_where_they_should():
    m4oe = config.load("configs/m4oe/gamma.yaml")
    assert m4oe["model"]["dim"] == 384 and m4oe["data"]["train"]["num_bscans"] == 32
    assert m4oe["aux_losses"][0]["type"] == "conditional_mutual_information"
    for name, kind in MODELS.items():
        cfg = config.load(f"configs/m4oe/{name}.yaml")
        assert cfg["model"]["type"] == kind, name
        assert cfg["model"]["modalities"]["fundus" if name != "gamma_oct_only" else "oct"]
    assert config.load("configs/m4oe/gamma_no_msoe.yaml")["model"]["msoe"]["depth"] == 0
    no_mtoe = config.load("configs/m4oe/gamma_no_mtoe.yaml")
    assert no_mtoe["model"]["mtoe"]["moe"] is None and no_mtoe["aux_losses"] == []
    assert config.load("configs/m4oe/gamma_no_mi.yaml")["aux_losses"] == []
    topk = config.load("configs/m4oe/gamma_topk.yaml")["model"]
    for part in ("msoe", "mtoe", "fusion"):
        assert topk[part]["moe"]["router"] == {"type": "topk", "k": 2}
        assert "slots_per_expert" not in topk[part]["moe"]
    oct_only = config.load("configs/m4oe/gamma_oct_only.yaml")
    assert list(oct_only["tasks"]) == ["grade"] and oct_only["model"]["heads"] == {}
    assert config.load("configs/m4oe/tiny_gamma.yaml") == {
        **config.load_stack(["configs/m4oe/gamma.yaml", "configs/m4oe/_cpu.yaml"]),
        "name": "m4oe_tiny_gamma",
    }


@pytest.mark.parametrize("name", list(MODELS))
def test_every_gamma_config_checks_at_cpu_size(name, replica, tmp_path, capsys):
    sets = [f"data.{s}.root={replica}" for s in ("train", "val", "test")]
    if name == "gamma_fundus_only":
        sets.append("model.modalities.oct=null")
    cfg = config.load_stack([f"configs/m4oe/{name}.yaml", "configs/m4oe/_cpu.yaml"], sets)
    assert cfg["model"]["dim"] == 48 and cfg["train"]["num_threads"] == 1
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["config", "check", str(path)]) == 0
    assert "ok" in capsys.readouterr().out


def test_mammography_config_checks_on_the_replica(tmp_path, capsys):
    root = make_mammography_replica(tmp_path / "mammo", n_cases=24, size=(48, 64))
    sets = [f"data.{s}.csv={root / 'cases.csv'}" for s in ("train", "val", "test")]
    sets += [f"data.{s}.image_size=[64,48]" for s in ("train", "val", "test")]
    assert main(["config", "check", "configs/m4oe/mammography.yaml", "--set", *sets]) == 0
    cfg = config.load("configs/m4oe/mammography.yaml")
    assert list(cfg["model"]["modalities"]) == ["L_CC", "L_MLO", "R_CC", "R_MLO"]


def test_the_ablation_study_resolves_every_variant_and_seed(capsys):
    assert main(["sweep", "experiments/m4oe_ablation.yaml", "--profile", "cpu", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "27 runs" in out
    for variant in ("fundus_only", "oct_only", "late_fusion", "mmoe", "m4oe", "no_msoe",
                    "no_mtoe", "no_mi", "topk"):  # fmt: skip
        assert all(f"{variant} seed {s} " in out for s in range(3)), variant
    fundus_line = next(line for line in out.splitlines() if line.startswith("- fundus_only"))
    assert "_cpu.yaml" in fundus_line and "model.modalities.oct=null" in fundus_line
