"""ReActNet-A, the 1-bit student (fkd_dali/models/reactnet.py): its size against the authors' model, binary
forward, the estimators' gradients, learning, `train -a reactnet_a`, checkpoints, the backbone convention."""

import os

import pytest
import torch
from torch.nn import functional as F

from fkd_dali.cli import main
from fkd_dali.models import available, create_model
from fkd_dali.models.reactnet import ApproxSign, BinaryConv2d, BinaryWeight, Block, ReActNet, RPReLU, RSign
from fkd_dali.train import train
from tests.conftest import current_device
from tests.test_train import cfg, setup  # noqa: F401 - module fixture: a tiny dataset and its FKD store

DEVICE = current_device()
# ReActNet-A's first three blocks (a doubling block of stride 1, a doubling block of stride 2, one that keeps its
# width): the same modules at a fraction of the cost, for the tests of its mechanics.
FIRST_BLOCKS = ((64, 1), (128, 2), (128, 1))


def small_batch(seed=0, n=4, side=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, side, side, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_parameter_count_and_operations_equal_the_authors_reactnet_a():
    """The authors' mobilenet/2_step2/reactnet.py (liuzechun/ReActNet @a6cd08d), built for 1000 classes, has
    29,343,592 parameters, 28,253,184 of them in its HardBinaryConv layers (counted by constructing it);
    its README gives ReActNet-A 0.87e8 OPs = BOPs / 64 + real FLOPs at 224 px."""
    with torch.device("meta"):
        m = create_model("reactnet_a", 1000)
    binary = [c for c in m.modules() if isinstance(c, BinaryConv2d)]
    assert sum(p.numel() for p in m.parameters()) == 29_343_592
    assert sum(c.weight.numel() for c in binary) == 28_253_184
    assert len(binary) == 13 + 13 + 5  # a 3x3 and a 1x1 per block, a second 1x1 where the width doubles
    macs = {}
    for c in binary:
        c.register_forward_hook(lambda mod, i, o: macs.__setitem__(mod, o[0].numel() * mod.weight[0].numel()))
    m(torch.empty(1, 3, 224, 224, device="meta"))
    bops = sum(macs.values())
    flops = 3 * 32 * 9 * 112 * 112 + 1024 * 1000  # the real first convolution and classifier
    assert bops == 4_816_896_000
    assert round((bops / 64 + flops) / 1e8, 2) == 0.87


@pytest.mark.slow
def test_output_shape_at_the_papers_224_px():
    m = create_model("reactnet_a", 10).eval()
    with torch.no_grad():
        feats = m.forward_features(torch.randn(1, 3, 224, 224))
    assert feats.shape == (1, 1024) and m.fc(feats).shape == (1, 10)


def test_output_shape_any_size_and_the_backbone_convention():
    m = create_model("reactnet_a", 10).eval()
    assert "reactnet_a" in available() and m.num_features == 1024 and m.fc.in_features == m.num_features
    with torch.no_grad():
        x = torch.randn(2, 3, 40, 40)  # not a multiple of 32
        logits = m(x)
        assert logits.shape == (2, 10)
        torch.testing.assert_close(logits, m.fc(m.forward_features(x)))
    small = ReActNet(10, FIRST_BLOCKS)
    small.fc = torch.nn.Sequential(torch.nn.Linear(small.num_features, 64), torch.nn.ReLU(),
                                   torch.nn.Linear(64, 16))  # an SSL head in place of the classifier
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 16)


def test_a_doubling_block_of_stride_2_is_the_papers_block():
    """RSign -> binary 3x3 / 2 -> BN, + the 2x2-average-pooled input -> RPReLU -> RSign -> two binary 1x1 -> BN,
    each + that sum, concatenated -> RPReLU, written out with functional ops on random parameters."""
    torch.manual_seed(0)
    block = Block(4, 8, stride=2).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
        for bn in (block.bn1, *block.bn2):
            bn.running_mean.copy_(torch.randn(4))
            bn.running_var.copy_(torch.rand(4) + 0.5)

    def sign(x, threshold):
        return torch.where(x > threshold.view(1, -1, 1, 1), 1.0, -1.0)

    def act(x, a):
        return F.prelu(x - a.gamma.view(1, -1, 1, 1), a.prelu.weight) + a.zeta.view(1, -1, 1, 1)

    def binary(w):
        return w.abs().mean(dim=(1, 2, 3), keepdim=True) * torch.where(w > 0, 1.0, -1.0)

    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        y = block.bn1(F.conv2d(sign(x, block.sign1.threshold), binary(block.conv3x3.weight), stride=2, padding=1))
        y = act(y + F.avg_pool2d(x, 2), block.act1)
        b = sign(y, block.sign2.threshold)
        halves = [bn(F.conv2d(b, binary(conv.weight))) + y for conv, bn in zip(block.conv1x1, block.bn2)]
        expected = act(torch.cat(halves, dim=1), block.act2)
        torch.testing.assert_close(block(x), expected)
    assert block(x).shape == (2, 8, 3, 3)


def test_binary_convolutions_compute_with_two_weight_values_and_pm1_activations():
    """On every binary convolution of the real model: its input is exactly +-1, its weights per output channel
    are {-mean|W|, +mean|W|} of its latent weights, and its output is the convolution with those weights."""
    torch.manual_seed(0)
    m = ReActNet(10, FIRST_BLOCKS).train()
    seen = []

    def check(conv, inputs, output):
        x = inputs[0]
        assert set(x.unique().tolist()) == {-1.0, 1.0}
        w = conv.weight.detach()
        wb = BinaryWeight.apply(w)
        scale = w.abs().mean(dim=(1, 2, 3))
        for c in range(w.shape[0]):
            assert set(wb[c].abs().unique().tolist()) == {scale[c].item()}
        torch.testing.assert_close(wb, scale.view(-1, 1, 1, 1) * torch.where(w > 0, 1.0, -1.0))
        expected = F.conv2d(x, wb, None, conv.stride, conv.padding)
        torch.testing.assert_close(output, expected, rtol=1e-4, atol=1e-6)
        assert not torch.allclose(output, F.conv2d(x, w, None, conv.stride, conv.padding), rtol=1e-2, atol=0)
        seen.append(conv)

    for conv in m.modules():
        if isinstance(conv, BinaryConv2d):
            conv.register_forward_hook(check)
    m(small_batch()[0])
    assert len(seen) == 3 + 3 + 2


def test_rsign_and_rprelu_values():
    """RSign: +1 above its channel's threshold, -1 at or below it; RPReLU: PReLU(x - gamma) + zeta per channel."""
    sign = RSign(2)
    with torch.no_grad():
        sign.threshold.copy_(torch.tensor([0.5, -0.5]))
    x = torch.tensor([0.4, 0.5, 0.6]).view(1, 1, 3, 1).expand(1, 2, 3, 1)
    assert sign(x).flatten().tolist() == [-1, -1, 1, 1, 1, 1]
    act = RPReLU(2)
    with torch.no_grad():
        act.gamma.copy_(torch.tensor([1.0, 0.0]))
        act.zeta.copy_(torch.tensor([0.0, 2.0]))
        act.prelu.weight.copy_(torch.tensor([0.5, 0.25]))
    x = torch.tensor([0.0, 3.0]).view(1, 1, 2, 1).expand(1, 2, 2, 1)
    assert act(x).flatten().tolist() == [-0.5, 2.0, 2.0, 5.0]


def test_the_estimators_gradients():
    """ApproxSign: 2 - 2|x| inside (-1, 1), 0 outside; the weights' STE: the gradient where |w| <= 1."""
    x = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.25, 0.99, 1.2], requires_grad=True)
    y = ApproxSign.apply(x)
    assert y.tolist() == [-1, -1, -1, -1, 1, 1, 1]
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 0.0, 1.0, 2.0, 1.5, 0.02, 0.0]))
    w = torch.tensor([-2.0, -0.5, 0.3, 1.0, 1.5]).view(5, 1, 1, 1).requires_grad_()
    (BinaryWeight.apply(w) * torch.arange(1.0, 6.0).view(5, 1, 1, 1)).sum().backward()
    assert w.grad.flatten().tolist() == [0.0, 2.0, 3.0, 4.0, 0.0]


def test_gradients_reach_latent_weights_thresholds_and_rprelu():
    torch.manual_seed(0)
    m = ReActNet(10, FIRST_BLOCKS).train()
    x, y = small_batch()
    F.cross_entropy(m(x), y).backward()
    kinds = {RSign: 0, RPReLU: 0, BinaryConv2d: 0}
    for module in m.modules():
        if type(module) in kinds:
            for name, p in module.named_parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0, (type(module).__name__, name)
            kinds[type(module)] += 1
    assert kinds == {RSign: 6, RPReLU: 6, BinaryConv2d: 8}


def test_a_few_adam_steps_reduce_the_loss():
    torch.manual_seed(0)
    m = ReActNet(10, FIRST_BLOCKS).train()
    x, y = small_batch()
    opt = torch.optim.Adam(m.parameters(), lr=3e-4)
    losses = []
    for _ in range(4):
        loss = F.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    m = ReActNet(10, FIRST_BLOCKS)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    x, y = small_batch()
    F.cross_entropy(m(x), y).backward()
    opt.step()  # trained weights and BatchNorm statistics, not the initial ones
    torch.save(m.state_dict(), tmp_path / "m.pt")
    torch.manual_seed(1)
    back = ReActNet(10, FIRST_BLOCKS)
    back.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    with torch.no_grad():
        assert torch.equal(m.eval()(x), back.eval()(x))


@pytest.mark.slow
def test_train_reactnet_a_one_step_and_evaluate_its_checkpoint(setup, tmp_path):  # noqa: F811
    """`fkd-dali train -a reactnet_a` on the tiny FKD store: one step with a checkpoint, whose weights then
    evaluate through `-e --resume` as any student's."""
    out = str(tmp_path / "r")
    assert main(["train", setup["data"], "--softlabel-path", setup["store"], "-a", "reactnet_a", "--num-crops", "2",
                 "-b", "8", "--epochs", "2", "--input-size", "32", "--opt", "adamw", "--lr", "5e-4", "--wd", "0",
                 "--device", DEVICE, "--max-steps", "1", "--output", out, "-q"]) == 0
    ckpt = torch.load(os.path.join(out, "checkpoint.pth.tar"), map_location="cpu", weights_only=True)
    assert ckpt["arch"] == "reactnet_a" and ckpt["global_step"] == 1
    m = ReActNet(10)
    steps = [float(st["step"]) for st in ckpt["optimizer"]["state"].values()]
    assert steps == [1.0] * len(list(m.parameters()))  # every parameter had a gradient and took its step
    state = {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}
    assert state["blocks.0.sign1.threshold"].shape == (32,) and "fc.weight" in state
    m.load_state_dict(state)
    res = train(cfg(setup, tmp_path, arch="reactnet_a", evaluate=True, resume=out))
    assert res["images"] == 10 and 0 <= res["top1"] <= 100
