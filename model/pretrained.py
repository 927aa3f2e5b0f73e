"""Pretrained weights for a model's encoder: a local state_dict file, or ImageNet weights from the libraries' hub
that fail fast with a clear message when the machine is offline."""
from __future__ import annotations

import contextlib
import os
import socket
import threading
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import urlparse

import torch
import torch.nn as nn

from utils.errors import UserError

IMAGENET = "imagenet"
_HUB_TIMEOUT_S = 3.0
# Top-level key prefixes of ImageNet classifier heads: present in classification checkpoints, absent from encoders.
_CLASSIFIER_PREFIXES = ("fc.", "classifier.", "head.", "head_drop.", "_fc.", "conv_head.", "_conv_head.", "bn2.")


class PretrainedWeightsError(UserError):
    """Pretrained weights that cannot be fetched or do not fit the encoder."""


# --------------------------------------------------------------------------------------------- input size


def _hub_host() -> str:
    return urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"


def _reachable(host: str, port: int = 443, timeout: float = _HUB_TIMEOUT_S) -> bool:
    """True when a TCP connection to host:port opens within `timeout` seconds (name lookup included)."""
    outcome: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome.append(True)
        except OSError:
            outcome.append(False)

    # The name lookup ignores socket timeouts, so the whole attempt runs in a thread that is abandoned when late.
    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(outcome and outcome[0])


def _download_advice(model_name: str) -> str:
    return (f"Download the ImageNet weights of the '{model_name}' encoder on a machine with internet access, save "
            f"`model.encoder.state_dict()` (or the library's checkpoint file) and pass the local file instead: "
            f"model.pretrained=/path/to/encoder.pth")


def require_hub(model_name: str) -> None:
    """Raise `PretrainedWeightsError` at once when ImageNet weights cannot be downloaded (offline machine)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get("TIMM_OFFLINE"):
        raise PretrainedWeightsError(f"pretrained='imagenet' for '{model_name}' but downloads are switched off "
                                     f"(HF_HUB_OFFLINE). {_download_advice(model_name)}")
    host = _hub_host()
    if not _reachable(host):
        raise PretrainedWeightsError(f"pretrained='imagenet' for '{model_name}' needs a download from {host}, "
                                     f"which cannot be reached (no network?). {_download_advice(model_name)}")


@contextlib.contextmanager
def hub_download(model_name: str) -> Iterator[None]:
    """Turn any failure of a library's weight download into a `PretrainedWeightsError` with the way out."""
    try:
        yield
    except PretrainedWeightsError:
        raise
    except Exception as exc:  # the libraries raise many types (HTTP, OS, hub, value errors)
        raise PretrainedWeightsError(f"downloading the ImageNet weights of '{model_name}' failed: {exc}. "
                                     f"{_download_advice(model_name)}") from exc


def wants_imagenet(pretrained: Optional[str], model_name: str, available: bool = True, hint: str = "") -> bool:
    """Validate `pretrained` before building: True for hub weights (reachability already checked)."""
    if pretrained is None or pretrained == "":
        return False
    if not isinstance(pretrained, str):
        raise TypeError(f"pretrained for '{model_name}' must be None, 'imagenet' or a file path, got {pretrained!r}")
    if pretrained.lower() != IMAGENET:
        if not Path(pretrained).is_file():
            raise FileNotFoundError(f"pretrained weights file '{pretrained}' for '{model_name}' does not exist; "
                                    f"pass a local .pth file holding the encoder's state_dict, 'imagenet' or null")
        return False
    if not available:
        raise PretrainedWeightsError(f"no ImageNet weights are published for the '{model_name}' encoder in the "
                                     f"libraries this project uses; train from scratch (pretrained: null) or pass "
                                     f"a local file holding the encoder's state_dict{hint}")
    require_hub(model_name)
    return True


def _unwrap_checkpoint(obj: object, path: str) -> dict[str, torch.Tensor]:
    """The tensor mapping inside a weights file: a bare state_dict or one under `state_dict` / `model`."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PretrainedWeightsError(f"'{path}' does not hold a state_dict (a mapping of names to tensors)")
    return obj


def _strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def _align_keys(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map common checkpoint layouts onto the encoder's key names."""
    state = _strip_prefix(state, "module.")  # DistributedDataParallel
    if any(k.startswith("encoder.") for k in state):  # a whole-model checkpoint of this architecture
        state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    # smp wraps timm networks as `model.`: accept the bare timm network's checkpoint too
    prefix = "model."
    if expected and all(k.startswith(prefix) for k in expected) and not any(k.startswith(prefix) for k in state):
        state = {prefix + k: v for k, v in state.items()}
        drop = tuple(prefix + p for p in _CLASSIFIER_PREFIXES)
    else:
        drop = _CLASSIFIER_PREFIXES
    return {k: v for k, v in state.items() if k in expected or not k.startswith(drop)}


def _adapt_input_conv(weight: torch.Tensor, target: torch.Tensor) -> Optional[torch.Tensor]:
    """A first-layer kernel for another number of input channels (sum for 1 channel, tiled otherwise)."""
    if weight.dim() != 4 or weight.shape[0] != target.shape[0] or weight.shape[2:] != target.shape[2:]:
        return None
    have, need = weight.shape[1], target.shape[1]
    if need == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-need // have)
    return weight.repeat(1, repeats, 1, 1)[:, :need] * (have / need)


def load_encoder_weights(encoder: nn.Module, path: str, model_name: str) -> None:
    """Load a local state_dict file into `encoder`; every mismatch is reported by key before anything changes."""
    state = _unwrap_checkpoint(torch.load(path, map_location="cpu", weights_only=True), path)
    convert = getattr(encoder, "convert_state_dict", None)
    if callable(convert):  # encoders that also accept their reference implementation's key names
        state = convert(state)
    expected = encoder.state_dict()
    state = _align_keys(state, expected)
    problems = []
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    input_conv = next((k for k, v in expected.items() if v.dim() == 4), None)  # the first kernel sees the image
    for key in [k for k in expected if k in state and state[k].shape != expected[k].shape]:
        adapted = _adapt_input_conv(state[key], expected[key]) if key == input_conv else None
        if adapted is None:
            problems.append(f"{key}: file {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}")
        else:
            state[key] = adapted
    if missing:
        problems.append(f"{len(missing)} encoder keys missing from the file (e.g. {', '.join(missing[:4])})")
    if unexpected:
        problems.append(f"{len(unexpected)} keys in the file unknown to the encoder (e.g. {', '.join(unexpected[:4])})")
    if problems:
        raise PretrainedWeightsError(
            f"pretrained file '{path}' does not fit the '{model_name}' encoder ({type(encoder).__name__}): "
            f"{'; '.join(problems)}. Pass a state_dict of `model.encoder` of this model, e.g. saved with "
            f"torch.save(build_model('{model_name}').encoder.state_dict(), path)")
    nn.Module.load_state_dict(encoder, state, strict=True)  # the libraries' overrides only drop classifier keys


def init_pretrained(model: nn.Module, pretrained: Optional[str], model_name: str) -> None:
    """After construction: load a local encoder weights file when one was given."""
    if pretrained and pretrained.lower() != IMAGENET:
        load_encoder_weights(model.encoder, pretrained, model_name)
