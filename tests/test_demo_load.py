"""The web demo under load, short version for CI: 2 concurrent clients for 10 s on one shared model, 512x512
slices and 40-megapixel files mixed; no request may fail and no answer may differ from the same file's answer
computed alone. It drives the page's prediction path in threads (scripts/load_test_demo.py), not Streamlit's
websocket protocol (docs/faults.md says why). The full version: python scripts/load_test_demo.py."""
from __future__ import annotations

import importlib.util
import sys

import pytest

from model.loading import load_model_from_checkpoint
from tests.helpers import REPO


def _script():
    if "load_test_demo" in sys.modules:
        return sys.modules["load_test_demo"]
    spec = importlib.util.spec_from_file_location("load_test_demo", REPO / "scripts" / "load_test_demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def served_model(tmp_path_factory):
    script = _script()
    checkpoint = script.seeded_checkpoint(tmp_path_factory.mktemp("demo_load"), image_size=64)
    model, cfg, _ = load_model_from_checkpoint(checkpoint, "cpu")
    return script, model, cfg


def test_two_clients_for_ten_seconds_get_their_own_answers(served_model):
    script, model, cfg = served_model
    summary = script.run_load(model, cfg, clients=2, seconds=10, big_every=3)
    print(summary)
    assert summary["failures"] == 0, summary["failure_examples"]
    assert summary["mismatches"] == 0, summary["mismatch_examples"]
    assert summary["latency_s"]["slice"]["n"] >= 2 and summary["requests"] >= 4
    assert summary["peak_rss_mib"] >= summary["rss_before_mib"] > 0


def test_answers_are_traced_to_their_own_file():
    """The check the load test relies on: another client's file gives a different answer (a leak is visible)."""
    script = _script()
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        model, cfg, _ = load_model_from_checkpoint(script.seeded_checkpoint(Path(tmp), image_size=64), "cpu")
    a = script.page_answer(model, cfg, *script.client_files(0)["slice"], gradcam=False)
    b = script.page_answer(model, cfg, *script.client_files(1)["slice"], gradcam=False)
    again = script.page_answer(model, cfg, *script.client_files(0)["slice"], gradcam=False)
    assert a.same(again) and not a.same(b) and a.differs(b) is not None


def test_concurrent_gradcam_heat_maps_are_each_users_own(served_model):
    script, model, cfg = served_model
    summary = script.run_load(model, cfg, clients=2, seconds=6, big_every=0, gradcam=True)
    assert summary["failures"] == 0 and summary["mismatches"] == 0, summary["mismatch_examples"]
