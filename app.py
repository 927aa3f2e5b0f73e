"""Web demo: upload an MRI slice (or click an example) and see the class, the tumour mask and a Grad-CAM.

    python app.py [--checkpoint PATH] [--host 127.0.0.1] [--port 7860] [--runs runs]
    python app.py --runtime torch              # predictions from the eager model (default on a CPU: ONNX Runtime)

Without --checkpoint the newest `runs/*/latest/best.pth` is served (a picker offers the others). The page is
drawn with Streamlit: `python app.py` checks its arguments, then starts the Streamlit server on this same file,
which draws the page (`render_page`). Predictions come from `prediction.folder.predict_batch`, the function behind
`test.py --input`, run by the runtime of `--runtime` / `--precision` (default: the run's eval.predict_runtime,
auto: the ONNX Runtime export on a CPU, eager PyTorch on a GPU; the predictor is built once per checkpoint);
Grad-CAM always uses the eager model, which has gradients. A research tool, not a medical device.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

from utils.cli import RUNTIME_CHOICES, RUNTIME_PRECISIONS, add_debug_flag, int_at_least, run_main
from utils.errors import InputError

REPO = Path(__file__).resolve().parent
DISCLAIMER = ("**Research tool, not a medical device.** Predictions come from a model trained for research; "
              "they are not a diagnosis and must not guide the care of a patient.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="best.pth of a run (default: the newest runs/*/latest/best.pth)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int_at_least(1), default=7860, help="port to serve on")
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="where to look for runs/*/latest/best.pth")
    parser.add_argument("--examples-dir", type=Path, default=REPO / ".cache" / "app_examples",
                        help="where the example slices are generated on first start (default: .cache/, ignored by git)")
    parser.add_argument("--runtime", default=None, choices=RUNTIME_CHOICES,
                        help="inference runtime of the predictions (default: eval.predict_runtime of the run, "
                             "auto: onnxruntime on a CPU, torch on a GPU; docs/runtime.md)")
    parser.add_argument("--precision", default=None, choices=RUNTIME_PRECISIONS,
                        help="fp32, or int8-dynamic / int8-static with onnxruntime (default: eval.runtime_precision)")
    add_debug_flag(parser)
    return parser.parse_args(argv)


def offered_checkpoints(args: argparse.Namespace) -> list[Path]:
    """The --checkpoint first (when given), then every run's latest best.pth, newest first; never empty."""
    from prediction.demo import DEMO_COMMAND, find_checkpoints
    from utils.checkpoint import resolve_checkpoint_arg

    found = find_checkpoints(args.runs)
    if args.checkpoint is not None:
        chosen = resolve_checkpoint_arg(args.checkpoint)
        if not chosen.is_file():
            raise InputError(f"--checkpoint '{args.checkpoint}' does not exist: pass a run's best.pth")
        return [chosen] + [p for p in found if p.resolve() != chosen.resolve()]
    if not found:
        raise InputError(f"no checkpoint found in {args.runs}/*/latest/best.pth: train one with the demo "
                         f"('{DEMO_COMMAND}'), then run 'python app.py', or pass --checkpoint PATH")
    return found


def main(argv: list[str] | None = None) -> int:
    """Check the arguments, make the example slices, then hand over to the Streamlit server (blocks)."""
    args = parse_args(argv)
    checkpoints = offered_checkpoints(args)
    from prediction.demo import ensure_examples

    ensure_examples(args.examples_dir)
    from streamlit.web import cli as streamlit_cli

    print(f"serving {checkpoints[0]} on http://{args.host}:{args.port} (Ctrl-C stops)", flush=True)
    sys.argv = ["streamlit", "run", str(Path(__file__).resolve()), f"--server.address={args.host}",
                f"--server.port={args.port}", "--server.headless=true", "--browser.gatherUsageStats=false",
                "--server.fileWatcherType=none", "--global.developmentMode=false", "--client.toolbarMode=minimal",
                "--", "--checkpoint", str(checkpoints[0]), "--runs", str(args.runs),
                "--examples-dir", str(args.examples_dir),
                *(["--runtime", args.runtime] if args.runtime else []),
                *(["--precision", args.precision] if args.precision else [])]
    return streamlit_cli.main()


# ------------------------------------------------------------------------------------------------ the page
def render_page(args: argparse.Namespace) -> None:
    """Draw the page for one Streamlit run (every widget change reruns this; models and predictions are cached)."""
    import streamlit as st

    from datasets.errors import DataError
    from datasets.naming import CLASS_NAMES
    from prediction import demo
    from model import model_tasks
    from utils.errors import UserError

    st.set_page_config(page_title="EfficientMTNet demo", layout="wide")
    st.title("EfficientMTNet: tumour class and mask of a brain MRI slice")
    st.warning(DISCLAIMER)
    try:
        checkpoints = offered_checkpoints(args)
    except UserError as exc:
        st.error(str(exc))
        st.stop()
    side = st.sidebar
    checkpoint = side.selectbox("Checkpoint", checkpoints, format_func=str) if len(checkpoints) > 1 else checkpoints[0]
    try:
        model, predictor, cfg, info = _load_model(str(checkpoint), Path(checkpoint).stat().st_mtime, args.runtime,
                                                  args.precision)
    except (UserError, OSError) as exc:  # an unknown architecture, a damaged file: say so, keep serving
        st.error(f"cannot use this checkpoint: {exc}")
        st.stop()
    has_seg = "seg" in model_tasks(model)
    tta = side.toggle("Flip test-time augmentation", value=False, help="average with the horizontally flipped slice")
    threshold = side.slider("Mask threshold", 0.05, 0.95, float(cfg.eval.threshold), 0.05, disabled=not has_seg)
    opacity = side.slider("Mask opacity", 0.0, 1.0, 0.45, 0.05, disabled=not has_seg)
    cam_choice = side.selectbox("Grad-CAM class", ["predicted class", *CLASS_NAMES])
    side.caption(f"Model: {info['name']} ({info['params'] / 1e6:.2f} M parameters), input "
                 f"{cfg.data.preprocess.image_size} px ({cfg.data.preprocess.resize}), {info['weights']} weights"
                 f"{info['epoch']}, on {info['device']}, {info['runtime']}. Checkpoint: {checkpoint}")

    chosen = _choose_slice(args.examples_dir)
    if chosen is None:
        st.info("No slice yet.")
        return
    name, data = chosen
    digest = hashlib.sha1(data).hexdigest()
    try:
        grey = demo.read_upload(data, name)
        prediction = _predict(predictor, cfg, grey, tta, key=(str(checkpoint), digest, tta))
    except DataError as exc:
        st.error(f"cannot predict on this file: {exc}")
        return
    record = demo.prediction_record(prediction, grey, threshold, tta, name, checkpoint, info["name"])
    target = None if cam_choice == "predicted class" else CLASS_NAMES.index(cam_choice)
    _show_results(model, cfg, info, prediction, grey, record, opacity, target, key=(str(checkpoint), digest, tta))


def _choose_slice(examples_dir: Path) -> tuple[str, bytes] | None:
    """The uploader and the example buttons; returns (file name, bytes) of the latest choice, or None."""
    import streamlit as st

    from prediction import demo

    examples = demo.ensure_examples(examples_dir)
    upload_column, example_column = st.columns([3, 2])
    upload_column.file_uploader(f"Upload a JPEG or PNG slice (8- or 16-bit, 1 or 3 channels, any size up to "
                                f"{demo.MAX_PIXELS / 1e6:g} megapixels)", key="upload", on_change=_choose,
                                args=(("upload", ""),))
    example_column.caption("... or click an example (generated slices in the BRISC 2025 layout)")
    for column, (name, path) in zip(example_column.columns(len(examples)), examples.items()):
        column.image(str(path), width="stretch")
        column.button(name, key=f"example_{name}", on_click=_choose, args=(("example", str(path)),))
    source = st.session_state.get("source")
    upload = st.session_state.get("upload")
    if source is None and upload is not None:
        source = ("upload", "")
    if source is None or (source[0] == "upload" and upload is None):
        return None
    if source[0] == "example":
        return Path(source[1]).name, Path(source[1]).read_bytes()
    return upload.name, upload.getvalue()


def _show_results(model, cfg, info: dict, prediction, grey, record: dict, opacity: float, target: int | None,
                  key: tuple) -> None:
    """Class and probabilities, the mask overlay with the area, the Grad-CAM, and the downloads."""
    import streamlit as st

    from datasets.naming import CLASS_NAMES
    from prediction import demo
    from utils.errors import UserError

    name, threshold, has_seg = record["file"], record.get("threshold"), prediction.seg_logits is not None
    if prediction.placement.fallback:  # a head-geometry run that could not find the head in this slice
        st.info("No head found in this slice: it was letterboxed instead of cropped to the head, unlike training.")
    summary, mask_column, cam_column = st.columns(3)
    with summary:
        probs = prediction.probabilities
        st.markdown(f"### Predicted class: {prediction.predicted_class}")
        st.bar_chart({"probability": {n: float(p) for n, p in zip(CLASS_NAMES, probs)}}, horizontal=True,
                     height=200)
        st.markdown(" · ".join(f"{n}: {p:.3f}" for n, p in zip(CLASS_NAMES, probs)))
        st.markdown(f"Model latency for this image: **{prediction.seconds * 1000:.1f} ms** "
                    f"({'with' if record['tta'] else 'without'} flip TTA, on {info['device']}); "
                    f"{name}, {prediction.size[0]}x{prediction.size[1]} px")
        st.download_button("Download the prediction (JSON)", demo.record_json(record),
                           f"{Path(name).stem}_prediction.json", "application/json")
    with mask_column:
        mask = prediction.mask(threshold) if has_seg else None
        with st.container(key="overlay"):
            st.image(demo.for_display(demo.overlay(grey, mask, opacity)), width="stretch",
                     caption=f"tumour mask at threshold {threshold:.2f} over the slice at its own size"
                     if has_seg else "this model predicts no mask")
        if mask is not None:
            share = record["tumour_share_of_head"]
            share_text = "n/a (no head pixels)" if share is None else f"{100 * share:.2f} %"
            st.markdown(f"Tumour area: **{record['tumour_pixels']} pixels**, **{share_text}** of the head "
                        f"(head: pixels brighter than {demo.HEAD_THRESHOLD} of 255, {record['head_pixels']} pixels)")
            st.download_button("Download the mask (PNG)", demo.mask_png(mask), f"{Path(name).stem}_mask.png",
                               "image/png")
    with cam_column:
        try:
            cam = _gradcam(model, cfg, prediction, grey, target, key=(*key, target))
        except (ValueError, RuntimeError, UserError) as exc:
            st.info(f"no Grad-CAM for this model: {exc}")
        else:
            explained = CLASS_NAMES[prediction.class_index if target is None else target]
            st.image(demo.for_display(cam), width="stretch",
                     caption=f"Grad-CAM: where the evidence for '{explained}' lies")


def _choose(source: tuple[str, str]) -> None:
    import streamlit as st

    st.session_state["source"] = source


def _load_model(path: str, mtime: float, runtime: str | None = None, precision: str | None = None):
    """(eager model for Grad-CAM, predictor of the chosen runtime, config, facts for the page), built once per file,
    modification time and runtime for the server's life."""
    import streamlit as st

    @st.cache_resource(max_entries=2, show_spinner="loading the checkpoint (an exported runtime: exporting it on "
                                                   "first use) ...")
    def load(path: str, mtime: float, runtime: str | None, precision: str | None):
        from evaluation.predictor import prediction_predictor, prediction_runtime, runtime_label
        from model.loading import load_model_from_checkpoint
        from utils.runtime import select_device

        device = select_device("auto", key="device")
        model, cfg, ckpt = load_model_from_checkpoint(path, device)
        runtime, precision, automatic = prediction_runtime(cfg.eval, runtime, precision, device)
        predictor = (model if runtime == "torch" else
                     prediction_predictor(path, runtime, precision, automatic, device, loaded=ckpt))
        epoch = f", epoch {ckpt['epoch']}" if ckpt.get("epoch") is not None else ""
        info = {"name": cfg.model.name, "params": sum(p.numel() for p in model.parameters()), "device": str(device),
                "weights": "EMA" if ckpt.get("ema") is not None else "raw", "epoch": epoch,
                "runtime": runtime_label(predictor)}
        return model, predictor, cfg, info

    return load(path, mtime, runtime, precision)


def _session_cached(slot: str, key: tuple, compute):
    """The last result of `compute()` for `key` in this browser session (sliders rerun the page, not the model)."""
    import streamlit as st

    held = st.session_state.get(slot)
    if held is None or held[0] != key:
        held = (key, compute())
        st.session_state[slot] = held
    return held[1]


def _predict(predictor, cfg, grey, tta: bool, key: tuple):
    from prediction.folder import predict_batch

    def compute():
        # predicted at the config's threshold; the slider re-thresholds the stored probabilities
        result = predict_batch(predictor, cfg, [grey], tta=tta)[0]
        if isinstance(result, Exception):  # a DataError: unreadable image
            raise result
        return result

    return _session_cached("prediction", key, compute)


def _gradcam(model, cfg, prediction, grey, target, key: tuple):
    from prediction.demo import gradcam_view

    return _session_cached("gradcam", key, lambda: gradcam_view(model, cfg, prediction, grey, target))


def _inside_streamlit() -> bool:
    try:
        from streamlit import runtime
    except ImportError:
        return False
    return runtime.exists()


if __name__ == "__main__":
    if _inside_streamlit():
        render_page(parse_args(sys.argv[1:]))
    else:
        sys.exit(run_main(main))
