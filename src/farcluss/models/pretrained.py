"""Checked loading of ImageNet backbone weights from a file, a URL or a registry name.

Every load is strict: after known layouts are mapped onto this project's parameter names and
the ImageNet classifier (``fc.*``) is dropped, any missing, unexpected or mis-shaped key is a
``CheckpointError`` that names it. Files are read with ``torch.load(weights_only=True)``, so a
checkpoint that needs arbitrary unpickling (and could run code) is refused.

Accepted layouts:
- torchvision (``conv1``, ``bn1``, ``layer1..4``, ``fc``);
- mmsegmentation ResNet-v1c (deep stem as ``stem.0/1/3/4/6/7``), identical to ours;
- UniMatch / PSPNet "deep base" (``conv1.0/1/3/4/6`` + ``bn1``), mapped onto ``stem.*``; these
  files have a 128-channel stem, so build the model with ``stem_width=128``;
- DINOv2 ViTs: the official ``dinov2_vit*14[_reg4]_pretrain.pth`` (our names; ``mask_token``, a
  pre-training parameter, is dropped) and the Hugging Face ``facebook/dinov2-*`` layout
  (``embeddings.*``, ``encoder.layer.N.*`` with separate query/key/value), mapped onto it;
each optionally wrapped as ``{"state_dict": ...}`` / ``{"model": ...}`` and with ``module.`` /
``backbone.`` (and Hugging Face's ``dinov2.``) key prefixes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import string
import urllib.parse
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from ..engine.checkpoint import read_torch_file
from ..errors import CheckpointError, one_line
from .resnet import ResNet
from .vit import VIT_SPECS, VisionTransformer, hf_to_official_keys, is_hf_layout

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainedWeights:
    """A downloadable backbone checkpoint and the architecture it fits."""

    url: str
    sha256: Optional[str]  # full hash or prefix; None where the publisher gives none
    depth: int
    deep_stem: bool
    stem_width: int
    description: str

    def architecture(self) -> str:
        return _architecture_name(self.depth, self.deep_stem, 64, self.stem_width)


@dataclass(frozen=True)
class ViTWeights:
    """A downloadable DINOv2 checkpoint and the variant (``models.vit.VIT_SPECS``) it fits."""

    url: str
    sha256: Optional[str]
    backbone: str
    description: str

    def architecture(self) -> str:
        return _vit_name(self.backbone, VIT_SPECS[self.backbone].embed_dim,
                         VIT_SPECS[self.backbone].depth)


_DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2"


def _dinov2_entry(size: str, registers: bool) -> ViTWeights:
    name = f"dinov2_vit{size}14"
    file = f"{name}_reg4_pretrain.pth" if registers else f"{name}_pretrain.pth"
    # Meta publishes no hashes for these files
    return ViTWeights(f"{_DINOV2_URL}/{name}/{file}", None, name + ("_reg" if registers else ""),
                      "DINOv2 LVD-142M" + (" with registers" if registers else ""))


PRETRAINED_WEIGHTS: Dict[str, Union[PretrainedWeights, ViTWeights]] = {
    # torchvision IMAGENET1K_V1; the 8 hex digits in the file name are the sha256 prefix
    "resnet18": PretrainedWeights("https://download.pytorch.org/models/resnet18-f37072fd.pth",
                                  "f37072fd", 18, False, 64, "torchvision ImageNet-1k"),
    "resnet34": PretrainedWeights("https://download.pytorch.org/models/resnet34-b627a593.pth",
                                  "b627a593", 34, False, 64, "torchvision ImageNet-1k"),
    "resnet50": PretrainedWeights("https://download.pytorch.org/models/resnet50-0676ba61.pth",
                                  "0676ba61", 50, False, 64, "torchvision ImageNet-1k"),
    "resnet101": PretrainedWeights("https://download.pytorch.org/models/resnet101-63fe2227.pth",
                                   "63fe2227", 101, False, 64, "torchvision ImageNet-1k"),
    # mmsegmentation ResNet-v1c (deep stem 32-32-64). OpenMMLab does not document the hash in
    # the name as sha256, so the files are not hash-checked unless the caller passes sha256.
    "resnet50c": PretrainedWeights(
        "https://download.openmmlab.com/pretrain/third_party/resnet50_v1c-2cccc1ad.pth",
        None, 50, True, 64, "mmsegmentation ResNet-50-v1c ImageNet-1k"),
    "resnet101c": PretrainedWeights(
        "https://download.openmmlab.com/pretrain/third_party/resnet101_v1c-e67eebb6.pth",
        None, 101, True, 64, "mmsegmentation ResNet-101-v1c ImageNet-1k"),
    **{entry.backbone: entry for entry in (_dinov2_entry(size, registers)
                                           for registers in (False, True)
                                           for size in ("s", "b", "l"))},
}

# UniMatch/PSPNet deep stem: Sequential(conv, bn, relu, conv, bn, relu, conv) named conv1, then
# a separate bn1; our stem is one Sequential(conv, bn, relu) x 3
_UNIMATCH_STEM_RENAMES = (("conv1.0.", "stem.0."), ("conv1.1.", "stem.1."),
                          ("conv1.3.", "stem.3."), ("conv1.4.", "stem.4."),
                          ("conv1.6.", "stem.6."), ("bn1.", "stem.7."))
_WRAPPER_KEYS = ("state_dict", "model")
_KEY_PREFIXES = ("module.", "backbone.")
_VIT_KEY_PREFIXES = ("module.", "backbone.", "dinov2.")
#: official DINOv2 parameters a segmentation encoder does not use (masked-image pre-training)
_VIT_DROPPED = ("mask_token",)
_CLASSIFIER_PREFIX = "fc."


def load_pretrained(model_or_backbone: nn.Module, source: Union[str, os.PathLike],
                    sha256: Optional[str] = None) -> dict:
    """Load backbone weights from a local file, an http(s) URL or a name in ``PRETRAINED_WEIGHTS``.

    Args:
        model_or_backbone: a ``ResNet`` or ``VisionTransformer``, or a model with one as
            ``.backbone`` (DeepLabV3Plus, DPT).
        source: file path, URL (downloaded once into ``torch.hub.get_dir()/checkpoints``) or name.
        sha256: expected sha256 of the file, full or a prefix; a registry entry supplies its own.

    Returns:
        a report: ``source``, ``file``, ``sha256`` (of the file), ``layout``, ``loaded_keys``
        (number of tensors loaded) and ``dropped_keys`` (the ImageNet classifier).

    Raises:
        CheckpointError: unknown source, failed download, hash mismatch, unsafe or unreadable
            file, or keys/shapes that do not match the backbone.
    """
    backbone = _find_backbone(model_or_backbone)
    source = os.fspath(source)
    if sha256 is not None:
        sha256 = _normalise_hash(sha256)

    local_path = os.path.expanduser(source)
    if os.path.isfile(local_path):
        path = local_path
    elif source.startswith(("http://", "https://")):
        path = _download(source, sha256)
    elif source in PRETRAINED_WEIGHTS:
        entry = PRETRAINED_WEIGHTS[source]
        _check_registry_fits(source, entry, backbone)
        sha256 = sha256 or entry.sha256
        path = _download(entry.url, sha256)
    else:
        raise CheckpointError(
            f"model.pretrained: {source!r} is neither an existing file, an http(s) URL nor a "
            f"known name ({', '.join(PRETRAINED_WEIGHTS)})")

    actual_sha256 = file_sha256(path)
    if sha256 is not None and not actual_sha256.startswith(sha256):
        raise CheckpointError(f"{path}: sha256 mismatch: expected {sha256}, got {actual_sha256}")

    raw_state = _read_tensor_dict(path)
    if isinstance(backbone, VisionTransformer):
        state, dropped, layout = _to_vit_keys(raw_state)
    else:
        state, dropped, layout = _to_backbone_keys(raw_state, path, backbone)
    _check_matches(state, path, backbone)
    backbone.load_state_dict(state, strict=True)
    logger.info("loaded %d backbone tensors from %s (%s layout, sha256 %s)",
                len(state), path, layout, actual_sha256[:12])
    return {"source": source, "file": path, "sha256": actual_sha256, "layout": layout,
            "loaded_keys": len(state), "dropped_keys": dropped}


def file_sha256(path: str) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _find_backbone(model_or_backbone: nn.Module) -> Union[ResNet, VisionTransformer]:
    backbone = getattr(model_or_backbone, "backbone", model_or_backbone)
    if not isinstance(backbone, (ResNet, VisionTransformer)):
        raise TypeError(f"expected a ResNet or VisionTransformer or a model with one as "
                        f".backbone, got {type(model_or_backbone).__name__}")
    return backbone


def _vit_name(backbone: str, embed_dim: int, depth: int) -> str:
    spec = VIT_SPECS[backbone]
    name = f"DINOv2 ViT/14 of width {embed_dim} and depth {depth}"
    return name + (f" with {spec.num_register_tokens} registers"
                   if spec.num_register_tokens else "")


def _to_vit_keys(raw_state: Dict[str, torch.Tensor]
                 ) -> Tuple[Dict[str, torch.Tensor], List[str], str]:
    """Prefixes stripped, the Hugging Face layout renamed, ``mask_token`` dropped."""
    state: Dict[str, torch.Tensor] = {}
    for key, tensor in raw_state.items():
        name = key
        stripped = True
        while stripped:
            stripped = False
            for prefix in _VIT_KEY_PREFIXES:
                if name.startswith(prefix):
                    name, stripped = name[len(prefix):], True
        state[name] = tensor
    layout = "DINOv2 official"
    if is_hf_layout(list(state)):
        state, layout = hf_to_official_keys(state), "Hugging Face DINOv2"
    dropped = [key for key in state if key in _VIT_DROPPED]
    for key in dropped:
        del state[key]
    return state, dropped, layout


def _architecture_name(depth: int, deep_stem: bool, base_width: int,
                       stem_width: Optional[int]) -> str:
    details = []
    if deep_stem:
        details.append(f"deep stem of width {stem_width}")
    if base_width != 64:
        details.append(f"base width {base_width}")
    return f"ResNet-{depth}" + (f" ({', '.join(details)})" if details else "")


def _backbone_name(backbone: Union[ResNet, VisionTransformer]) -> str:
    if isinstance(backbone, VisionTransformer):
        registers = backbone.spec.num_register_tokens
        return (f"DINOv2 ViT/14 of width {backbone.embed_dim} and depth {len(backbone.blocks)}"
                + (f" with {registers} registers" if registers else ""))
    return _architecture_name(backbone.depth, backbone.deep_stem, backbone.base_width,
                              backbone.stem_width)


def _normalise_hash(sha256: str) -> str:
    sha256 = sha256.strip().lower()
    if not sha256 or len(sha256) > 64 or any(c not in string.hexdigits for c in sha256):
        raise CheckpointError(f"sha256 {sha256!r} is not a hex digest or prefix of one")
    return sha256


def _check_registry_fits(name: str, entry: Union[PretrainedWeights, ViTWeights],
                         backbone: Union[ResNet, VisionTransformer]) -> None:
    # fail before a download of ~100 MB that could never load
    if isinstance(entry, ViTWeights) or isinstance(backbone, VisionTransformer):
        fits = (isinstance(entry, ViTWeights) and isinstance(backbone, VisionTransformer)
                and VIT_SPECS[entry.backbone] == backbone.spec)
        if not fits:
            raise CheckpointError(
                f"model.pretrained: {name!r} holds weights for {entry.architecture()}, but the "
                f"model backbone is {_backbone_name(backbone)}")
        return
    fits = (entry.depth == backbone.depth and entry.deep_stem == backbone.deep_stem
            and backbone.base_width == 64
            and (not entry.deep_stem or backbone.stem_width == entry.stem_width))
    if not fits:
        raise CheckpointError(
            f"model.pretrained: {name!r} holds weights for {entry.architecture()}, but the model "
            f"backbone is {_backbone_name(backbone)}")


def _download(url: str, sha256: Optional[str]) -> str:
    filename = os.path.basename(urllib.parse.urlparse(url).path) or "weights.pth"
    cache_dir = os.path.join(torch.hub.get_dir(), "checkpoints")
    path = os.path.join(cache_dir, filename)
    if os.path.isfile(path):
        return path
    os.makedirs(cache_dir, exist_ok=True)
    logger.info("downloading %s to %s", url, path)
    try:
        # writes to a temporary file and moves it into place only after the hash check
        torch.hub.download_url_to_file(url, path, hash_prefix=sha256, progress=True)
    except Exception as error:  # network, HTTP, disk and hash errors all end the same way
        raise CheckpointError(f"download failed: {one_line(error)}; "
                              f"pass a local file with model.pretrained=PATH") from error
    return path


def _read_tensor_dict(path: str) -> Dict[str, torch.Tensor]:

    # empty, truncated, corrupt, a text file or an image: one line that says which
    checkpoint = read_torch_file(path, "pretrained weights", "a PyTorch weights file")

    unwrapped = True
    while unwrapped and isinstance(checkpoint, dict):
        unwrapped = False
        for wrapper in _WRAPPER_KEYS:
            if isinstance(checkpoint.get(wrapper), dict):
                checkpoint, unwrapped = checkpoint[wrapper], True
                break
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a state dict")
    for key, value in checkpoint.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: key {key!r} is not a parameter name; expected a "
                                  f"state dict")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, "
                                  f"not a tensor; expected a state dict")
    return checkpoint


def _strip_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _KEY_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def _to_backbone_keys(raw_state: Dict[str, torch.Tensor], path: str, backbone: ResNet
                      ) -> Tuple[Dict[str, torch.Tensor], List[str], str]:
    """Rename known layouts onto the backbone's names; returns (state, dropped keys, layout)."""
    state: Dict[str, torch.Tensor] = {}
    dropped: List[str] = []
    for key, tensor in raw_state.items():
        name = _strip_prefixes(key)
        if name.startswith(_CLASSIFIER_PREFIX):
            dropped.append(key)
        else:
            state[name] = tensor

    file_has_unimatch_stem = "conv1.0.weight" in state
    file_has_mmseg_stem = "stem.0.weight" in state
    file_has_deep_stem = file_has_unimatch_stem or file_has_mmseg_stem
    if backbone.deep_stem and not file_has_deep_stem and "conv1.weight" in state:
        raise CheckpointError(f"{path} has a 7x7 stem (conv1.weight) but the model has a deep "
                              f"stem; set model.deep_stem=false")
    if not backbone.deep_stem and file_has_deep_stem:
        raise CheckpointError(f"{path} has a deep (3x3 x3) stem but the model has a 7x7 stem; "
                              f"set model.deep_stem=true")

    layout = "torchvision"
    if file_has_mmseg_stem:
        layout = "mmseg v1c"
    elif file_has_unimatch_stem:
        layout = "UniMatch deep stem"
        renamed = {}
        for name, tensor in state.items():
            for old, new in _UNIMATCH_STEM_RENAMES:
                if name.startswith(old):
                    name = new + name[len(old):]
                    break
            renamed[name] = tensor
        state = renamed
    return state, dropped, layout


def _format_keys(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _check_matches(state: Dict[str, torch.Tensor], path: str,
                   backbone: Union[ResNet, VisionTransformer]) -> None:
    if isinstance(backbone, ResNet) and backbone.deep_stem and "stem.6.weight" in state:
        # a stem of another width also changes layer1's input, so say this before listing keys
        file_stem_width = state["stem.6.weight"].shape[0]
        if file_stem_width != backbone.stem_width:
            raise CheckpointError(f"{path} has a deep stem of width {file_stem_width} but the "
                                  f"model's is {backbone.stem_width}; set "
                                  f"model.stem_width={file_stem_width}")
    expected = backbone.state_dict()
    # BatchNorm fills in a missing step counter itself; older torchvision files lack it
    missing = [key for key in expected
               if key not in state and not key.endswith("num_batches_tracked")]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_format_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_format_keys(unexpected)}")
        raise CheckpointError(f"{path} does not match the {_backbone_name(backbone)} backbone: "
                              + "; ".join(parts))
    for key, tensor in state.items():
        want = expected[key].shape
        if tensor.shape != want:
            raise CheckpointError(f"{path}: {key} has shape {tuple(tensor.shape)} in the file "
                                  f"but {tuple(want)} in the model")
