"""bench/forget_relearn.py's noise-and-distil start: the student is (1 − α)·model + α·fresh, on the masked
coordinates only when masks are given, and the model it starts from is not modified."""
import pytest
import torch

fr = pytest.importorskip("bench.forget_relearn")


def _net(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_noised_mixes_every_coordinate(alpha):
    m, f = _net(0), _net(1)
    before = [p.detach().clone() for p in m.parameters()]
    out = fr.noised(m, f, alpha)
    for p, q, b, o in zip(m.parameters(), f.parameters(), before, out.parameters()):
        assert torch.equal(p, b)  # the model it starts from is untouched
        torch.testing.assert_close(o, b + alpha * (q - b), rtol=0, atol=1e-6)


def test_noised_masks_leave_the_other_coordinates_exact():
    m, f = _net(0), _net(1)
    masks = [torch.rand(p.shape, generator=torch.Generator().manual_seed(i)) < 0.3
             for i, p in enumerate(m.parameters())]
    out = fr.noised(m, f, 0.8, masks)
    for p, q, k, o in zip(m.parameters(), f.parameters(), masks, out.parameters()):
        assert torch.equal(o[~k], p[~k])
        torch.testing.assert_close(o[k], 0.2 * p[k] + 0.8 * q[k])


def test_noised_refuses_another_architecture():
    other = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match="fresh must have"):
        fr.noised(_net(0), other, 0.5)


def test_distill_specs_are_normalised_and_checked_before_any_run():
    assert fr.distill_specs("0.9:600, 0.90:600:unlearned:all:rest,1:300:theta:S:all") == \
        ["0.9:600:unlearned:all:rest", "0.9:600:unlearned:all:rest", "1:300:theta:S:all"]
    assert fr.distill_specs("") == []
    for bad, what in (("0.9", "expected alpha:steps"), ("x:600", "alpha must be a number"),
                      ("1.5:600", r"alpha must be in \[0, 1\]"), ("0.9:0", "steps at least 1"),
                      ("0.9:600:student", "the teacher must be"), ("0.9:600:theta:embeddings", "the scope"),
                      ("0.9:600:theta:all:some", "the windows")):
        with pytest.raises(ValueError, match=what):
            fr.distill_specs(bad)
    with pytest.raises(SystemExit):  # main refuses a bad spec before loading any fixture
        fr.main(["--out", "/nonexistent/never-made", "--distill", "0.9:600:student"])
    with pytest.raises(SystemExit):
        fr.main(["--out", "/nonexistent/never-made", "--distill", "0.9:600", "--every-distill", "0"])
