"""External-set files (evaluation/external_sets.py): test.py --external, and a sweep's external and latency
columns (engine.sweep --external, engine/sweep_measures.py)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from engine.sweep import main as sweep_main
from evaluation.external_sets import read_external_set
from tests.helpers import REPO, coarse_imagefolder, save_untrained_checkpoint
from utils.cli import run_main
from utils.config import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["data.preprocess.image_size=64", "data.loader.batch_size=8", "data.loader.num_workers=0", "eval.batch_size=16", "train.device=cpu",
        "train.threads=1", "data.loader.cache=none", "train.image_log_every=0", "data.generated.enabled=false"]


@pytest.fixture(scope="module")
def external_file(tmp_path_factory) -> Path:
    """An imagefolder set `Testing/{tumour,normal}` from another generated dataset, described in a YAML file."""
    base = tmp_path_factory.mktemp("external")
    root = coarse_imagefolder(base)
    path = base / "clinic.yaml"
    path.write_text(f"external:\n  name: clinic\n  root: {root}\n  data_format: imagefolder\n"
                    "  class_map: {glioma: tumour, meningioma: tumour, pituitary: tumour, no_tumor: normal}\n"
                    "  layout: [data.layout.test_dir=Testing]\n")
    return path


def test_the_shipped_pmram_file_reads():
    external = read_external_set(REPO / "configs/external/pmram.yaml")
    assert external.name == "pmram" and external.data_format == "imagefolder" and external.layout == ["data.layout.test_dir=."]
    assert external.class_map["512Normal"] == "no_tumor" and external.folder == "test_ext_pmram_test"


@pytest.mark.parametrize("text,message", [
    (None, "does not exist"), ("runs: {}\n", "under `external:`"), ("external: {root: r}\n", "data_format is required"),
    ("external: {root: r, data_format: dicom}\n", "must be one of brisc, imagefolder, pairs"),
    ("external: {root: r, data_format: brisc, colour: red}\n", "unknown key.*external.colour"),
    ("external: {root: r, data_format: brisc, class_map: [a]}\n", "class_map must map"),
    ("external: {root: r, data_format: brisc, layout: [test_dir]}\n", "data.KEY=VALUE"),
    ("external: [\n", "not valid YAML")])
def test_bad_external_files_name_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "set.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=message) as error:
        read_external_set(path)
    assert "set.yaml" in str(error.value)


def test_test_py_external_equals_the_four_flags(tiny_brisc, external_file, tmp_path):
    import test as test_py

    (tmp_path / "run").mkdir()
    checkpoint = save_untrained_checkpoint(tiny_brisc, tmp_path / "run")
    external = read_external_set(external_file)
    common = ["--checkpoint", str(checkpoint), "--no-progress", "--num-workers", "0", "--bootstrap", "0"]
    assert run_main(test_py.main, [*common, "--external", str(external_file), "--out", str(tmp_path / "a")]) == 0
    assert run_main(test_py.main, [*common, "--data-root", external.root, "--data-format", "imagefolder",
                                   "--class-map", "glioma=tumour,meningioma=tumour,pituitary=tumour,no_tumor=normal",
                                   "--layout", "data.layout.test_dir=Testing", "--out", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / x / "metrics.json").read_text()) for x in "ab")
    assert a["num_images"] == b["num_images"] == 12 and a["balanced_accuracy"] == b["balanced_accuracy"]
    assert a["label_space"] == b["label_space"]
    with pytest.raises(ConfigError, match="--external .* already says --data-root"):
        test_py.main([*common, "--external", str(external_file), "--data-root", external.root])


def test_sweep_adds_external_and_latency_columns(tiny_brisc, external_file, tmp_path, capsys):
    runs = tmp_path / "runs.yaml"
    runs.write_text("runs:\n  base: {}\n")
    out = tmp_path / "sweep"
    args = ["--config", str(REPO / "configs/demo.yaml"), "--runs", str(runs), "--epochs", "1", "--out", str(out),
            "--bootstrap", "50", "--no-progress"]
    opts = ["--opts", f"data.root={tiny_brisc}", f"data.loader.cache_dir={tmp_path / 'cache'}", *TINY]
    assert run_main(sweep_main, [*args, *opts]) == 0
    assert "timing base" in capsys.readouterr().out
    latency = json.loads((out / "latency.json").read_text())["base"]
    assert latency["latency_b1_ms"] > 0 and latency["img_s_b8"] > 0 and latency["key"]["image_size"] == 64
    table = (out / "sweep.md").read_text()
    assert "CPU ms/img b1" in table and "balanced acc" not in table and (out / "sweep_latency.png").stat().st_size

    # The finished run is scored on the external set without training again; the latency is not timed again.
    assert run_main(sweep_main, [*args, "--external", str(external_file), *opts]) == 0
    printed = capsys.readouterr().out
    assert "finished earlier; scoring it on clinic" in printed and "timing" not in printed
    result = json.loads((out / "base" / "seed42" / "result.json").read_text())
    metrics = json.loads((Path(result["run_dir"]) / "test_ext_folders_test" / "metrics.json").read_text())
    assert result["external"]["balanced_accuracy"] == metrics["balanced_accuracy"]
    assert result["external"]["ci95"]["balanced_accuracy"] == metrics["ci95"]["balanced_accuracy"]
    table = (out / "sweep.md").read_text()
    assert "clinic balanced acc %" in table and f"{100 * metrics['balanced_accuracy']:.2f} [" in table
    row = next(csv.DictReader(open(out / "sweep.csv", newline="")))
    assert float(row["external_balanced_accuracy_mean"]) == pytest.approx(metrics["balanced_accuracy"], rel=1e-5)
    assert float(row["latency_b1_ms"]) == pytest.approx(latency["latency_b1_ms"], rel=1e-5)
