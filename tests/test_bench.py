"""``moekit bench moe`` at a tiny size: it runs, prints its tables and returns the numbers."""

import torch

from moekit.bench import moe as bench_moe
from moekit.cli import main
from moekit.commands.bench import SECTIONS

TINY = dict(batch=2, tokens=5, dim=16, experts=4, k=2, hidden=8, reps=2, warmup=1)


def test_bench_returns_numbers_and_markdown_rows():
    threads = torch.get_num_threads()
    report = bench_moe.run(**TINY, p_values=(0.3, 0.7), threads=1)
    assert torch.get_num_threads() == threads, "the thread setting is restored"
    assert [row["key"] for row in report.train] == ["dense", "grouped_mm", "loop", "masked"]
    assert report.train[0]["ratio"] == 1.0
    assert all(row["ms"] > 0 for row in report.train)
    assert [row["key"] for row in report.top_p] == ["all", "p=0.3", "p=0.7"]
    assert report.top_p[0]["experts"] == 4
    assert all(1 <= row["experts"] <= 4 for row in report.top_p)
    assert [row["key"] for row in report.memory] == ["dense", "grouped_mm", "loop"]
    assert all(row["peak_mib"] > row["grad_mib"] > 0 for row in report.memory)
    table = report.markdown()
    for heading in ("forward + backward", "inference routing", "forward + backward memory"):
        assert f"| {heading} |" in table
    assert "dispatch `loop`" in table and "top-p, p=0.7" in table


def test_bench_command_prints_the_table(capsys):
    assert "moe" in SECTIONS
    args = [
        "--batch",
        "1",
        "--tokens",
        "4",
        "--dim",
        "8",
        "--experts",
        "4",
        "--k",
        "2",
        "--hidden",
        "4",
        "--reps",
        "1",
        "--warmup",
        "0",
        "--p",
        "0.5",
        "--threads",
        "1",
        "--no-masked",
    ]
    assert main(["bench", "moe", *args]) == 0
    out = capsys.readouterr().out
    assert "| dense MLP, hidden 8 |" in out
    assert "top-p, p=0.5" in out
    assert "dense masked" not in out


def test_bench_prune_measures_full_and_extracted_models():
    from moekit.bench import extraction as bench_prune

    result = bench_prune.run(keep_tops=(0.25,), profile_batches=1, reps=1, warmup=0, threads=1)
    rows = {row["name"]: row for row in result["rows"]}
    full, masked = rows["full, all tasks"], rows["full, shape only"]
    alone = rows["shape alone, all experts"]
    extracted = rows["shape extracted, keep top 25%, reduce k"]
    assert alone["ratio"] == 1.0 and full["params"] == masked["params"] > alone["params"]
    assert extracted["params"] < 0.5 * alone["params"], "a quarter of the experts are kept"
    assert extracted["flops"] <= alone["flops"] < masked["flops"] < full["flops"]
    assert "| shape extracted, keep top 25%, reduce k |" in bench_prune.markdown(result)
