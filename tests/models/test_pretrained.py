import hashlib
import shutil
import urllib.error

import pytest
import torch

from farcluss.errors import CheckpointError
from farcluss.models import build_model
from farcluss.models.deeplab import DeepLabV3Plus
from farcluss.models.pretrained import load_pretrained
from farcluss.models.resnet import resnet


def tiny_backbone(seed, **kwargs):
    torch.manual_seed(seed)
    backbone = resnet(kwargs.pop("depth", 18), base_width=8, **kwargs)
    # random BN statistics, so a load that skipped the buffers would be caught
    for name, buffer in backbone.named_buffers():
        if "running" in name:
            buffer.uniform_(0.5, 1.5)
    return backbone


def torchvision_state(backbone):
    """The backbone's weights as torchvision saves them: with the ImageNet classifier."""
    state = dict(backbone.state_dict())
    state["fc.weight"] = torch.randn(1000, backbone.out_channels[3])
    state["fc.bias"] = torch.randn(1000)
    return state


def assert_same_weights(loaded, reference):
    reference_state = reference.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, reference_state[key]), key


def test_torchvision_layout_round_trips(tmp_path):
    source = tiny_backbone(seed=1)
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision_state(source), path)
    target = tiny_backbone(seed=2)
    report = load_pretrained(target, str(path))
    assert_same_weights(target, source)
    assert sorted(report["dropped_keys"]) == ["fc.bias", "fc.weight"]
    assert report["loaded_keys"] == len(source.state_dict())
    assert report["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_wrapped_and_module_prefixed_state_loads_into_deeplab(tmp_path):
    source = tiny_backbone(seed=1)
    state = {"module." + key: value for key, value in torchvision_state(source).items()}
    path = tmp_path / "ddp.pth"
    torch.save({"state_dict": state, "epoch": 90}, path)
    model = DeepLabV3Plus(3, backbone="resnet18", base_width=8)
    head_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("aspp")}
    load_pretrained(model, path)
    assert_same_weights(model.backbone, source)
    for key, value in head_before.items():
        assert torch.equal(model.state_dict()[key], value)


def test_a_built_model_loads_a_pretrained_file(tmp_path):
    source = tiny_backbone(seed=1)
    path = tmp_path / "weights.pth"
    torch.save({"model": {"backbone." + k: v for k, v in source.state_dict().items()}}, path)
    model = build_model(3, backbone="resnet18", base_width=8)
    load_pretrained(model, str(path))
    assert_same_weights(model.backbone, source)


def test_missing_key_fails_naming_it(tmp_path):
    state = torchvision_state(tiny_backbone(seed=1))
    del state["layer2.0.conv1.weight"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"missing keys: layer2\.0\.conv1\.weight"):
        load_pretrained(tiny_backbone(seed=2), path)


def test_unexpected_key_fails_naming_it(tmp_path):
    state = torchvision_state(tiny_backbone(seed=1))
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    path = tmp_path / "extra.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"unexpected keys: layer5\.0\.conv1\.weight"):
        load_pretrained(tiny_backbone(seed=2), path)


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
    state = torchvision_state(tiny_backbone(seed=1))
    state["layer1.0.conv1.weight"] = torch.zeros(8, 8, 1, 1)
    path = tmp_path / "shapes.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as caught:
        load_pretrained(tiny_backbone(seed=2), path)
    message = str(caught.value)
    assert "layer1.0.conv1.weight" in message
    assert "(8, 8, 1, 1)" in message and "(8, 8, 3, 3)" in message


def test_sha256_is_checked(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save(torchvision_state(tiny_backbone(seed=1)), path)
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    load_pretrained(tiny_backbone(seed=2), path, sha256=actual[:8].upper())
    wrong = "0" * 64 if not actual.startswith("0") else "1" * 64
    with pytest.raises(CheckpointError) as caught:
        load_pretrained(tiny_backbone(seed=2), path, sha256=wrong)
    message = str(caught.value)
    assert "weights.pth" in message and wrong in message and actual in message


def test_unimatch_deep_stem_maps_onto_stem(tmp_path):
    source = tiny_backbone(seed=1, depth=50, deep_stem=True)
    # UniMatch: conv1 = Sequential(conv, bn, relu, conv, bn, relu, conv), then a separate bn1
    renames = {"stem.0.": "conv1.0.", "stem.1.": "conv1.1.", "stem.3.": "conv1.3.",
               "stem.4.": "conv1.4.", "stem.6.": "conv1.6.", "stem.7.": "bn1."}
    state = {}
    for key, value in torchvision_state(source).items():
        for ours, theirs in renames.items():
            if key.startswith(ours):
                key = theirs + key[len(ours):]
        state[key] = value
    assert "conv1.6.weight" in state and "bn1.running_mean" in state
    path = tmp_path / "resnet50.pth"
    torch.save(state, path)
    target = tiny_backbone(seed=2, depth=50, deep_stem=True)
    report = load_pretrained(target, path)
    assert_same_weights(target, source)
    assert report["layout"] == "UniMatch deep stem"


def test_mmseg_v1c_layout_loads_unchanged(tmp_path):
    source = tiny_backbone(seed=1, depth=50, deep_stem=True)
    path = tmp_path / "resnet50_v1c.pth"
    torch.save({"meta": {"epoch": 100}, "state_dict": torchvision_state(source)}, path)
    target = tiny_backbone(seed=2, depth=50, deep_stem=True)
    assert load_pretrained(target, path)["layout"] == "mmseg v1c"
    assert_same_weights(target, source)


def test_stem_kind_mismatch_says_which_setting_to_change(tmp_path):
    path = tmp_path / "deep.pth"
    torch.save(tiny_backbone(seed=1, deep_stem=True).state_dict(), path)
    with pytest.raises(CheckpointError, match="model.deep_stem=true"):
        load_pretrained(tiny_backbone(seed=2), path)
    wide_path = tmp_path / "wide_stem.pth"
    torch.save(tiny_backbone(seed=1, deep_stem=True, stem_width=16).state_dict(), wide_path)
    with pytest.raises(CheckpointError, match="model.stem_width=16"):
        load_pretrained(tiny_backbone(seed=2, deep_stem=True), wide_path)


class CodeExecutingPayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "extra": CodeExecutingPayload(marker)}, path)
    with pytest.raises(CheckpointError, match="refusing to load .*evil.pth.*not a plain tensor"):
        load_pretrained(tiny_backbone(seed=2), path)
    assert not marker.exists()
    # control: the payload is live, an unrestricted load does run it
    torch.load(path, weights_only=False)
    assert marker.read_text() == "ran"


def test_url_is_downloaded_once_into_the_hub_cache(tmp_path, monkeypatch):
    source = tiny_backbone(seed=1)
    local = tmp_path / "served.pth"
    torch.save(torchvision_state(source), local)
    hub_dir = tmp_path / "hub"
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, dst, hash_prefix))
        shutil.copyfile(local, dst)

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub_dir))
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    url = "https://example.com/models/resnet18-tiny.pth"
    sha = hashlib.sha256(local.read_bytes()).hexdigest()[:10]
    target = tiny_backbone(seed=2)
    report = load_pretrained(target, url, sha256=sha)
    load_pretrained(tiny_backbone(seed=3), url, sha256=sha)
    cached = hub_dir / "checkpoints" / "resnet18-tiny.pth"
    assert calls == [(url, str(cached), sha)]
    assert report["file"] == str(cached)
    assert_same_weights(target, source)


def test_registry_name_downloads_its_url_with_its_hash(tmp_path, monkeypatch):
    calls = []

    def unreachable(url, dst, hash_prefix=None, progress=True):
        calls.append((url, hash_prefix))
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    with pytest.raises(CheckpointError) as caught:
        load_pretrained(resnet(18), "resnet18")
    message = str(caught.value)
    assert calls == [("https://download.pytorch.org/models/resnet18-f37072fd.pth", "f37072fd")]
    assert message.startswith("download failed: ")
    assert "name resolution" in message
    assert message.endswith("pass a local file with model.pretrained=PATH")
    assert "\n" not in message


def test_registry_name_for_another_architecture_fails_before_download(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(CheckpointError, match="'resnet50c'.*ResNet-18"):
        load_pretrained(tiny_backbone(seed=0), "resnet50c")


def test_unknown_source_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="model.pretrained.*no_such_file.pth"):
        load_pretrained(tiny_backbone(seed=0), str(tmp_path / "no_such_file.pth"))


# ---- DINOv2 ------------------------------------------------------------------------------------
def tiny_dpt(seed, backbone="dinov2_vits14"):
    torch.manual_seed(seed)
    return build_model(3, backbone, vit_embed_dim=32, vit_depth=2)


def official_dinov2_state(model):
    """The encoder's weights as Meta's ``dinov2_vit*14_pretrain.pth`` holds them."""
    state = dict(model.backbone.state_dict())
    state["mask_token"] = torch.zeros(1, model.backbone.embed_dim)
    return state


def hf_dinov2_state(model):
    """The same weights in the Hugging Face ``Dinov2Model`` layout (``facebook/dinov2-*``)."""
    official = model.backbone.state_dict()
    hf = {"embeddings.cls_token": official["cls_token"],
          "embeddings.mask_token": torch.zeros(1, model.backbone.embed_dim),
          "embeddings.position_embeddings": official["pos_embed"],
          "layernorm.weight": official["norm.weight"], "layernorm.bias": official["norm.bias"]}
    for kind in ("weight", "bias"):
        hf[f"embeddings.patch_embeddings.projection.{kind}"] = official[f"patch_embed.proj.{kind}"]
    for i in range(len(model.backbone.blocks)):
        b, e = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            for part, tensor in zip(("query", "key", "value"),
                                    official[b + f"attn.qkv.{kind}"].chunk(3)):
                hf[e + f"attention.attention.{part}.{kind}"] = tensor
            hf[e + f"attention.output.dense.{kind}"] = official[b + f"attn.proj.{kind}"]
            for part in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                hf[e + f"{part}.{kind}"] = official[b + f"{part}.{kind}"]
        hf[e + "layer_scale1.lambda1"] = official[b + "ls1.gamma"]
        hf[e + "layer_scale2.lambda1"] = official[b + "ls2.gamma"]
    return hf


@pytest.mark.parametrize("layout,make", [("DINOv2 official", official_dinov2_state),
                                         ("Hugging Face DINOv2", hf_dinov2_state)])
def test_dinov2_layouts_load_strictly(tmp_path, layout, make):
    source, target = tiny_dpt(seed=1), tiny_dpt(seed=2)
    path = tmp_path / "dinov2.pth"
    torch.save({"model": make(source)}, path)
    report = load_pretrained(target, path)
    assert report["layout"] == layout
    assert report["dropped_keys"] == ["mask_token"]
    assert_same_weights(target.backbone, source.backbone)
    # the head is not touched
    assert not torch.equal(target.classifier.weight, source.classifier.weight)


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.pop("blocks.1.ls2.gamma"), "missing keys: blocks.1.ls2.gamma"),
    (lambda s: s.update({"blocks.2.norm1.weight": torch.ones(32)}),
     "unexpected keys: blocks.2.norm1.weight"),
    (lambda s: s.update({"pos_embed": torch.zeros(1, 257, 32)}), r"pos_embed has shape \(1, 257, 32\)"),
])
def test_dinov2_key_errors_name_the_keys(tmp_path, edit, message):
    state = official_dinov2_state(tiny_dpt(seed=1))
    edit(state)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=message) as caught:
        load_pretrained(tiny_dpt(seed=2), tmp_path / "bad.pth")
    assert "\n" not in str(caught.value)


def test_a_resnet_file_into_a_vit_names_the_keys(tmp_path):
    torch.save(torchvision_state(tiny_backbone(seed=0)), tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match="DINOv2 ViT/14.*missing keys: blocks.0"):
        load_pretrained(tiny_dpt(seed=0), tmp_path / "resnet.pth")


def test_dinov2_registry_has_the_official_urls(tmp_path, monkeypatch):
    calls = []

    def unreachable(url, dst, hash_prefix=None, progress=True):
        calls.append(url)
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    for name, file in [("dinov2_vitb14", "dinov2_vitb14/dinov2_vitb14_pretrain.pth"),
                       ("dinov2_vitl14_reg", "dinov2_vitl14/dinov2_vitl14_reg4_pretrain.pth")]:
        with pytest.raises(CheckpointError, match="download failed"):
            load_pretrained(_full_width_stub(name), name)
        assert calls[-1] == f"https://dl.fbaipublicfiles.com/dinov2/{file}"
    # a tiny ViT is not the registry's variant: refused before any download
    with pytest.raises(CheckpointError, match="'dinov2_vits14' holds weights for DINOv2"):
        load_pretrained(tiny_dpt(seed=0), "dinov2_vits14")
    assert len(calls) == 2


def _full_width_stub(name):
    """A ViT with the registry spec (checked before the download) but no weights allocated."""
    from farcluss.models.vit import VIT_SPECS, VisionTransformer

    with torch.device("meta"):
        return VisionTransformer(VIT_SPECS[name])
