"""VAE augmentation: the VAE's loss against the closed forms, and ``moekit data vae-augment`` on
a replica — balanced classes, single-label generated rows, a loadable folder in the same layout,
class-balanced counts from the real labels, the original folder untouched, the figure."""

import hashlib
import json
import math

import numpy as np
import pytest
import torch

from moekit.cli import main
from moekit.data.generated import read_generated
from moekit.data.replicas.odir import make_odir_replica
from moekit.errors import ConfigError
from moekit.models.vae import ConvVAE, vae_loss
from moekit.registry import DATASETS

COUNTS = {"train": 20, "val": 4, "offsite_test": 4, "onsite_test": 1}


def test_vae_shapes_sampling_and_size_check():
    torch.manual_seed(0)
    vae = ConvVAE((32, 48), channels=(8, 16), latent=12)
    images = torch.rand(3, 3, 32, 48)
    reconstruction, mu, logvar = vae(images)
    assert reconstruction.shape == images.shape and mu.shape == logvar.shape == (3, 12)
    samples = vae.sample(5, torch.Generator().manual_seed(1))
    assert (
        samples.shape == (5, 3, 32, 48) and 0 <= float(samples.min()) <= float(samples.max()) <= 1
    )
    assert vae.training  # sample() restores the mode
    with pytest.raises(ConfigError, match="divisible by 2\\^2 = 4"):
        ConvVAE((30, 48), channels=(8, 16))


def test_vae_loss_is_squared_error_plus_beta_kl():
    generator = torch.Generator().manual_seed(2)
    x, x_hat = (
        torch.rand(4, 3, 8, 8, generator=generator),
        torch.rand(4, 3, 8, 8, generator=generator),
    )
    mu, logvar = torch.randn(4, 6, generator=generator), torch.randn(4, 6, generator=generator)
    total, squared, kl = vae_loss(x_hat, x, mu, logvar, beta=0.5)
    expected_sq = np.mean([((x_hat[i] - x[i]) ** 2).sum().item() for i in range(4)])
    var = logvar.exp().numpy()
    expected_kl = np.mean(
        [0.5 * np.sum(var[i] + mu[i].numpy() ** 2 - 1 - logvar[i].numpy()) for i in range(4)]
    )
    assert float(squared) == pytest.approx(expected_sq, rel=1e-5)
    assert float(kl) == pytest.approx(expected_kl, rel=1e-5)
    assert float(total) == pytest.approx(expected_sq + 0.5 * expected_kl, rel=1e-5)
    assert float(vae_loss(x, x, torch.zeros(4, 6), torch.zeros(4, 6))[0]) == 0.0


def checksums(folder):
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow  # trains two small VAEs
def test_vae_augment_writes_a_balanced_loadable_folder(tmp_path, capsys):
    root = make_odir_replica(tmp_path / "replica", COUNTS, size=40)
    before = checksums(root)
    spec = tmp_path / "dataset.yaml"
    spec.write_text(f"{{type: odir, root: {root}, split: train, image_size: [32, 32]}}\n")
    out = tmp_path / "augmented"
    args = ["data", "vae-augment", str(spec), "--out", str(out), "--size", "16x16"]
    assert main([*args, "--channels", "8,16", "--latent", "8", "--epochs", "2"]) == 0
    assert "->" in capsys.readouterr().out
    assert checksums(root) == before  # the original folder is untouched
    report = json.loads((out / "vae_augment.json").read_text())
    real = report["counts_real"]
    assert set(report["counts_after"].values()) == {max(real.values())}
    augmented = DATASETS.build({"type": "odir", "root": str(out), "image_size": [32, 32]})
    original = DATASETS.build({"type": "odir", "root": str(root), "image_size": [32, 32]})
    added = len(augmented) - len(original)
    assert added == sum(max(real.values()) - n for n in real.values())
    assert augmented.label_counts("diagnosis") == original.label_counts("diagnosis")
    generated = read_generated(out, "train")
    assert len(generated) == added and all(i.startswith("vae_") for i in generated)
    labels = augmented.label_matrix()[-added:]
    assert torch.equal(labels.sum(dim=1), torch.ones(added))  # single-label rows
    sample = augmented[len(augmented) - 1]
    assert sample["inputs"].shape == (3, 32, 32) and sample["has_target"]["diagnosis"]
    assert (out / "vae_samples.png").stat().st_size > 0
    assert [r["name"] for r in report["per_class"]] == [
        c for c, n in real.items() if n < max(real.values())
    ]
    assert all(
        len(r["losses"]) == 2 and math.isfinite(r["losses"][-1]) for r in report["per_class"]
    )
    # a second augmentation of the augmented folder, or into a non-empty folder, is refused
    again = ["data", "vae-augment", str(spec), "--out", str(out)]
    assert main(again) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    spec.write_text(f"{{type: odir, root: {out}, split: train, image_size: [32, 32]}}\n")
    assert main(["data", "vae-augment", str(spec), "--out", str(tmp_path / "twice")]) == 2
    assert "holds generated images already" in capsys.readouterr().err


def test_class_balanced_counts_skip_generated_images(tmp_path):
    from moekit.engine.experiment import build_experiment

    root = make_odir_replica(tmp_path / "replica", COUNTS, size=40)
    table = root / "train.csv"
    image = next((root / "images/train").iterdir())
    (root / "images/train/vae_G_0001.jpg").write_bytes(image.read_bytes())
    table.write_text(table.read_text() + "vae_G_0001.jpg,0,1,0\n")
    (root / "generated.csv").write_text("split,id,class\ntrain,vae_G_0001.jpg,G\n")
    dataset = DATASETS.build({"type": "odir", "root": str(root)})
    matrix = dataset.label_matrix()
    assert dataset.label_counts("diagnosis") == [int(v) for v in matrix[:-1].sum(dim=0)]
    cfg = {
        "tasks": {
            "diagnosis": {
                "kind": "multilabel",
                "num_classes": 3,
                "loss": [{"type": "class_balanced_bce", "counts": "auto"}],
            }
        },
        "data": {"train": {"type": "odir", "root": str(root), "image_size": [32, 32]}},
        "model": {"type": "transfer_classifier"},
    }
    (loss,) = build_experiment(cfg).objective.losses["diagnosis"]
    assert loss.counts == dataset.label_counts("diagnosis")
