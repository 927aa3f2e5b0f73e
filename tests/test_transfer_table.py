"""evaluation.readme_table --transfer: the per-class shape gap recomputes by hand from per_image.csv."""
from __future__ import annotations

import csv
import json

from evaluation.readme_table import class_shape_accuracy, render_transfer
from utils.config import Config, save_config


def _write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_shape_gap_and_row_from_the_run_folder(tmp_path):
    run = tmp_path / "run"
    (run / "test_val").mkdir(parents=True)
    rows = [  # meningioma: 2 square (1 right), 2 non-square (2 right), 1 leaked (ignored); a glioma (ignored)
        {"stem": "a", "subset": "leak_free", "true_class": "meningioma", "correct": 1, "width": 512, "height": 512},
        {"stem": "b", "subset": "leak_free", "true_class": "meningioma", "correct": 0, "width": 512, "height": 512},
        {"stem": "c", "subset": "leak_free", "true_class": "meningioma", "correct": 1, "width": 369, "height": 216},
        {"stem": "d", "subset": "leak_free", "true_class": "meningioma", "correct": 1, "width": 300, "height": 512},
        {"stem": "e", "subset": "leaked", "true_class": "meningioma", "correct": 0, "width": 300, "height": 512},
        {"stem": "f", "subset": "leak_free", "true_class": "glioma", "correct": 0, "width": 512, "height": 512},
    ]
    _write_csv(run / "test_val" / "per_image.csv", rows)
    assert class_shape_accuracy(run / "test_val", "meningioma") == {"square": (1, 2), "non_square": (2, 2)}
    (run / "test_val" / "metrics.json").write_text(json.dumps({"accuracy": 0.5, "dice": 0.7, "ci95": {}}))
    save_config(Config(), run / "config.yaml")
    table = render_transfer([run], "test_ext_other_test")
    assert "| 50.00 | 70.00 | 50.0 (1/2) / 100.0 (2/2) | – |" in table  # no held-out or external result: –
