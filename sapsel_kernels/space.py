"""ParamSpace: one flat, int64-indexed coordinate space over a model's trainable parameters.

Every selection, score vector and sparse update in sapsel-kernels addresses parameters through it.
"""

import hashlib
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch


def index_copy_flat(p: torch.Tensor, loc: torch.Tensor, v: torch.Tensor) -> None:
    """``p.view(-1)[loc] = v`` in place (call under ``torch.no_grad()`` for a parameter); a strided tensor has no flat
    view, so it is written through a copy of it (O(numel of this tensor))."""
    if p.is_contiguous():
        p.view(-1).index_copy_(0, loc, v)
    else:
        flat = p.detach().reshape(-1).clone()
        flat.index_copy_(0, loc, v)
        p.copy_(flat.view(p.shape))


class ParamSpace:
    """The trainable parameters of a model (or an explicit list) laid end to end in ``named_parameters()`` order.

    * shared/tied parameters are counted once (first name wins), frozen ones (``requires_grad=False``) are excluded;
    * ``offsets[i]`` is the flat index of the first element of parameter i; all index arithmetic is int64;
    * ``gather`` copies per-parameter tensors into a flat buffer, ``scatter`` copies a flat buffer back into the
      parameters' storage in place (the model's Parameter objects are never rebound).

    Parameters may have different dtypes; flat buffers default to float32 (``dtype=`` to change). They must all be
    on one device.
    """

    def __init__(self, model_or_params: Union[torch.nn.Module, Iterable, Dict[str, torch.Tensor]]):
        if isinstance(model_or_params, torch.nn.Module):
            named = list(model_or_params.named_parameters())
        elif isinstance(model_or_params, dict):
            named = list(model_or_params.items())
        else:
            named = []
            for i, p in enumerate(model_or_params):
                named.append(p if isinstance(p, tuple) else (f"param{i}", p))
        seen = set()
        self.names: List[str] = []
        self.params: List[torch.Tensor] = []
        for name, p in named:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"ParamSpace: {name!r} is a {type(p).__name__}, not a tensor")
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            self.names.append(name)
            self.params.append(p)
        if not self.params:
            raise ValueError("ParamSpace: no trainable parameters (all frozen, or an empty model)")
        devices = {p.device for p in self.params}
        if len(devices) > 1:
            raise ValueError(f"ParamSpace: parameters live on several devices {sorted(map(str, devices))}; "
                             "move the model to one device first")
        self.device = self.params[0].device
        self.shapes: List[torch.Size] = [p.shape for p in self.params]
        self.numels: List[int] = [p.numel() for p in self.params]
        self.dtypes: List[torch.dtype] = [p.dtype for p in self.params]
        offs = [0]
        for n in self.numels:
            offs.append(offs[-1] + n)
        self.offsets: List[int] = offs[:-1]
        self.numel: int = offs[-1]
        self._bounds = torch.tensor(offs, dtype=torch.int64)  # CPU, len P+1
        self._index = {n: i for i, n in enumerate(self.names)}

    # ------------------------------------------------------------------ identity
    def __len__(self) -> int:
        return len(self.params)

    def __repr__(self) -> str:
        return f"ParamSpace({len(self)} tensors, {self.numel:,} elements, device={self.device})"

    @property
    def signature(self) -> str:
        """A hash of (names, shapes): a Selection built for another model/space is detected through it."""
        h = hashlib.sha1()
        for n, s in zip(self.names, self.shapes):
            h.update(f"{n}:{tuple(s)};".encode())
        return h.hexdigest()[:16]

    def same_tensors(self, other: "ParamSpace") -> bool:
        """True when both spaces hold the very same parameter tensors in the same order (names may differ)."""
        return len(self.params) == len(other.params) and all(a is b for a, b in zip(self.params, other.params))

    def fingerprint(self) -> str:
        """A hash of the parameter VALUES (not only names and shapes): resuming a computation that depends on the
        weights (a hessian_diag checkpoint) is refused when they changed.

        Per tensor: the int64 sum of its elements' bit patterns (any single changed element changes it, however small
        the change: a sparse unlearning step of 1e-7 on a few weights is caught), a sum of the same bit patterns
        weighted by position (``1 + i mod 251``: two swapped unequal elements, which leave every plain sum
        unchanged, change it unless they are a multiple of 251 positions apart), and up to 64 elements at a fixed
        stride, hashed with the signature. Only exact integer sums and exact values enter it, so the same weights give
        the same fingerprint whatever the thread count or device (a float sum would not: its rounding depends on the
        reduction order). Cost: two reductions per tensor, the weighted one in chunks of 2^20 elements (two int64
        temporaries of that size, one host sync per chunk).
        """
        bits = {8: torch.int32, 4: torch.int32, 2: torch.int16, 1: torch.int8}  # 8-byte values as int32 pairs
        h = hashlib.sha1(self.signature.encode())
        chunk = 1 << 20
        with torch.no_grad():
            for p in self.params:
                flat = p.detach().reshape(-1)
                n = flat.numel()
                if n:
                    words = flat.view(bits[flat.element_size()])
                    ints = words.sum(dtype=torch.int64)
                    # |word| < 2^31, weight <= 251: a chunk's sum stays below 2^59, no int64 overflow
                    weighted = 0
                    for a in range(0, words.numel(), chunk):
                        w = words[a:a + chunk].to(torch.int64)
                        pos = torch.arange(a, a + w.numel(), device=w.device) % 251 + 1
                        weighted = (weighted + int((w * pos).sum())) % (1 << 61)
                    h.update(ints.cpu().numpy().tobytes())
                    h.update(weighted.to_bytes(8, "little"))
                    stride = max(1, n // 64)
                    h.update(flat[::stride][:64].to(torch.float64).cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def check_belongs_to(self, model: torch.nn.Module, what: str) -> None:
        """Raise ValueError (naming ``what`` and the first foreign tensor) unless every tensor of this space is a
        parameter of ``model``: a space built on another model would make the caller read or write the wrong
        tensors (an update that changes nothing in ``model``). O(number of parameter tensors)."""
        own = {id(p) for p in model.parameters()}
        for name, p in zip(self.names, self.params):
            if id(p) not in own:
                raise ValueError(f"{what}: space= was built on another model (its tensor {name!r} is not a parameter "
                                 f"of this model); build it with ParamSpace(model) or pass space=None")

    def index_of(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"ParamSpace has no trainable parameter named {name!r}") from None

    def range_of(self, name_or_index: Union[str, int]) -> Tuple[int, int]:
        """[start, end) flat range of one parameter."""
        i = self.index_of(name_or_index) if isinstance(name_or_index, str) else int(name_or_index)
        return self.offsets[i], self.offsets[i] + self.numels[i]

    # ------------------------------------------------------------------ index maps
    def param_index(self, flat_index: torch.Tensor) -> torch.Tensor:
        """For int64 flat indices, the position of the owning parameter in ``self.params`` (int64)."""
        flat_index = torch.as_tensor(flat_index, dtype=torch.int64)
        if flat_index.numel() and (int(flat_index.min()) < 0 or int(flat_index.max()) >= self.numel):
            raise IndexError(f"flat index out of range [0, {self.numel})")
        b = self._bounds.to(flat_index.device)
        return torch.searchsorted(b, flat_index, right=True) - 1

    def locate(self, flat_index: int) -> Tuple[str, Tuple[int, ...]]:
        """flat index -> (parameter name, multi-dimensional local index)."""
        flat_index = int(flat_index)
        if not 0 <= flat_index < self.numel:
            raise IndexError(f"flat index {flat_index} out of range [0, {self.numel})")
        i = int(self.param_index(torch.tensor([flat_index]))[0])
        local = flat_index - self.offsets[i]
        idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(local), self.shapes[i])) if self.shapes[i] else ()
        return self.names[i], idx

    def flat_index(self, name: str, local_index: Union[int, Sequence[int]]) -> int:
        """(parameter name, local index: linear int or multi-dimensional tuple) -> flat index."""
        i = self.index_of(name)
        shape = self.shapes[i]
        if isinstance(local_index, int):
            lin = local_index
        else:
            lin = 0
            for d, s in zip(local_index, shape):
                lin = lin * s + int(d)
        if not 0 <= lin < self.numels[i]:
            raise IndexError(f"local index {local_index} out of range for {name} of shape {tuple(shape)}")
        return self.offsets[i] + lin

    def split_indices(self, flat_indices: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Ascending flat indices -> {name: local linear indices} (only parameters with at least one index)."""
        pi = self.param_index(flat_indices)
        counts = torch.bincount(pi.cpu(), minlength=len(self)).tolist()
        out, start = {}, 0
        order_ok = flat_indices.numel() < 2 or bool((flat_indices[1:] >= flat_indices[:-1]).all())
        if not order_ok:
            raise ValueError("split_indices expects ascending flat indices")
        for i, c in enumerate(counts):
            if c:
                out[self.names[i]] = flat_indices[start:start + c] - self.offsets[i]
            start += c
        return out

    # ------------------------------------------------------------------ gather / scatter
    def _tensors(self, what) -> List[Optional[torch.Tensor]]:
        if what == "param":
            return [p.detach() for p in self.params]
        if what == "grad":
            return [p.grad for p in self.params]
        what = list(what)
        if len(what) != len(self):
            raise ValueError(f"expected {len(self)} tensors (one per parameter), got {len(what)}")
        return what

    def gather(self, what="param", dtype: Optional[torch.dtype] = torch.float32, out: Optional[torch.Tensor] = None):
        """Flat 1-D copy of the parameters ("param"), their gradients ("grad", None -> zeros) or any list of
        per-parameter tensors with the parameters' shapes."""
        ts = self._tensors(what)
        if out is None:
            dt = dtype if dtype is not None else self.dtypes[0]
            out = torch.empty(self.numel, dtype=dt, device=self.device)
        elif out.shape != (self.numel,):
            raise ValueError(f"out must have shape ({self.numel},), got {tuple(out.shape)}")
        for t, off, n, shape, name in zip(ts, self.offsets, self.numels, self.shapes, self.names):
            dst = out[off:off + n]
            if t is None:
                dst.zero_()
            else:
                if t.shape != shape:
                    raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
                dst.copy_(t.reshape(-1))
        return out

    def scatter(self, flat: torch.Tensor, into="param") -> None:
        """Copy a flat buffer back into the parameters (in place, under no_grad) or into a list of tensors."""
        if flat.shape != (self.numel,):
            raise ValueError(f"flat buffer must have shape ({self.numel},), got {tuple(flat.shape)}")
        from .errors import check_finite

        check_finite(flat, "ParamSpace.scatter: the flat buffer", space=self, suffix="nothing was written")
        targets = self.params if into == "param" else list(into)
        with torch.no_grad():
            for t, off, n in zip(targets, self.offsets, self.numels):
                t.view(-1).copy_(flat[off:off + n]) if t.is_contiguous() else t.copy_(flat[off:off + n].view_as(t))

    def views(self, flat: torch.Tensor) -> Dict[str, torch.Tensor]:
        """{name: view of ``flat`` shaped like the parameter} (no copies)."""
        if flat.shape[-1] != self.numel:
            raise ValueError(f"last dimension must be {self.numel}, got {flat.shape[-1]}")
        lead = flat.shape[:-1]
        # view(tuple) rather than view(*sizes): a 0-dim parameter has no sizes, and view() with none is an error
        return {name: flat[..., off:off + n].view(tuple(lead) + tuple(shape))
                for name, off, n, shape in zip(self.names, self.offsets, self.numels, self.shapes)}

    def describe_position(self, flat_index: int) -> str:
        name, idx = self.locate(flat_index)
        return f"{name}[{', '.join(map(str, idx))}] (flat index {flat_index})"
