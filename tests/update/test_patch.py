"""Sparse patches: unlearn(return_patch=True) / diff_patch, the safetensors file, apply and revert bit-exact, a
wrong base refused with nothing modified, the size bound, and `sapsel patch apply|revert` on a Hugging Face
model folder."""

import copy
import os

import pytest
import torch

import sapsel_kernels as sk
from sapsel_kernels.patch import PATCH_FORMAT


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 40), torch.nn.ReLU(), torch.nn.Linear(40, 3)).to(dtype)


def _data(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 6, generator=g).to(dtype)
    y = torch.randint(0, 3, (12,), generator=g)
    return (x[:4], y[:4]), (x[:4], (y[:4] + 1) % 3)


def _params(m):
    return [p.detach().clone() for p in m.parameters()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_round_trip_is_bit_exact_and_refuses_a_wrong_base(tmp_path, dtype):
    m = _model(dtype=dtype)
    base = copy.deepcopy(m)
    z, zt = _data(dtype)
    sel = torch.tensor([0, 3, 9, 100, 250, 263, 300])
    rep = sk.unlearn(m, torch.nn.CrossEntropyLoss(), z, zt, sel, sk.FirstOrder(tau=0.3), return_patch=True)
    p = rep.patch
    assert p.k == rep.n_changed > 0 and "patch" not in rep.to_dict()
    # the patch is exactly the difference: diff_patch (an O(N) compare) finds the same entries
    d = sk.diff_patch(base, m)
    assert d.base == p.base and d.result == p.result and set(d.entries) == set(p.entries)
    for name in p.entries:
        for a, b in zip(d.entries[name], p.entries[name]):
            assert torch.equal(a, b)
    path = tmp_path / "p.safetensors"
    p.save(path)
    loaded = sk.Patch.load(path)
    assert loaded.k == p.k and loaded.base == p.base and loaded.version == sk.__version__
    # apply on a fresh copy of the base: bit-identical to the unlearned model; revert: bit-identical to the base
    b2 = copy.deepcopy(base)
    sk.apply_patch(b2, path)
    assert all(torch.equal(a, b) for a, b in zip(_params(b2), _params(m)))
    sk.revert_patch(b2, loaded)
    assert all(torch.equal(a, b) for a, b in zip(_params(b2), _params(base)))
    # refused, nothing modified: apply twice, revert an unpatched model, a model of another seed, another dtype
    for model, fn, match in ((m, sk.apply_patch, "not the unpatched base"), (base, sk.revert_patch,
                                                                             "not the patched model"),
                             (_model(seed=5, dtype=dtype), sk.apply_patch, "not the unpatched base")):
        before = _params(model)
        with pytest.raises(ValueError, match=match):
            fn(model, loaded)
        assert all(torch.equal(a, b) for a, b in zip(_params(model), before))
    other = _model(dtype=torch.float16 if dtype != torch.float16 else torch.float32)
    with pytest.raises(ValueError, match="in the model, .* in the patch"):
        sk.apply_patch(other, loaded)


def test_values_at_the_indices_are_checked_even_when_the_fingerprint_matches():
    m = _model()
    base = copy.deepcopy(m)
    with torch.no_grad():
        m[0].weight.view(-1)[[1, 2]] += 1.0
    p = sk.diff_patch(base, m)
    forged = sk.Patch(entries={k: (i, n, o + 1) for k, (i, n, o) in p.entries.items()}, base=p.base,
                      result=p.result, signature=p.signature)
    b2 = copy.deepcopy(base)
    with pytest.raises(ValueError, match="are not the old ones"):
        sk.apply_patch(b2, forged)
    assert all(torch.equal(a, b) for a, b in zip(_params(b2), _params(base)))


def test_size_is_about_k_times_index_plus_two_values(tmp_path):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(500, 500), torch.nn.Linear(500, 50))  # 1% = 2.8k entries
    base = copy.deepcopy(m)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            flat = p.view(-1)
            idx = torch.randperm(flat.numel(), generator=g)[: flat.numel() // 100]
            flat[idx] += 0.5
    patch = sk.diff_patch(base, m)
    path = tmp_path / "p.safetensors"
    patch.save(path)
    k = patch.k
    assert k > 2000 and os.path.getsize(path) <= 1.1 * k * (8 + 2 * 4)  # the header: about 1 KB


def test_not_a_patch_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(3)}, tmp_path / "x.safetensors", metadata={"format": "other"})
    with pytest.raises(ValueError, match="not a sapsel patch"):
        sk.Patch.load(tmp_path / "x.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="cannot read a sapsel patch"):
        sk.Patch.load(tmp_path / "junk.safetensors")
    assert PATCH_FORMAT == "sapsel.patch/1"


def test_cli_patch_apply_and_revert_on_a_hugging_face_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    from sapsel_kernels.cli import main

    cfg = transformers.GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(cfg).eval()
    base.save_pretrained(tmp_path / "base")
    changed = copy.deepcopy(base)
    with torch.no_grad():
        changed.transformer.h[0].mlp.c_fc.weight.view(-1)[[3, 70, 500]] -= 0.25
        changed.lm_head.weight.view(-1)[[11]] += 1.0  # tied to wte: one tensor in the ParamSpace
    patch = sk.diff_patch(base, changed)
    patch.save(tmp_path / "patch.safetensors")
    assert main(["patch", "apply", "--model", str(tmp_path / "base"), "--patch", str(tmp_path / "patch.safetensors"),
                 "--out", str(tmp_path / "applied")]) == 0
    got = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "applied")
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), changed.state_dict().values()))
    assert main(["patch", "revert", "--model", str(tmp_path / "applied"), "--patch",
                 str(tmp_path / "patch.safetensors"), "--out", str(tmp_path / "reverted")]) == 0
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "reverted")
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), base.state_dict().values()))
    # another model: refused, exit 2, OUT left empty
    torch.manual_seed(1)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "other")
    os.makedirs(tmp_path / "refused")
    assert main(["patch", "apply", "--model", str(tmp_path / "other"), "--patch", str(tmp_path / "patch.safetensors"),
                 "--out", str(tmp_path / "refused")]) == 2
    assert os.listdir(tmp_path / "refused") == []


def test_fingerprint_and_patches_do_not_depend_on_the_thread_count():
    """The fingerprint hashes exact integer sums only: a patch made at one thread count applies at another (a float
    sum's rounding depends on the reduction order)."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        base = torch.nn.Sequential(torch.nn.Linear(300, 300), torch.nn.Linear(300, 10))
        fp1 = sk.ParamSpace(base).fingerprint()
        changed = copy.deepcopy(base)
        with torch.no_grad():
            changed[0].weight.view(-1)[[5, 6000]] += 0.5
        patch = sk.diff_patch(base, changed)
        torch.set_num_threads(max(2, threads))
        assert sk.ParamSpace(base).fingerprint() == fp1
        sk.apply_patch(base, patch)
        assert all(torch.equal(a, b) for a, b in zip(_params(base), _params(changed)))
    finally:
        torch.set_num_threads(threads)


def test_corrupt_patch_metadata_and_buffers_outside_estimation_mode(tmp_path):
    from safetensors.torch import save_file

    save_file({"w::indices": torch.zeros(1, dtype=torch.int64), "w::new": torch.zeros(1), "w::old": torch.zeros(1)},
              tmp_path / "nobase.safetensors", metadata={"format": PATCH_FORMAT, "names": '["w"]'})
    with pytest.raises(ValueError, match="corrupt sapsel patch .no 'base'"):
        sk.Patch.load(tmp_path / "nobase.safetensors")
    save_file({"a": torch.zeros(1)}, tmp_path / "badjson.safetensors", metadata={"format": PATCH_FORMAT, "names": "["})
    with pytest.raises(ValueError, match="badjson.safetensors: corrupt sapsel patch"):
        sk.Patch.load(tmp_path / "badjson.safetensors")
    # an iterative rule in the model's own (train) mode may change BatchNorm buffers: a patch cannot hold them
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)).train()
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    with pytest.raises(ValueError, match="buffers"):
        sk.unlearn(m, torch.nn.CrossEntropyLoss(), (x, y), (x, 1 - y), None, sk.SAMFinetune(steps=1),
                   estimation_mode=False, return_patch=True)


def test_cli_loads_the_model_in_the_patchs_dtype(tmp_path):
    """A bf16 checkpoint that sapsel forget ran on in float32 (its default --dtype): the patch holds float32 values
    and `sapsel patch apply` loads the model in float32 by default, so it applies."""
    transformers = pytest.importorskip("transformers")
    from sapsel_kernels.cli import main

    cfg = transformers.GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    base = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    changed = copy.deepcopy(base)
    with torch.no_grad():
        changed.transformer.h[0].mlp.c_fc.weight.view(-1)[[3, 70]] += 0.125
    sk.diff_patch(base, changed).save(tmp_path / "p.safetensors")
    assert main(["patch", "apply", "--model", str(tmp_path / "bf16"), "--patch", str(tmp_path / "p.safetensors"),
                 "--out", str(tmp_path / "o")]) == 0
    got = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "o")
    assert got.transformer.h[0].mlp.c_fc.weight.dtype == torch.float32
    assert torch.equal(got.transformer.h[0].mlp.c_fc.weight, changed.transformer.h[0].mlp.c_fc.weight)
