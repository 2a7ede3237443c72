"""Self-supervised teachers in their repositories' checkpoint layouts (fkd_dali/ssl_teachers.py).

Each checkpoint is built here from a real torchvision ResNet with random weights and random BatchNorm statistics,
in the exact key layout its repository saves (on a ResNet-18 to stay fast: the loader reads the ResNet from the
keys; MoCo v2's released ResNet-50 once, marked slow), saved with torch.save and loaded through the loader. The
reference is the backbone and head built directly from the same modules; the parts a format drops (MoCo's key
encoder and queue, MoCo v3's momentum encoder and predictor, SwAV's prototypes, DINO's student and last layer) hold
other weights, so a loader that used them would give other embeddings.
"""

from __future__ import annotations

import argparse
import copy
import os
import re

import pytest
import torch
import torchvision
from torch import nn

from fkd_dali.ssl_teachers import EmbeddingTeacherSpec, load_embedding_teacher, parse_embedding_teacher
from fkd_dali.teachers import TeacherError

torch.manual_seed(0)
X = torch.randn(3, 3, 32, 32)


def _random_bn(module: nn.Module) -> nn.Module:
    """BatchNorm statistics and affines away from their defaults, so a loader that lost them is caught."""
    g = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
    return module.eval()


def _other(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Other weights of the same shapes (a key encoder, a student): different from the ones to use."""
    return {k: (v + 0.5 if v.is_floating_point() else v.clone()) for k, v in state.items()}


def _prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


def _ref(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return nn.functional.normalize(model.eval()(X), dim=1)


def _resnet(arch: str, fc: nn.Module) -> nn.Module:
    torch.manual_seed(2)
    model = torchvision.models.get_model(arch, weights=None)
    model.fc = fc
    return _random_bn(model)


def _check(teacher, reference: torch.Tensor, dim: int, fmt: str, arch: str) -> None:
    with torch.no_grad():
        out = teacher(X)
    assert out.dtype == torch.float32 and out.shape == (len(X), dim)
    assert torch.allclose(out, reference, atol=1e-5), (out - reference).abs().max()
    assert torch.allclose(out.norm(dim=1), torch.ones(len(X)), atol=1e-5)
    info = teacher.describe()
    assert teacher.dim == dim and info["dim"] == dim and info["format"] == fmt and info["arch"] == arch
    assert info["sha256"].startswith("sha256:") and os.path.isabs(info["source"])
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training


def _moco_v2(folder, arch: str, width: int) -> tuple[str, dict, torch.Tensor]:
    """facebookresearch/moco's main_moco.py checkpoint with --mlp (MoCo v2), as S2-BNN's teacher."""
    q = _resnet(arch, nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 128)))
    state = _prefixed("module.encoder_q.", q.state_dict()) | _prefixed("module.encoder_k.", _other(q.state_dict()))
    state |= {"module.queue": nn.functional.normalize(torch.randn(128, 64), dim=0),
              "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    path = str(folder / "moco_v2_800ep_pretrain.pth.tar")
    torch.save({"epoch": 800, "arch": arch, "state_dict": state, "optimizer": {"state": {}, "param_groups": []}},
               path)
    return path, state, _ref(q)


@pytest.fixture(scope="module")
def moco_v2(tmp_path_factory):
    return _moco_v2(tmp_path_factory.mktemp("moco"), "resnet18", 512)


@pytest.mark.slow  # a ResNet-50 (~100 MB twice: query and key encoders) written and read
def test_moco_v2s_released_resnet50_checkpoint_gives_the_query_encoders_normalised_128d_output(tmp_path):
    path, _, reference = _moco_v2(tmp_path, "resnet50", 2048)
    _check(load_embedding_teacher(path), reference, 128, "moco_v2", "resnet50")


def test_moco_v2_checkpoint_gives_the_query_encoders_normalised_128d_output(moco_v2):
    path, _, reference = moco_v2
    teacher = load_embedding_teacher(path)
    _check(teacher, reference, 128, "moco_v2", "resnet18")
    dropped = " ".join(teacher.describe()["dropped"])
    assert "encoder_k.*" in dropped and "queue (1)" in dropped and "queue_ptr (1)" in dropped


def test_moco_missing_keys_are_named(moco_v2, tmp_path):
    path, state, _ = moco_v2
    for key in ("module.encoder_q.layer1.0.bn1.running_mean", "module.encoder_q.fc.2.weight"):
        broken = {k: v for k, v in state.items() if k != key}
        p = str(tmp_path / "broken.pth.tar")
        torch.save({"state_dict": broken}, p)
        with pytest.raises(TeacherError, match=key[len("module."):].replace(".", r"\.")):
            load_embedding_teacher(p)
    # the whole last layer gone: not a shorter MoCo v2 head (fc.0 alone would give 512-d embeddings)
    broken = {k: v for k, v in state.items() if not k.startswith("module.encoder_q.fc.2.")}
    torch.save({"state_dict": broken}, p)
    with pytest.raises(TeacherError, match=r"encoder_q\.fc is encoder_q\.fc\.0 Linear\(512, 512\).*fc\.2 Linear.*: "
                                           r"encoder_q\.fc\.2\.weight, encoder_q\.fc\.2\.bias missing"):
        load_embedding_teacher(p)


@pytest.fixture(scope="module")
def moco_v1(tmp_path_factory):
    q = _resnet("resnet18", nn.Linear(512, 128))
    state = _prefixed("module.encoder_q.", q.state_dict()) | _prefixed("module.encoder_k.", _other(q.state_dict()))
    state |= {"module.queue": torch.randn(128, 32), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    path = str(tmp_path_factory.mktemp("moco1") / "moco_v1_200ep_pretrain.pth.tar")
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": state}, path)
    q_features = copy.deepcopy(q)
    q_features.fc = nn.Identity()
    return path, _ref(q), _ref(q_features)


def test_moco_v1_checkpoint_and_its_pooled_features(moco_v1):
    path, reference, features = moco_v1
    _check(load_embedding_teacher(path), reference, 128, "moco_v1", "resnet18")
    teacher = load_embedding_teacher(EmbeddingTeacherSpec(path, head="none"))
    _check(teacher, features, 512, "moco_v1", "resnet18")
    assert "pooled features" in teacher.describe()["embedding"]


def _mlp(num_layers: int, dim_in: int, hidden: int, dim_out: int, last_bn: bool = True) -> nn.Sequential:
    """MoCo v3's _build_mlp (facebookresearch/moco-v3 moco/builder.py), written again."""
    layers = []
    for i in range(num_layers):
        a, b = dim_in if i == 0 else hidden, dim_out if i == num_layers - 1 else hidden
        layers.append(nn.Linear(a, b, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(b, affine=False))
    return nn.Sequential(*layers)


def _moco_v3(folder) -> tuple[str, dict, torch.Tensor]:
    """facebookresearch/moco-v3's main_moco.py checkpoint of MoCo_ResNet (projector in base_encoder.fc)."""
    base = _resnet("resnet18", _mlp(2, 512, 64, 32))
    state = _prefixed("module.base_encoder.", base.state_dict())
    state |= _prefixed("module.momentum_encoder.", _other(base.state_dict()))
    state |= _prefixed("module.predictor.", _random_bn(_mlp(2, 32, 64, 32, last_bn=False)).state_dict())
    path = str(folder / "r-50-1000ep.pth.tar")
    torch.save({"epoch": 1000, "arch": "resnet18", "state_dict": state, "optimizer": {}, "scaler": {"scale": 1.0}},
               path)
    return path, state, _ref(base)


def test_moco_v3_resnet_checkpoint_gives_the_base_encoders_projector_output(tmp_path):
    path, _, reference = _moco_v3(tmp_path)
    teacher = load_embedding_teacher(path)
    _check(teacher, reference, 32, "moco_v3", "resnet18")
    dropped = " ".join(teacher.describe()["dropped"])
    assert "momentum_encoder.*" in dropped and "predictor.*" in dropped


def test_vision_transformer_checkpoints_are_refused_by_name(tmp_path):
    vit = {"cls_token": torch.zeros(1, 1, 8), "pos_embed": torch.zeros(1, 5, 8),
           "patch_embed.proj.weight": torch.zeros(8, 3, 16, 16), "blocks.0.norm1.weight": torch.zeros(8)}
    path = str(tmp_path / "vit.pth")
    for name, content in [("MoCo v3 vit-b-300ep.pth.tar", {"state_dict": _prefixed("module.base_encoder.", vit)}),
                          ("DINO's full checkpoint", _dino_file(_prefixed("backbone.", vit))),
                          ("dino_deitsmall16_pretrain.pth", vit)]:
        torch.save(content, path)
        with pytest.raises(TeacherError, match=r"holds a Vision Transformer \((module\.)?(base_encoder\.|backbone\.)?"
                                               r"cls_token, \.\.\.\): only ResNet teachers"):
            load_embedding_teacher(path)


def _swav(tmp_path, hidden: bool = True) -> tuple[str, dict, torch.Tensor]:
    """facebookresearch/swav's released file: a bare state_dict under DDP's module. (src/resnet50.py's keys)."""
    backbone = _resnet("resnet18", nn.Identity())
    head = _random_bn(nn.Sequential(nn.Linear(512, 64), nn.BatchNorm1d(64), nn.ReLU(inplace=True), nn.Linear(64, 32))
                      if hidden else nn.Linear(512, 32))
    state = backbone.state_dict() | _prefixed("projection_head.", head.state_dict())
    state |= {"prototypes.weight": torch.randn(100, 32)}
    path = str(tmp_path / f"swav_800ep_pretrain{hidden}.pth.tar")
    state = _prefixed("module.", state)
    torch.save(state, path)
    return path, state, _ref(nn.Sequential(backbone, head))


@pytest.mark.parametrize("hidden", [True, False], ids=["mlp head", "linear head"])
def test_swav_checkpoint_gives_the_normalised_projection(tmp_path, hidden):
    path, _, reference = _swav(tmp_path, hidden)
    teacher = load_embedding_teacher(path)
    _check(teacher, reference, 32, "swav", "resnet18")
    assert "prototypes.* (1)" in teacher.describe()["dropped"]


class _DINOHead(nn.Module):
    """DINOHead's keys (facebookresearch/dino vision_transformer.py): mlp (Linear, [BN], GELU, ..., Linear) and a
    weight-normalised last_layer (weight_g, weight_v)."""

    def __init__(self, dim_in: int, hidden: int, bottleneck: int, out: int, use_bn: bool):
        super().__init__()
        layers = [nn.Linear(dim_in, hidden)] + ([nn.BatchNorm1d(hidden)] if use_bn else []) + [nn.GELU()]
        layers += [nn.Linear(hidden, hidden)] + ([nn.BatchNorm1d(hidden)] if use_bn else []) + [nn.GELU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(hidden, bottleneck))
        self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck, out, bias=False))

    def forward(self, x):  # the embedding: the bottleneck, normalised (DINOHead normalises it too)
        return self.mlp(x)


def _dino(folder, use_bn: bool = False) -> tuple[str, dict, torch.Tensor]:
    """facebookresearch/dino's main_dino.py full checkpoint of a ResNet (teacher under DDP: module.)."""
    backbone = _resnet("resnet18", nn.Identity())
    head = _random_bn(_DINOHead(512, 64, 32, 100, use_bn))
    state = _prefixed("module.backbone.", backbone.state_dict()) | _prefixed("module.head.", head.state_dict())
    assert "module.head.last_layer.weight_g" in state
    path = str(folder / "dino_resnet50_pretrain_full_checkpoint.pth")
    torch.save(_dino_file(state), path)
    return path, state, _ref(nn.Sequential(backbone, head))


def _dino_file(teacher: dict) -> dict:
    return {"student": _other(teacher), "teacher": teacher, "optimizer": {}, "epoch": 100,
            "args": argparse.Namespace(arch="resnet18", out_dim=100, global_crops_scale=(0.14, 1.0)),
            "dino_loss": {"center": torch.zeros(1, 100)}}


@pytest.mark.parametrize("use_bn", [False, True], ids=["head without BN", "use_bn_in_head"])
def test_dino_full_checkpoint_gives_the_teacher_heads_normalised_bottleneck(tmp_path, use_bn):
    path, _, reference = _dino(tmp_path, use_bn)
    teacher = load_embedding_teacher(path)
    _check(teacher, reference, 32, "dino", "resnet18")
    dropped = " ".join(teacher.describe()["dropped"])
    assert "head.*" in dropped and "student (top level)" in dropped


MISSING = {  # per format: a backbone key and a head key, each refused by name when absent
    "moco_v3": (_moco_v3, lambda state: {"state_dict": state}, "base_encoder.layer4.1.conv2.weight",
                ("base_encoder.fc.4.running_var", "base_encoder.fc.3.weight")),
    "swav": (_swav, lambda state: state, "bn1.running_var", ("projection_head.1.weight", "projection_head.3.bias")),
    "dino": (_dino, _dino_file, "backbone.layer2.0.downsample.0.weight", ("head.mlp.0.bias", "head.mlp.4.weight")),
}


@pytest.mark.parametrize("fmt", MISSING)
def test_a_missing_key_is_refused_naming_it(tmp_path, fmt):
    build, wrap, backbone_key, head_keys = MISSING[fmt]
    _, state, _ = build(tmp_path)
    path = str(tmp_path / "broken.pth")
    for key in (backbone_key, *head_keys):
        torch.save(wrap({k: v for k, v in state.items() if k != "module." + key}), path)
        with pytest.raises(TeacherError, match=re.escape(key)):
            load_embedding_teacher(path)


def test_a_backbone_alone_gives_its_pooled_features(tmp_path):
    backbone = _resnet("resnet18", nn.Identity())
    path = str(tmp_path / "dino_resnet50_pretrain.pth")
    torch.save(backbone.state_dict(), path)  # DINO's backbone-only file: torchvision keys, no fc
    _check(load_embedding_teacher(path), _ref(backbone), 512, "backbone", "resnet18")


def test_a_torchvision_backbone_with_the_users_head(tmp_path):
    model = _resnet("resnet18", nn.Sequential(nn.Linear(512, 64), nn.ReLU(), nn.Linear(64, 16)))
    path = str(tmp_path / "simclr_r18.pth")
    torch.save({"state_dict": model.state_dict()}, path)
    teacher = load_embedding_teacher(parse_embedding_teacher(f"resnet18:{path}", head="mlp:512-64-16"))
    _check(teacher, _ref(model), 16, "torchvision", "resnet18")
    with pytest.raises(TeacherError, match="has widths 512-64-16, not mlp:512-128-16; give head mlp:512-64-16"):
        load_embedding_teacher(parse_embedding_teacher(f"resnet18:{path}", head="mlp:512-128-16"))
    with pytest.raises(TeacherError, match="needs a head: 'none'"):
        load_embedding_teacher(parse_embedding_teacher(f"resnet18:{path}"))
    with pytest.raises(TeacherError, match="head 'mlp:512x16' is not understood"):
        load_embedding_teacher(parse_embedding_teacher(f"resnet18:{path}", head="mlp:512x16"))
    features = load_embedding_teacher(parse_embedding_teacher(f"resnet18:{path}", head="none"))
    model.fc = nn.Identity()
    _check(features, _ref(model), 512, "torchvision", "resnet18")
    assert "fc.* (4)" in features.describe()["dropped"]

    # the head somewhere else (@PREFIX), the file's classifier dropped
    head = nn.Sequential(nn.Linear(512, 8))
    state = model.state_dict() | _prefixed("projector.", head.state_dict()) | {"fc.weight": torch.randn(10, 512),
                                                                               "fc.bias": torch.zeros(10)}
    torch.save(state, path)
    teacher = load_embedding_teacher(parse_embedding_teacher(f"resnet18:{path}", head="mlp:512-8@projector"))
    _check(teacher, _ref(nn.Sequential(model, head)), 8, "torchvision", "resnet18")
    assert "fc.* (2)" in teacher.describe()["dropped"]
    with pytest.raises(TeacherError, match=r"2 key\(s\) the resnet18 backbone does not have: projector\.0\.weight"):
        load_embedding_teacher(parse_embedding_teacher(f"resnet18:{path}", head="none"))  # not silently ignored


def test_an_official_format_refuses_a_users_mlp_head(moco_v1):
    with pytest.raises(TeacherError, match="moco_v1 checkpoint with its own head .*give no head, or 'none'"):
        load_embedding_teacher(EmbeddingTeacherSpec(moco_v1[0], head="mlp:512-128"))


def test_an_unknown_layout_is_refused_naming_its_keys_and_the_known_formats(tmp_path):
    path = str(tmp_path / "byol.pth")
    torch.save({"online_network.encoder.conv.weight": torch.zeros(2), "online_network.encoder.bn.weight":
                torch.zeros(2), "projector.0.weight": torch.zeros(2, 2), "temperature": torch.zeros(())}, path)
    with pytest.raises(TeacherError) as e:
        load_embedding_teacher(path)
    msg = str(e.value)
    assert path in msg and "online_network.* (2), projector.* (1), temperature (1)" in msg, msg
    assert all(f in msg for f in ("MoCo v1/v2 (encoder_q.*", "MoCo v3", "SwAV", "DINO", "ARCH:PATH")), msg

    classifier = torchvision.models.resnet18(num_classes=10)
    torch.save(classifier.state_dict(), path)
    with pytest.raises(TeacherError, match=r"holds a classifier \(fc.weight \(10, 512\)\).*head 'none'"):
        load_embedding_teacher(path)


def test_a_widened_swav_resnet_is_refused_by_name(tmp_path):
    wide = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}
    wide["conv1.weight"] = torch.zeros(128, 3, 7, 7)
    path = str(tmp_path / "swav_RN50w2_400ep_pretrain.pth.tar")
    torch.save(_prefixed("module.", wide | {"projection_head.weight": torch.zeros(8, 512)}), path)
    with pytest.raises(TeacherError, match="128 stem filters.*RN50-w2/w4/w5 are not torchvision"):
        load_embedding_teacher(path)


def test_a_code_bearing_pickle_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = str(tmp_path / "moco_v2_800ep_pretrain.pth.tar")
    torch.save({"state_dict": {"module.encoder_q.conv1.weight": Evil()}}, path)
    with pytest.raises(TeacherError, match=r"refused for safety: it holds code-bearing Python objects \(posix.system"):
        load_embedding_teacher(path)
    assert not marker.exists()
    with pytest.raises(TeacherError, match="does not exist"):
        load_embedding_teacher(str(tmp_path / "missing.pth"))
    with open(path, "wb") as f:
        f.write(b"PK\x03\x04 truncated")
    with pytest.raises(TeacherError, match="cannot be read as a checkpoint.*download it again"):
        load_embedding_teacher(path)


def test_an_ensemble_averages_normalised_embeddings_and_refuses_two_sizes(tmp_path, moco_v1):
    swav, _, swav_ref = _swav(tmp_path)
    moco_path, moco_ref, moco_features = moco_v1
    # one 32-d MoCo v1 (its fc 512 -> 32) beside SwAV's 32-d projection
    q = _resnet("resnet18", nn.Linear(512, 32))
    moco32 = str(tmp_path / "moco32.pth.tar")
    torch.save({"state_dict": _prefixed("module.encoder_q.", q.state_dict())}, moco32)
    ensemble = load_embedding_teacher([swav, moco32])
    with torch.no_grad():
        out = ensemble(X)
    expected = nn.functional.normalize((swav_ref + _ref(q)) / 2, dim=1)
    assert ensemble.dim == 32 and torch.allclose(out, expected, atol=1e-5)
    assert [m["format"] for m in ensemble.describe()["members"]] == ["swav", "moco_v1"]

    with pytest.raises(TeacherError, match=f"different sizes: swav resnet18 \\({swav}\\) 32-d, moco_v1 resnet18 "
                                           f"\\({moco_path}\\) 128-d"):
        load_embedding_teacher([swav, moco_path])


def test_an_unknown_architecture_prefix_is_refused(tmp_path):
    with pytest.raises(TeacherError, match="'resnet5000' in 'resnet5000:x.pth' is not a torchvision architecture"):
        parse_embedding_teacher("resnet5000:x.pth")
    assert parse_embedding_teacher("/data/a:b.pth").path == "/data/a:b.pth"


@pytest.mark.gpu
def test_a_teacher_on_the_gpu_gives_the_cpus_embeddings(moco_v2):
    path, _, reference = moco_v2
    teacher = load_embedding_teacher(path, device="cuda")
    assert all(p.is_cuda for p in teacher.parameters())
    with torch.no_grad():
        out = teacher(X.cuda())
    assert out.dtype == torch.float32 and (out.cpu() * reference).sum(1).min() > 0.9999
