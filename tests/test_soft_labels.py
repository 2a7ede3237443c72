"""Soft-label recovery against a direct transcription of FKD's Recover_soft_label, and the loss."""

import pytest
import torch
import torch.nn.functional as F

from fkd_dali.soft_labels import LabelType, parse_label_type, recover, soft_cross_entropy


def fkd_recover(label: torch.Tensor, label_type: str, n_classes: int) -> torch.Tensor:
    """szq0214/FKD utils_FKD.py Recover_soft_label, transcribed formula by formula (CPU tensors)."""
    if label_type == "hard":
        return torch.zeros(label.size(0), n_classes).scatter_(1, label.view(-1, 1), 1)
    if label_type == "smoothing":
        index = label[:, 0].to(dtype=int)
        value = label[:, 1]
        minor_value = (torch.ones_like(value) - value) / (n_classes - 1)
        minor_value = minor_value.reshape(-1, 1).repeat_interleave(n_classes, dim=1)
        return (minor_value * torch.ones(index.size(0), n_classes)).scatter_(1, index.view(-1, 1), value.view(-1, 1))
    if label_type in ("marginal_smoothing_k5", "marginal_smoothing_k10"):
        k = 5 if label_type.endswith("k5") else 10
        index = label[:, 0, :].to(dtype=int)
        value = label[:, 1, :]
        minor_value = (torch.ones(label.size(0), 1) - torch.sum(value, dim=1, keepdim=True)) / (n_classes - k)
        minor_value = minor_value.reshape(-1, 1).repeat_interleave(n_classes, dim=1)
        return (minor_value * torch.ones(index.size(0), n_classes)).scatter_(1, index, value)
    if label_type == "marginal_renorm":
        index = label[:, 0, :].to(dtype=int)
        value = label[:, 1, :]
        soft_label = torch.zeros(index.size(0), n_classes).scatter_(1, index, value)
        return F.normalize(soft_label, p=1.0, dim=1, eps=1e-12)
    raise ValueError(label_type)


def random_topk(b: int, k: int, classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, classes, generator=g) * 3
    p = logits.softmax(1)
    val, idx = p.topk(k, dim=1)
    return idx, val.half()  # stored as int ids and float16 probabilities


@pytest.mark.parametrize("fkd_name,k", [("marginal_smoothing_k5", 5), ("marginal_smoothing_k10", 10),
                                        ("marginal_renorm", 5)])
def test_marginal_types_match_fkd(fkd_name, k):
    idx, val = random_topk(64, k, 100)
    fkd_label = torch.stack([idx.float(), val.float()], dim=1)  # FKD's (N, 2, k) with ids as floats
    ref = fkd_recover(fkd_label, fkd_name, 100)
    got = recover(idx, val, 100, parse_label_type(fkd_name, top_k=k, num_classes=100))
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-7)
    torch.testing.assert_close(got.sum(1), torch.ones(64), rtol=0, atol=1e-3)


def test_smoothing_and_hard_match_fkd():
    idx, val = random_topk(32, 5, 50, seed=1)
    ref = fkd_recover(torch.stack([idx[:, 0].float(), val[:, 0].float()], dim=1), "smoothing", 50)
    torch.testing.assert_close(recover(idx, val, 50, "smoothing"), ref, rtol=0, atol=1e-7)
    ref = fkd_recover(idx[:, 0], "hard", 50)
    torch.testing.assert_close(recover(idx, val, 50, "hard"), ref, rtol=0, atol=0)


def test_using_fewer_values_than_stored():
    idx, val = random_topk(16, 10, 100, seed=2)
    ref = fkd_recover(torch.stack([idx[:, :5].float(), val[:, :5].float()], dim=1), "marginal_smoothing_k5", 100)
    torch.testing.assert_close(recover(idx, val, 100, "marginal_smoothing_k5"), ref, rtol=0, atol=1e-7)


def test_full_labels_scatter_every_value():
    p = torch.rand(8, 20).softmax(1)
    val, idx = p.topk(20, dim=1)
    torch.testing.assert_close(recover(idx, val, 20, "full"), p, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="k = num_classes"):
        parse_label_type("full", top_k=5, num_classes=20)


def test_spread_mass_is_clamped_where_float16_sums_exceed_one():
    idx = torch.tensor([[0, 1, 2, 3, 4]])
    val = torch.tensor([[0.5, 0.3, 0.1, 0.07, 0.0401]], dtype=torch.float16)  # sums to 1.0001
    out = recover(idx, val, 10, "marginal_smoothing_k5")
    assert (out >= 0).all()
    ref = fkd_recover(torch.stack([idx.float(), val.float()], dim=1), "marginal_smoothing_k5", 10)
    assert (ref < 0).any()  # FKD puts negative mass there; we do not


def test_label_type_names_and_errors():
    assert parse_label_type("marginal_smoothing_k5") == LabelType("marginal_smoothing", 5)
    assert parse_label_type("marginal_renorm") == LabelType("marginal_renorm", None)
    assert parse_label_type("ori") == LabelType("full")
    with pytest.raises(ValueError, match="top-5"):
        parse_label_type("marginal_smoothing_k10", top_k=5, num_classes=1000)
    with pytest.raises(ValueError, match="unknown soft-label type"):
        parse_label_type("marginal")


def test_soft_cross_entropy():
    logits = torch.randn(16, 10)
    target = torch.randint(0, 10, (16,))
    onehot = F.one_hot(target, 10).float()
    torch.testing.assert_close(soft_cross_entropy(logits, onehot), F.cross_entropy(logits, target))
    soft = torch.rand(16, 10).softmax(1)
    ref = -(soft * F.log_softmax(logits / 4.0, dim=1)).sum(1).mean()
    torch.testing.assert_close(soft_cross_entropy(logits, soft, temperature=4.0), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_recover_runs_on_the_gpu():
    idx, val = random_topk(8, 5, 100)
    out = recover(idx.cuda(), val.cuda(), 100, "marginal_smoothing_k5")
    assert out.is_cuda
    torch.testing.assert_close(out.cpu(), recover(idx, val, 100, "marginal_smoothing_k5"))
