"""M4oE's analyses: Soft MoE dispatch mass, modality utilisation against plain loops, the
removed-modality evaluation, per-task extraction of an m4oe model, and (slow) the commands
end to end on a GAMMA replica: eval --drop-modality, usage, prune, flops and the study report."""

import copy
import json

import pandas as pd
import pytest
import torch
import yaml

from moekit import config
from moekit.analysis.extraction import experts_to_keep, prune_model
from moekit.analysis.modality import ModalityUsage
from moekit.analysis.usage import collect_usage
from moekit.cli import main
from moekit.data.replicas.gamma import make_gamma_replica
from moekit.engine.eval_run import check_dropped, without_modalities
from moekit.errors import ConfigError
from moekit.losses.aux_mutual_information import ConditionalMutualInformationLoss
from moekit.moe import SoftMoE
from moekit.registry import MODELS, import_builtins
from moekit.routing.types import Routing, RoutingRecord
from moekit.types import Batch, run_model, tasks_from_config

import_builtins()
TASKS = tasks_from_config(
    {
        "tasks": {
            "grade": {"kind": "multiclass", "num_classes": 3},
            "disc": {"kind": "segmentation", "num_classes": 1},
        }
    }
)
PRESENT = torch.tensor([[True, True], [True, False], [False, True], [True, True]])


def tiny_m4oe(seed=0):
    torch.manual_seed(seed)
    cfg = copy.deepcopy(config.load("configs/m4oe/_tiny_model.yaml")["model"])
    return MODELS.build(cfg, tasks=TASKS).eval()


def batch(seed=1, present=PRESENT):
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "fundus": torch.randn(len(present), 3, 64, 64, generator=g),
        "oct": torch.randn(len(present), 4, 32, 32, generator=g),
    }
    return Batch(inputs, {}, {}, {"id": [f"{i:04d}" for i in range(len(present))]}, present)


def test_soft_moe_dispatch_mass_is_the_slots_weight_on_each_token():
    """dispatch_mass[r, i] = Σ_j softmax over the row's valid tokens of L[r, :, j] at i
    (L = X Φ_t, unnormalised), 0 on masked tokens; each row sums to its slot count."""
    torch.manual_seed(0)
    layer = SoftMoE(8, 16, num_experts=3, slots_per_expert=2, num_tasks=2, normalize=False)
    x = torch.randn(4, 5, 8)
    task_ids = torch.tensor([0, 1, 1, 0])
    valid = torch.rand(4, 5) > 0.3
    valid[:, 0] = True
    _, record = layer(x, task_ids, valid=valid)
    mass = record.dispatch_mass.detach().view(4, 5)
    for r in range(4):
        phi = layer.router.gate.weight[int(task_ids[r])]
        tokens = [i for i in range(5) if valid[r, i]]
        expected = torch.zeros(5)
        for j in range(6):
            logits = torch.stack([x[r, i] @ phi[:, j] for i in tokens])
            expected[tokens] += torch.softmax(logits, 0)
        torch.testing.assert_close(mass[r], expected, rtol=1e-5, atol=1e-6)
        assert float(mass[r].sum()) == pytest.approx(6.0, abs=1e-5)


def _record(layer, g, rows=6, length=5, experts=4, dispatch=True):
    logits = torch.randn(rows * length, experts, generator=g)
    probs = logits.softmax(-1)
    routing = Routing(probs, logits, torch.arange(experts).expand(rows * length, -1), probs)
    return RoutingRecord(
        layer,
        routing,
        task_ids=torch.arange(2).repeat_interleave(rows // 2 * length),
        modality_ids=torch.tensor([0, 0, 1, 1, 1]).repeat(rows),
        valid=torch.rand(rows * length, generator=g) > 0.2,
        dispatch_mass=torch.rand(rows * length, generator=g) * 2 if dispatch else None,
    )


@pytest.mark.parametrize("dispatch", [True, False])
def test_modality_utilisation_matches_a_plain_loop(dispatch):
    """share[t, m] = Σ mass over valid tokens of (t, m) / Σ over valid tokens of t, where mass
    is the dispatch mass (Soft MoE) or the summed routing weight; the measured I(M;E|T) is the
    loss's value on the same tokens."""
    g = torch.Generator().manual_seed(3)
    records = [_record("mtoe", g, dispatch=dispatch) for _ in range(3)]
    usage = ModalityUsage(["a", "b"], ["fundus", "oct"])
    for record in records:
        usage.update([record])
    totals = {}
    for record in records:
        for x in range(record.task_ids.numel()):
            if not record.valid[x]:
                continue
            mass = (
                float(record.dispatch_mass[x])
                if dispatch
                else float(record.routing.weight[x].sum())
            )
            key = (int(record.task_ids[x]), int(record.modality_ids[x]))
            totals[key] = totals.get(key, 0.0) + mass
    frame = usage.to_frame()
    for (t, m), value in totals.items():
        row = frame[(frame.task == "ab"[t]) & (frame.modality == ["fundus", "oct"][m])]
        expected = value / (totals[(t, 0)] + totals[(t, 1)])
        assert float(row.share.iloc[0]) == pytest.approx(expected)
    measured = usage.information_frame().conditional_mutual_information.iloc[0]
    merged = RoutingRecord(
        "mtoe",
        Routing(
            *(
                torch.cat([getattr(r.routing, f) for r in records])
                for f in ("probs", "logits", "index", "weight")
            )
        ),
        torch.cat([r.task_ids for r in records]),
        torch.cat([r.modality_ids for r in records]),
        torch.cat([r.valid for r in records]),
    )
    loss = ConditionalMutualInformationLoss(num_modalities=2, num_tasks=2, reduce=None)
    assert measured == pytest.approx(-float(loss([merged])), abs=1e-5)


def test_collect_usage_counts_the_modalities_of_the_mtoe_only():
    model = tiny_m4oe()
    usage = collect_usage(model, [batch(1), batch(2)], list(TASKS))
    assert usage.modality.modalities == ["fundus", "oct"]
    frame = usage.modality.to_frame()
    assert set(frame.layer) == {"mtoe.0.mlp"}  # the MSoE layers see one modality each
    shares = frame.groupby("task").share.sum()
    assert shares.to_numpy() == pytest.approx([1.0, 1.0])
    tokens = frame.set_index(["task", "modality"]).tokens
    # 2 batches x 3 samples with a fundus x 4 tokens (2x2 map); 3 with OCT x 4 B-scans
    assert tokens["grade", "fundus"] == 24 and tokens["grade", "oct"] == 24


def test_without_modalities_marks_them_absent_with_a_zero_filler():
    model = tiny_m4oe()
    full = batch()
    dropped = without_modalities(full, ["oct"])
    assert not dropped.present[:, 1].any() and torch.equal(dropped.present[:, 0], PRESENT[:, 0])
    assert (dropped.inputs["oct"] == 0).all()
    assert torch.equal(dropped.inputs["fundus"], full.inputs["fundus"])
    absent = torch.stack([PRESENT[:, 0], torch.zeros(4, dtype=torch.bool)], 1)
    expected = model(full.inputs, present=absent).preds
    got = run_model(model, dropped).preds
    for task in expected:
        assert torch.equal(got[task], expected[task])
    assert without_modalities(full, []) is full


def test_dropping_every_modality_a_model_reads_is_a_one_line_error():
    class Data:
        modalities = ("fundus", "oct")

    fundus_only = type("Model", (), {"modality_names": ["fundus"]})()
    check_dropped(Data(), fundus_only, ["oct"])
    with pytest.raises(ConfigError, match="reads only fundus; without fundus it has no input"):
        check_dropped(Data(), fundus_only, ["fundus"])
    with pytest.raises(ConfigError, match=r"'octt' is not a modality.*did you mean 'oct'"):
        check_dropped(Data(), fundus_only, ["octt"])


def test_extraction_at_theta_zero_reproduces_the_task_and_keep_top_ranks_by_weight():
    """Soft MoE uses every expert for every token: θ = 0 keeps them all and the extracted
    model's outputs equal the full model's; keep-top keeps the experts with the largest
    summed combine mass."""
    model = tiny_m4oe()
    data = [batch(1), batch(2)]
    usage = collect_usage(model, data, list(TASKS))
    for task in TASKS:
        pruned, specs = prune_model(model, usage, task, threshold=0.0)
        assert all(len(spec["experts"]) == 4 for name, spec in specs.items() if "mtoe" in name)
        for b in data:
            mask = {t: torch.full((4,), t == task) for t in TASKS}
            full = run_model(model, b, mask).preds[task]
            torch.testing.assert_close(run_model(pruned, b).preds[task], full)
    layer = usage.layers["mtoe.0.mlp"]
    weight = layer.weight[0]
    kept = experts_to_keep(layer.count[0], [0, 1, 2, 3], keep_top=0.5, weight=weight)
    assert kept == sorted(torch.argsort(weight, descending=True)[:2].tolist())
    assert layer.count[0].unique().numel() == 1  # every expert counted for every token


@pytest.fixture(scope="module")
def gamma_runs(tmp_path_factory):
    """A micro GAMMA replica and two one-epoch runs of the CPU configs: M4oE and the
    fundus-only baseline, as a study directory."""
    tmp = tmp_path_factory.mktemp("m4oe_study")
    root = make_gamma_replica(
        tmp / "replica", n_train=16, n_test=8, num_bscans=8, fundus_size=(64, 64),
        oct_size=(32, 64), seed=3,
    )  # fmt: skip
    study = tmp / "study"
    sets = [f"data.{s}.root={root}" for s in ("train", "val", "test")]
    sets += ["train.epochs=1", "data.batch_size=8", "train.curves=false"]
    runs = {}
    for variant, base, extra in (
        ("m4oe", "configs/m4oe/gamma.yaml", []),
        ("fundus_only", "configs/m4oe/gamma_fundus_only.yaml", ["model.modalities.oct=null"]),
    ):
        path = tmp / f"{variant}.yaml"
        cfg = config.load_stack([base, "configs/m4oe/_cpu.yaml"], [*sets, *extra])
        path.write_text(yaml.safe_dump(cfg))
        run = study / variant / "seed-0"
        assert main(["train", str(path), "--run-dir", str(run)]) == 0
        runs[variant] = run
    return root, study, runs


@pytest.mark.slow
def test_eval_drop_modality_end_to_end(gamma_runs, capsys):
    _, _, runs = gamma_runs
    capsys.readouterr()
    assert main(["eval", str(runs["m4oe"]), "--drop-modality", "oct"]) == 0
    text = capsys.readouterr().out
    assert "without oct (test):" in text and "grade/kappa" in text
    saved = json.loads((runs["m4oe"] / "eval" / "test-best-without-oct.json").read_text())
    assert saved["dropped_modalities"] == ["oct"] and "test/grade/kappa" in saved["metrics"]
    assert main(["eval", str(runs["fundus_only"]), "--drop-modality", "oct"]) == 0
    assert "+0.0000" in capsys.readouterr().out  # the model never reads the OCT
    assert main(["eval", str(runs["fundus_only"]), "--drop-modality", "fundus"]) == 2
    assert "has no input left" in capsys.readouterr().err


@pytest.mark.slow
def test_usage_prune_and_flops_of_an_m4oe_run(gamma_runs, capsys, tmp_path):
    _, _, runs = gamma_runs
    run = runs["m4oe"]
    assert main(["usage", str(run), "--split", "test"]) == 0
    assert "modality utilisation" in capsys.readouterr().out
    frame = pd.read_csv(run / "usage" / "modality.csv")
    assert set(frame.layer) == {"mtoe.0.mlp"} and set(frame.task) == {"grade", "disc", "cup"}
    assert (run / "usage" / "modality_utilisation.png").stat().st_size > 0
    out = tmp_path / "grade"
    assert main(["prune", str(run), "--task", "grade", "--threshold", "0", "--out", str(out),
                 "--json"]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert report["max_abs_diff"] == 0.0
    assert main(["flops", str(run), "--split", "test", "--batch", "2", "--check", "--json"]) == 0
    flops = json.loads(capsys.readouterr().out)
    assert flops["matmul_flops"] == flops["reference_matmul_flops"] > 0
    assert "present" in flops


@pytest.mark.slow
def test_study_report_draws_competition_and_utilisation(gamma_runs):
    from moekit.projects.m4oe.analysis import PAPER_SOURCE
    from moekit.projects.m4oe.analysis import main as analysis_main

    _, study, _ = gamma_runs
    assert analysis_main([str(study)]) == 0
    out = study / "m4oe_analysis"
    drops = pd.read_csv(out / "competition.csv")
    assert set(drops.model) == {"m4oe", "fundus_only"}
    fundus_only = drops[(drops.model == "fundus_only") & (drops.dropped == "fundus")]
    assert fundus_only["without"].isna().all()  # no input left
    oct_dropped = drops[(drops.model == "fundus_only") & (drops.dropped == "oct")]
    assert (oct_dropped["drop"] == 0).all()
    m4oe = drops[drops.model == "m4oe"]
    assert (m4oe["drop"] == m4oe["all"] - m4oe["without"]).all()
    by_patient = pd.read_csv(out / "utilisation_by_patient.csv")
    assert set(by_patient.group) <= {"both informative", "fundus uninformative",
                                     "OCT uninformative"}  # fmt: skip
    text = (out / "analysis.md").read_text()
    assert PAPER_SOURCE in text and "71.8" in text
    for figure in ("competition.png", "utilisation.png", "utilisation_by_patient.png"):
        assert (out / "figures" / figure).stat().st_size > 0
