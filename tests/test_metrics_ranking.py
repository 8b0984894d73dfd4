"""ROC-AUC, average precision, multi-label per-class scores, threshold tuning and the ODIR-2019
challenge score, each against a plain-loop reference."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import moekit.projects  # noqa: F401  (registers odir_score)
from moekit.engine.evaluation import MetricTracker
from moekit.errors import ConfigError
from moekit.metrics.ranking import average_precision, average_ranks, roc_auc
from moekit.metrics.thresholds import tune_thresholds
from moekit.projects.odir.challenge_score import odir_challenge_score
from moekit.registry import METRICS
from moekit.types import Batch, Task


def build(name, num_classes, **kwargs):
    return METRICS.build({"type": name, **kwargs}, num_classes=num_classes)


# ----------------------------------------------------------------- plain-loop references
def loop_auc(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return math.nan
    wins = 0.0
    for a in pos:
        for b in neg:
            wins += 1.0 if a > b else 0.5 if a == b else 0.0
    return wins / (len(pos) * len(neg))


def loop_ap(scores, labels):
    total = sum(labels)
    if total == 0:
        return math.nan
    ap, previous_recall = 0.0, 0.0
    for t in sorted(set(scores), reverse=True):
        tp = sum(1 for s, y in zip(scores, labels) if s >= t and y)
        predicted = sum(1 for s in scores if s >= t)
        recall = tp / total
        ap += (recall - previous_recall) * tp / predicted
        previous_recall = recall
    return ap


def loop_kappa(truth, predicted):
    n = len(truth)
    observed = sum(1 for a, b in zip(truth, predicted) if a == b) / n
    p_truth, p_pred = sum(truth) / n, sum(predicted) / n
    expected = p_truth * p_pred + (1 - p_truth) * (1 - p_pred)
    return math.nan if expected == 1 else (observed - expected) / (1 - expected)


def loop_micro_f1_both_classes(truth, predicted):
    """scikit-learn's f1_score(average="micro") on 1-D binary labels: counts pooled over the
    classes 0 and 1."""
    tp = fp = fn = 0
    for label in (0, 1):
        for a, b in zip(truth, predicted):
            tp += a == label and b == label
            fp += a != label and b == label
            fn += a == label and b != label
    return 2 * tp / (2 * tp + fp + fn)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


scores_and_labels = st.integers(2, 40).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(-4, 4), min_size=n, max_size=n),  # few values: many ties
        st.lists(st.integers(0, 1), min_size=n, max_size=n),
    )
)


# ----------------------------------------------------------------- AUC and AP
def test_average_ranks_share_ties():
    ranks = average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0]))
    assert ranks.tolist() == [4.0, 1.0, 4.0, 2.0, 4.0]


@given(scores_and_labels)
def test_roc_auc_is_the_pairwise_win_rate(data):
    scores, labels = data
    expected = loop_auc(scores, labels)
    got = roc_auc(torch.tensor(scores, dtype=torch.float32), torch.tensor(labels))
    assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected, abs=1e-12)


@given(scores_and_labels)
def test_average_precision_matches_the_loop(data):
    scores, labels = data
    expected = loop_ap(scores, labels)
    got = average_precision(torch.tensor(scores, dtype=torch.float32), torch.tensor(labels))
    assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected, abs=1e-12)


def test_known_values():
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8])
    labels = torch.tensor([0, 0, 1, 1])
    assert roc_auc(scores, labels) == pytest.approx(0.75)
    assert average_precision(scores, labels) == pytest.approx((1.0 + 2 / 3) / 2)
    assert math.isnan(roc_auc(scores, torch.ones(4)))
    assert math.isnan(average_precision(scores, torch.zeros(4)))


def test_ranking_metrics_per_class_macro_micro_and_batching():
    torch.manual_seed(0)
    logits = torch.randn(30, 3)
    targets = (torch.rand(30, 3) < 0.4).float()
    targets[:, 2] = 0.0  # class 2 never positive: undefined, left out of the macro mean
    mask = torch.rand(30) < 0.8
    whole = METRICS.build({"type": "roc_auc"}, num_classes=3, class_names=["D", "G", "A"])
    whole.update(logits, targets, mask)
    batched = METRICS.build({"type": "roc_auc"}, num_classes=3, class_names=["D", "G", "A"])
    for rows in torch.arange(30).split(7):
        batched.update(logits[rows], targets[rows], mask[rows])
    values, again = whole.compute(), batched.compute()
    keep = mask.tolist()
    per_class = []
    for c, name in enumerate(["D", "G", "A"]):
        s = [v for v, k in zip(logits[:, c].tolist(), keep) if k]
        y = [v for v, k in zip(targets[:, c].tolist(), keep) if k]
        per_class.append(loop_auc(s, y))
        if math.isnan(per_class[-1]):
            assert math.isnan(values[name]) and math.isnan(again[name])
        else:
            assert values[name] == pytest.approx(per_class[-1]) == again[name]
    assert values[""] == pytest.approx(sum(per_class[:2]) / 2)
    micro = build("average_precision", 3, average="micro")
    micro.update(logits, targets, mask)
    flat_s = logits[mask].flatten().tolist()
    flat_y = targets[mask].flatten().tolist()
    assert micro.compute()[""] == pytest.approx(loop_ap(flat_s, flat_y))
    assert whole.higher_is_better and not whole.additive


def test_ranking_metric_multiclass_is_one_vs_rest_on_softmax():
    torch.manual_seed(1)
    logits, targets = torch.randn(25, 4), torch.randint(0, 4, (25,))
    metric = build("roc_auc", 4)
    metric.update(logits, targets)
    probs = logits.softmax(1)
    expected = [loop_auc(probs[:, c].tolist(), (targets == c).tolist()) for c in range(4)]
    got = metric.compute()
    assert [got[str(c)] for c in range(4)] == pytest.approx(expected)


def test_ranking_metric_errors_and_empty_split():
    with pytest.raises(ConfigError, match="macro or micro"):
        build("roc_auc", 2, average="weighted")
    with pytest.raises(ValueError, match=r"image-level"):
        build("roc_auc", 1).update(torch.randn(2, 1, 4, 4), torch.zeros(2, 1, 4, 4))
    empty = build("average_precision", 2)
    empty.update(torch.randn(3, 2), torch.ones(3, 2), torch.zeros(3, dtype=torch.bool))
    assert math.isnan(empty.compute()[""])


# ----------------------------------------------------------------- multi-label F1 family
def test_multilabel_per_class_f1_precision_recall_match_loops():
    torch.manual_seed(2)
    logits = torch.randn(40, 3) * 2
    targets = (torch.rand(40, 3) < 0.5).float()
    predicted = (torch.sigmoid(logits) > 0.5).tolist()
    truth = (targets > 0.5).tolist()
    names = ["D", "G", "A"]
    for metric_name in ("precision", "recall", "f1"):
        metric = METRICS.build({"type": metric_name}, num_classes=3, class_names=names)
        metric.update(logits, targets)
        values = metric.compute()
        expected = []
        for c in range(3):
            tp = sum(1 for p, t in zip(predicted, truth) if p[c] and t[c])
            fp = sum(1 for p, t in zip(predicted, truth) if p[c] and not t[c])
            fn = sum(1 for p, t in zip(predicted, truth) if not p[c] and t[c])
            den = {"precision": tp + fp, "recall": tp + fn, "f1": 2 * tp + fp + fn}[metric_name]
            num = 2 * tp if metric_name == "f1" else tp
            expected.append(num / den if den else 0.0)
        assert [values[n] for n in names] == pytest.approx(expected)
        assert values[""] == pytest.approx(sum(expected) / 3)


# ----------------------------------------------------------------- the challenge score
@given(st.integers(0, 2**31 - 1))
def test_odir_score_matches_the_challenge_definition(seed):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(12, 8, generator=generator) * 2
    truth = (torch.rand(12, 8, generator=generator) < 0.3).float()
    metric = METRICS.build({"type": "odir_score"}, num_classes=8)
    for rows in torch.arange(12).split(5):
        metric.update(logits[rows], truth[rows])
    got = metric.compute()
    probs = [sigmoid(v) for v in logits.flatten().tolist()]
    gt = [int(v) for v in truth.flatten().tolist()]
    hard = [int(p > 0.5) for p in probs]
    kappa = loop_kappa(gt, hard)
    f1 = loop_micro_f1_both_classes(gt, hard)
    auc = loop_auc(probs, gt)
    assert got["kappa"] == pytest.approx(kappa, nan_ok=True)
    assert got["f1"] == pytest.approx(f1)
    assert got["auc"] == pytest.approx(auc, nan_ok=True)
    assert got[""] == pytest.approx((kappa + f1 + auc) / 3, nan_ok=True)


def test_odir_score_known_case_and_threshold():
    truth = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    logits = torch.tensor([[2.0, -1.0], [0.5, 1.0]])  # probabilities .88 .27 .62 .73
    score = odir_challenge_score(truth, logits, 0.5)
    # decisions 1 0 1 1 vs truth 1 0 0 1: accuracy 3/4, kappa (3/4 - 1/2) / (1/2) = 1/2
    assert score["f1"] == pytest.approx(0.75)
    assert score["kappa"] == pytest.approx(0.5)
    assert score["auc"] == pytest.approx(1.0)  # both positives outscore both negatives
    strict = METRICS.build({"type": "odir_score", "threshold": 0.7}, num_classes=2)
    strict.update(logits, truth)
    assert strict.compute()["f1"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="multi-label"):
        build("odir_score", 3).update(torch.randn(2, 3), torch.tensor([0, 2]))


# ----------------------------------------------------------------- per-class thresholds
def loop_f1(probs, labels, t):
    tp = sum(1 for p, y in zip(probs, labels) if p > t and y)
    fp = sum(1 for p, y in zip(probs, labels) if p > t and not y)
    fn = sum(1 for p, y in zip(probs, labels) if p <= t and y)
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


@given(
    st.integers(2, 30).flatmap(
        lambda n: st.tuples(
            st.lists(st.integers(0, 10), min_size=2 * n, max_size=2 * n),
            st.lists(st.integers(0, 1), min_size=2 * n, max_size=2 * n),
        )
    )
)
def test_tuned_thresholds_reach_the_best_f1_of_any_threshold(data):
    values, flags = data
    probs = torch.tensor(values, dtype=torch.float64).view(-1, 2) / 10
    labels = torch.tensor(flags).view(-1, 2)
    thresholds = tune_thresholds(probs, labels)
    grid = [i / 200 for i in range(201)]  # every cut between the tenths, t >= 0
    for c in range(2):
        p, y = probs[:, c].tolist(), labels[:, c].tolist()
        if not any(y):
            assert thresholds[c] == 0.5
            continue
        best = max(loop_f1(p, y, t) for t in grid)
        assert loop_f1(p, y, float(thresholds[c])) == pytest.approx(best)
        chosen = [v for v in p if v > thresholds[c]]
        if chosen:  # every threshold predicting fewer positives scores lower (highest wins)
            assert all(loop_f1(p, y, t) < best - 1e-12 for t in grid if t >= min(chosen))


def test_tune_thresholds_midpoints_and_shape_check():
    probs = torch.tensor([[0.9], [0.6], [0.4], [0.1]])
    labels = torch.tensor([[1], [1], [0], [0]])
    assert tune_thresholds(probs, labels).tolist() == pytest.approx([0.5])
    labels = torch.tensor([[1], [1], [1], [0]])
    assert tune_thresholds(probs, labels).tolist() == pytest.approx([0.25])
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        tune_thresholds(torch.rand(4, 2), torch.ones(4, 3))


# ----------------------------------------------------------------- the engine's tracker
def tracker_tasks():
    spec = {
        "kind": "multilabel",
        "num_classes": 3,
        "loss": ["bce"],
        "metrics": ["roc_auc", "f1", "odir_score", {"type": "average_precision", "name": "ap"}],
    }
    return {"diagnosis": Task.from_config("diagnosis", spec)}


def tracker_batch(logits, targets, mask):
    return Batch(logits, {"diagnosis": targets}, {"diagnosis": mask})


def expected_columns(logits, targets, mask):
    s, y = logits[mask], targets[mask]
    aucs = [loop_auc(s[:, c].tolist(), y[:, c].tolist()) for c in range(3)]
    aps = [loop_ap(s[:, c].tolist(), y[:, c].tolist()) for c in range(3)]
    return {"roc_auc": sum(aucs) / 3, "ap": sum(aps) / 3}


def test_tracker_keeps_ranking_rows_and_sums_the_rest():
    torch.manual_seed(7)
    logits, targets = torch.randn(20, 3), (torch.rand(20, 3) < 0.5).float()
    mask = torch.rand(20) < 0.85
    tracker = MetricTracker(tracker_tasks())
    for rows in torch.arange(20).split(6):
        batch = tracker_batch(logits[rows], targets[rows], mask[rows])
        losses = {"diagnosis": torch.zeros(len(rows))}
        tracker.accumulate(tracker.rows({"diagnosis": logits[rows]}, batch, losses))
    values = tracker.compute()
    expected = expected_columns(logits, targets, mask)
    assert values["diagnosis/roc_auc"] == pytest.approx(expected["roc_auc"])
    assert values["diagnosis/ap"] == pytest.approx(expected["ap"])
    whole = METRICS.build({"type": "f1"}, num_classes=3)
    whole.update(logits, targets, mask)
    assert values["diagnosis/f1"] == pytest.approx(whole.compute()[""])
    challenge = odir_challenge_score(targets[mask], logits[mask], 0.5)
    assert values["diagnosis/odir_score"] == pytest.approx(challenge[""])
    assert values["diagnosis/odir_score/auc"] == pytest.approx(challenge["auc"])


def _tracker_process(rank, world, path, logits, targets, mask):
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{path}.rendezvous", rank=rank, world_size=world
    )
    try:
        tracker = MetricTracker(tracker_tasks())
        shard = torch.arange(len(logits))[rank::world][: 3 + 2 * rank]  # unequal shards
        batch = tracker_batch(logits[shard], targets[shard], mask[shard])
        losses = {"diagnosis": torch.zeros(len(shard))}
        tracker.accumulate(tracker.rows({"diagnosis": logits[shard]}, batch, losses))

        def reduce_sum(t):
            torch.distributed.all_reduce(t)
            return t

        tracker.reduce(reduce_sum, torch.device("cpu"))
        torch.save(tracker.compute(), f"{path}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # launches two processes
def test_tracker_gathers_ranking_rows_across_processes(tmp_path):
    torch.manual_seed(8)
    logits, targets = torch.randn(12, 3), (torch.rand(12, 3) < 0.5).float()
    mask = torch.ones(12, dtype=torch.bool)
    path = str(tmp_path / "run")
    torch.multiprocessing.spawn(
        _tracker_process, args=(2, path, logits, targets, mask), nprocs=2, join=True
    )
    used = torch.cat([torch.arange(12)[0::2][:3], torch.arange(12)[1::2][:5]])
    expected = expected_columns(logits[used], targets[used], mask[used])
    for rank in range(2):
        values = torch.load(f"{path}.{rank}", weights_only=True)
        assert values["diagnosis/roc_auc"] == pytest.approx(expected["roc_auc"])
        assert values["diagnosis/ap"] == pytest.approx(expected["ap"])
