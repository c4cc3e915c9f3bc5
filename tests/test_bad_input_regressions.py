"""Findings of an outside bad-input battery, each with the error it now gets before anything is modified."""

import pytest
import torch

import sapsel_kernels as sk
from sapsel_kernels import ParamSpace


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, generator=g)
    y = torch.randint(0, 2, (8,), generator=g)
    return (x, y), (x, (y + 1) % 2)


@pytest.mark.parametrize("method", [sk.FirstOrder(tau=0.1), sk.SAMFinetune(steps=2), sk.GradientAscent(steps=2)])
def test_unlearn_refuses_a_space_built_on_another_model(method):
    torch.manual_seed(0)
    m, other = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    z, zt = _data()
    m.weight.grad = torch.ones_like(m.weight)  # the caller's .grad, which must come back untouched
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="space= was built on another model"):
        sk.unlearn(m, torch.nn.CrossEntropyLoss(), z, zt, None, method, space=ParamSpace(other))
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert torch.equal(m.weight.grad, torch.ones_like(m.weight)) and m.bias.grad is None
    with pytest.raises(ValueError, match="space= was built on another model"):
        sk.select_parameters(m, "random", 0.5, space=ParamSpace(other))
    with pytest.raises(ValueError, match="space= was built on another model"):
        sk.hessian_diag(m, torch.nn.CrossEntropyLoss(), [z], n_probes=2, space=ParamSpace(other))


def test_a_truncated_estimate_file_says_truncated(tmp_path):
    m = torch.nn.Linear(3, 2)
    z, _ = _data()
    est = sk.hessian_diag(m, torch.nn.CrossEntropyLoss(), [z], n_probes=2)
    path = tmp_path / "est.pt"
    est.save(path)
    raw = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_bytes(b"hello")
    with pytest.raises(ValueError, match="truncated"):
        sk.DiagEstimate.load(tmp_path / "cut.pt")
    with pytest.raises(ValueError, match="empty"):
        sk.DiagEstimate.load(tmp_path / "empty.pt")
    with pytest.raises(ValueError, match="not a torch.save file"):
        sk.DiagEstimate.load(tmp_path / "text.pt")
    assert torch.equal(sk.DiagEstimate.load(path).mean, est.mean)


def test_meta_device_is_refused_up_front():
    meta = torch.nn.Linear(3, 2, device="meta")
    z, zt = _data()
    with pytest.raises(ValueError, match="meta device"):
        sk.as_selection(torch.tensor([0, 1]), ParamSpace(meta))
    with pytest.raises(ValueError, match="meta device"):
        sk.unlearn(meta, torch.nn.CrossEntropyLoss(), z, zt, None)
    with pytest.raises(ValueError, match="meta device"):
        sk.hessian_diag(meta, torch.nn.CrossEntropyLoss(), [z], n_probes=2)
    real = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="meta device"):
        sk.as_selection(torch.tensor([0, 1], device="meta"), ParamSpace(real))


def test_a_registered_name_without_an_implementation_never_falls_through(monkeypatch):
    """The registries decide (tests/test_registries.py): a name added to the public tuples ESTIMATORS / STRATEGIES
    without a registry entry is unknown, and raises, instead of silently running another estimator or strategy (it
    used to run 'exact' / 'ssd'); the probe loop refuses a name it does not sample."""
    from sapsel_kernels import hessian, probe_loop, strategies

    m = torch.nn.Linear(3, 2)
    z, zt = _data()
    monkeypatch.setattr(hessian, "ESTIMATORS", hessian.ESTIMATORS + ("newest",))
    with pytest.raises(ValueError, match="estimator must be one of .* got 'newest'"):
        sk.hessian_diag(m, torch.nn.CrossEntropyLoss(), [z], estimator="newest")
    monkeypatch.setattr(strategies, "STRATEGIES", strategies.STRATEGIES + ("newest",))
    with pytest.raises(ValueError, match="unknown selection strategy 'newest'"):
        sk.parameter_scores(m, "newest", loss_fn=torch.nn.CrossEntropyLoss(), affected=[z])
    with pytest.raises(NotImplementedError, match="the probe loop samples"):
        probe_loop._pass_fn("newest", None, m, None, [z], sk.ParamSpace(m), 0, 1, None, None, 0)
