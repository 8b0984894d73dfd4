"""``moekit bench moe`` at a tiny size: it runs, prints its tables and returns the numbers."""

import pytest
import torch

from moekit.bench import moe as bench_moe
from moekit.bench.timing import check_clock
from moekit.cli import main
from moekit.commands.bench import SECTIONS
from moekit.errors import ConfigError

TINY = dict(batch=2, tokens=5, dim=16, experts=4, k=2, hidden=8, reps=2, warmup=1)


def test_bench_returns_numbers_and_markdown_rows():
    threads = torch.get_num_threads()
    report = bench_moe.run(**TINY, p_values=(0.3, 0.7), threads=1)
    assert torch.get_num_threads() == threads, "the thread setting is restored"
    variants = ["dense", "grouped_mm", "loop", "reference", "masked"]
    assert [row["key"] for row in report.train] == variants
    assert report.train[0]["ratio"] == 1.0
    assert all(row["ms"] > 0 and row["dtype"] == "float32" for row in report.train)
    assert [row["key"] for row in report.top_p] == ["all", "p=0.3", "p=0.7"]
    assert report.top_p[0]["experts"] == 4
    assert all(1 <= row["experts"] <= 4 for row in report.top_p)
    assert [row["key"] for row in report.memory] == ["dense", "grouped_mm", "loop", "reference"]
    assert all(row["peak_mib"] > row["grad_mib"] > 0 for row in report.memory)
    table = report.markdown()
    for heading in ("forward + backward", "inference routing", "forward + backward memory"):
        assert f"| dtype | {heading} |" in table
    assert "dispatch `loop`" in table and "top-p, p=0.7" in table
    assert "Mod-Squad reference code" in table and "bf16 units" in table


def test_bench_measures_each_dtype_against_its_own_dense_layer():
    report = bench_moe.run(**TINY, p_values=(0.5,), threads=1, dtypes=("float32", "bfloat16"))
    for rows in (report.train, report.top_p, report.memory):
        assert [row["dtype"] for row in rows] == sorted(
            [row["dtype"] for row in rows], key=["float32", "bfloat16"].index
        )
        assert {row["dtype"] for row in rows} == {"float32", "bfloat16"}
    baselines = [row for row in report.train if row["key"] == "dense"]
    assert [row["ratio"] for row in baselines] == [1.0, 1.0]
    bf16_grads = [row["grad_mib"] for row in report.memory if row["dtype"] == "bfloat16"]
    f32_grads = [row["grad_mib"] for row in report.memory if row["dtype"] == "float32"]
    assert bf16_grads == f32_grads, "float32 master weights: the same gradient bytes"
    assert "| bfloat16 | dense MLP" in report.markdown()


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
        "--dtype",
        "bfloat16",
    ]
    assert main(["bench", "moe", *args]) == 0
    out = capsys.readouterr().out
    assert "| bfloat16 | dense MLP, hidden 8 |" in out and "| float32 |" not in out
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


def test_bench_on_two_threads_also_times_the_loop_with_blocks_in_turn():
    report = bench_moe.run(**{**TINY, "reps": 1}, p_values=(0.5,), threads=2, masked=False)
    keys = [row["key"] for row in report.train]
    assert keys == ["dense", "grouped_mm", "loop", "loop_in_turn", "reference"]
    assert "expert blocks in turn" in report.markdown()


def test_bench_times_on_the_cpu_clock_and_prints_the_clock_and_load():
    report = bench_moe.run(**TINY, p_values=(0.5,), threads=1, masked=False, clock="cpu")
    assert all(row["ms"] > 0 for row in report.train)
    assert "cpu clock" in report.markdown() and "load average" in report.markdown()


def test_bench_refuses_the_cpu_clock_on_another_device():
    with pytest.raises(ConfigError, match="--clock cpu times the CPU only"):
        check_clock("cpu", torch.device("meta"))
    with pytest.raises(ConfigError, match="--clock must be one of wall, cpu"):
        check_clock("gpu", torch.device("cpu"))
    assert main(["bench", "moe", "--clock", "cpu", "--device", "meta"]) == 2
