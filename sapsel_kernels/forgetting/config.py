"""How a ``forget`` call is configured: four config objects, the attacks (:class:`Evidence`) and the named seed of
every random stream.

``forget(model, tokenizer, texts, secret, *, heldout, seed, select, update, target, measure, group)``:

* :class:`SelectConfig` -- which k coordinates change (strategy, budget, the scoring windows and probes);
* :class:`UpdateConfig` -- how they change (the objective, the :class:`~sapsel_kernels.rules.Targeted` rule that
  searches the step, the windows and batches, the retain term);
* :class:`TargetConfig` -- when a secret counts as forgotten and what utility may be spent;
* :class:`MeasureConfig` -- how the verdict is measured (candidates, prompts' context, the attacks, the progress bar).

Each config checks its own fields when it is built, like the rules do (a bad value raises there, naming the field);
``forget`` checks what needs the model or the other configs (the objective against the secrets, the budget against
N, the group). The keywords of the earlier flat signature still work for one deprecation cycle
(:func:`configs_from_keywords`, a FutureWarning naming the config to use).

Every random draw of a ``forget`` run comes from one named stream of ``seed`` (:data:`SEED_STREAMS`,
:func:`stream_seed`); the relearning attack's dropout too (its copy trains under a forked, seeded global RNG).
"""

import math
import numbers
import random
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch

from ..update.rules import Targeted

__all__ = ["SelectConfig", "UpdateConfig", "TargetConfig", "MeasureConfig", "Evidence", "RemoveConfig", "SEED_STREAMS",
           "stream_seed", "configs_from_keywords", "FORGET_STEPS", "FORGET_BETA", "FORGET_REPAIR", "FORGET_POLISH",
           "FORGET_PROJECT", "FORGET_SEQ_CAP"]

FORGET_STEPS = 300  # forget's default step budget (Targeted's own default, 100, is for unlearn)
FORGET_BETA = 0.25  # forget's default NPO beta (Targeted's own default, 1.0, is for unlearn): the fixture matrix
FORGET_REPAIR = 10  # forget's default repair steps per over-budget block (Targeted's own default, 0): the matrix
FORGET_POLISH = 50  # forget's default polish steps after the target (Targeted's own default, 0): docs/forget.md
FORGET_PROJECT = True  # forget's default: projected steps (Targeted's own default, False): the matrix's fifth round
FORGET_SEQ_CAP = 256  # forget's default window: the model's context, at most this many tokens (docs/forget.md)


def _int(owner: str, name: str, v, lo: int, none: bool = False) -> None:
    if none and v is None:
        return
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
        raise ValueError(f"{owner}.{name} must be an int >= {lo}{' or None' if none else ''}, got {v!r}")


def _real(owner: str, name: str, v, lo: float = 0.0) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < lo:
        raise ValueError(f"{owner}.{name} must be a finite number >= {lo:g}, got {v!r}")


# ================================================================================================ evidence
@dataclass(frozen=True)
class Evidence:
    """The attacks every report measures, before and after unlearning (``MeasureConfig(evidence=...)``; None: none).

    * ``n_samples`` completions of each secret's prompt sampled at ``temperature`` (exact hits counted; any hit
      fails the verdict);
    * relearning: ``relearn_steps`` AdamW steps (lr ``relearn_lr``, the retained windows: training text without
      any secret) on a copy of the model, then exposure and greedy extraction again (0: skipped);
    * ``int8``: a copy with every floating tensor of 2 or more dimensions rounded to int8 (symmetric, one scale per
      row, round to nearest), then exposure and extraction again;
    * ``n_never_seen`` secrets of each secret's null, planted nowhere, ranked among the reported candidates: the
      "never seen" level (with ``evidence=None`` none are drawn).

    The attacked copies are measured on the first ``ATTACK_CANDIDATES`` (256) reported candidates, without
    sampling. Peak extra memory: one copy of the model, one attack at a time.
    """

    n_samples: int = 64
    temperature: float = 1.0
    relearn_steps: int = 50
    relearn_lr: float = 1e-3
    int8: bool = True
    n_never_seen: int = 16

    def __post_init__(self):
        for name in ("n_samples", "relearn_steps", "n_never_seen"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
                raise ValueError(f"Evidence.{name} must be an int >= 0, got {v!r}")
        for name in ("temperature", "relearn_lr"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"Evidence.{name} must be a finite number > 0, got {v!r}")
        if not isinstance(self.int8, bool):
            raise TypeError(f"Evidence.int8 must be a bool, got {type(self.int8).__name__}")


# ================================================================================================ configs
@dataclass(frozen=True)
class SelectConfig:
    """Which coordinates ``forget`` changes: :func:`~sapsel_kernels.strategies.select_parameters` with ``strategy``
    at ``budget`` (a fraction in (0, 1] of the trainable parameters, or an int k), one selection for the request.

    ``hessian_windows``: training windows (drawn with the ``scoring`` stream) the strategy's estimate reads (ssd:
    F_D; hessian: the Hutchinson diagonal); ``n_probes``: Hutchinson probes for the hessian strategies;
    ``scores``: a score vector from an earlier report (``report.scores``) for the same model and strategy, which
    skips the scoring. The budget is checked against the model's N by ``forget``.
    """

    strategy: str = "hessian_ratio"  # from the fixture matrix (docs/forget.md): ssd failed on an untied model
    budget: Union[int, float] = 0.05  # from the fixture matrix (docs/forget.md): 1% met far fewer secrets
    hessian_windows: int = 32
    n_probes: int = 16
    scores: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        from ..selection.strategies import check_strategy

        check_strategy(self.strategy)
        if isinstance(self.budget, bool) or not isinstance(self.budget, numbers.Real):
            raise TypeError(f"SelectConfig.budget must be a fraction in (0, 1] or an int k, got "
                            f"{type(self.budget).__name__}")
        _int("SelectConfig", "hessian_windows", self.hessian_windows, 1)
        _int("SelectConfig", "n_probes", self.n_probes, 1)
        if self.scores is not None and not (isinstance(self.scores, torch.Tensor) and self.scores.dim() == 1):
            raise TypeError("SelectConfig.scores must be a 1-D tensor (a report's .scores) or None")


@dataclass(frozen=True)
class RemoveConfig:
    """The opt-in removal stage after the sparse edit (``UpdateConfig(remove=RemoveConfig())``; the CLI's
    ``--remove``): noise, then distil. The student starts at ``(1 - alpha)·model + alpha·fresh`` on every parameter
    (``fresh``: the same architecture at a new random init, :func:`~sapsel_kernels.forget.fresh_copy`), then
    ``steps`` AdamW steps (peak ``lr``, ``warmup`` linear warm-up steps, cosine to 0.1·lr, no weight decay, gradients
    clipped at norm 1) on the KL divergence from the sparse-edited model's next-token distribution, on the retained
    windows (training text without any secret), ``batch_size`` per step, in a seeded order (stream "remove").
    After Lee et al. (2025), "distillation robustifies unlearning": the sparse edit blocks the secrets' read-out on
    S while their information stays in the other weights, where a benign fine-tune finds it again
    (docs/forget.md, "Relearning"); the noise destroys that information and the distillation copies back only what
    the teacher still expresses. It changes EVERY parameter (no sparse patch), needs the retained text, and costs
    ``steps`` teacher forwards and student backwards (on the project's fixtures 600 steps took 0.6-0.8 of
    retraining's wall time). Defaults: measured in docs/forget.md ("Relearning, third step"): with ``alpha`` 1 (the
    student starts at the fresh init: the edited model's weights are not kept at all) the secrets stayed within the
    retrained model's + 2 bits after the relearning attack for more secrets than with 0.9, whose residual tenth of
    the edited weights brought API keys back; 0.5, or noise on a part of the model only, were not robust ("Relearning,
    second study"). Peak extra memory: the student (N), its gradients
    (N), AdamW's two moments (2N): about 4N while it trains (before, while the student is mixed: the student and the
    fresh copy, and for a Hugging Face model its float32 rebuild while the fresh copy is filled); then, while the
    attacks measure the student, the student and one attack's copy with its gradients and AdamW's moments, about 5N.
    A frozen parameter (``requires_grad=False``) is not noised: it keeps the edited model's value.

    ``init``: None (default): a Hugging Face model is rebuilt from its config, any other module re-initialised by its
    submodules' ``reset_parameters`` (:func:`~sapsel_kernels.forget.fresh_copy`; a parameter neither reaches is a
    ValueError before any work); or a callable that re-initialises, in place, the copy of the model it is given
    (called under the seeded RNG), for architectures of one's own.

    ``finish``: True (default): where the student misses a secret (its exposure bound or extraction, on the
    monitored candidates, never the reported ones; not the relearning attack's copy, which a sparse pass does not
    steer), a sparse pass on the student works on it: ``forget`` again on the student (the same strategy, budget,
    rule and seed; fresh scores, since the selection of the edited model says nothing about a new one; no attacks
    or sampling while it searches), for every secret (focus pushes only the ones its monitor finds unmet), within
    the perplexity budget of the student's own perplexity (not θ*'s); then the finished model is measured like the
    student and its numbers are the verdict. False: the student's verdict as it is. Measured in docs/forget.md
    ("Relearning, fourth step"). Its cost: a sparse run on the student (its scoring, its steps and one measurement
    of its own), only where the student misses.
    """

    alpha: float = 1.0
    steps: int = 600
    lr: float = 1e-3
    warmup: int = 20
    batch_size: int = 8
    init: Optional[Callable[[Any], None]] = field(default=None, repr=False, compare=False)
    finish: bool = True

    def __post_init__(self):
        if not isinstance(self.finish, bool):
            raise TypeError(f"RemoveConfig.finish must be True or False, got {self.finish!r}")
        if self.init is not None and not callable(self.init):
            raise TypeError(f"RemoveConfig.init must be a callable(module) or None, got {type(self.init).__name__}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, numbers.Real) or not 0 < self.alpha <= 1:
            raise ValueError(f"RemoveConfig.alpha must be a number in (0, 1], got {self.alpha!r}")
        _int("RemoveConfig", "steps", self.steps, 1)
        if isinstance(self.lr, bool) or not isinstance(self.lr, numbers.Real) or not math.isfinite(self.lr) \
                or self.lr <= 0:
            raise ValueError(f"RemoveConfig.lr must be a finite number > 0, got {self.lr!r}")
        _int("RemoveConfig", "warmup", self.warmup, 0)
        _int("RemoveConfig", "batch_size", self.batch_size, 1)


@dataclass(frozen=True)
class UpdateConfig:
    """How the selected coordinates change.

    ``objective``: the forget term, a name of ``OBJECTIVE_REGISTRY`` -- "npo" (default), "uniform"
    (:func:`~sapsel_kernels.forget.format_uniform`, one secret) or "calibrated"
    (:func:`~sapsel_kernels.forget.calibrated_push`); ``rule``: the :class:`~sapsel_kernels.rules.Targeted`
    search (steps, lr and its bounds, check_every, repair_steps, the term weights, SGD or AdamW, SAM); forget sets
    its monitor and retain batches. Default ``Targeted(steps=FORGET_STEPS, beta=FORGET_BETA,
    repair_steps=FORGET_REPAIR, polish_steps=FORGET_POLISH, project=FORGET_PROJECT)`` (300 steps; β = 0.25: the
    per-token NPO weight fades more slowly than at β = 1; 10 repair steps: a block over the perplexity budget is first
    repaired by descent on Z̃ and the retained text; up to 50 polish steps: the same descent after the target is met,
    kept while every secret stays met and the validation perplexity falls; projected steps: a forget step without
    its component against the Z̃ and retain terms, a repair without its component against the forget term; all
    chosen on the fixture matrix, docs/forget.md).
    ``seq_len``: window length in tokens, for training, retained and held-out windows alike (None: the model's
    context, at most ``FORGET_SEQ_CAP`` = 256 tokens, lowered where a text holding a secret or the held-out text is too
    short, never below 64: ``forget.default_seq_len``; 64 when the model does not say its context. Shorter windows
    than the context leave the later positions unmeasured and unprotected: on the fixture matrix 64-token windows
    of 128-context models showed +1.2% at positions 1-63 where positions 64-127 rose +10.4%); ``batch_size``:
    windows per batch; ``retain_loss``: "ce" (cross-entropy on retained windows) or "kl" (the KL divergence to
    θ*'s predictions on them); ``retain_windows``: at most this many retained windows (None: all);
    ``per_token``: the NPO term per secret token, each keeping its own fading weight (True / False; objective
    "npo" only; None, the default: per token where the objective has that form, i.e. for "npo" -- chosen on the
    fixture matrix, docs/forget.md: the batch mean's weight fades once the easy secrets' loss has risen, before the
    hard ones moved); ``decoys``: random decoy secrets for objective "uniform"; ``precondition``: "fisher" -- the
    SGD step on S scaled per coordinate by 1 / (F_D + mean F_D), F_D the retained text's empirical Fisher diagonal on
    S over the first ``SelectConfig.hessian_windows`` retained windows, normalised to mean 1
    (:func:`~sapsel_kernels.forget.retain_fisher_scale`; needs the rule's base "sgd" and rho 0; under a group every
    rank computes it on the same windows and the group takes rank 0's); "auto" (default): "fisher" where it was
    measured -- with focus on (the per-token npo term), the rule's base "sgd", rho 0 and retained windows -- else
    none (chosen on the fixture matrix, docs/forget.md, the sixth round); None: no preconditioner;
    ``balance``: False (default): each window of Z once, in text order, so a secret weighs by its number of
    occurrences; True: every secret of a request weighs about the same by its number of windows, in the forget
    term, the Z̃ term and the selection's scores, its windows repeated in a seeded shuffle
    (:func:`~sapsel_kernels.forget.balanced_order`). Measured on the fixture matrix (docs/forget.md): it meets the
    secrets inserted least often (4-insertion misses 7 of 24 -> 3 of 24) but fewer in all (82 of 96 against 84),
    so it is not the default; ``focus``: None (default): True where the forget term is per token (npo), else False;
    True: after each check whose state the search keeps, the per-token NPO term pushes only the secrets not yet
    met there, on their tokens only, from the next Z batch that holds one
    (:func:`~sapsel_kernels.forget.focused_npo`; per-token npo only); False: it pushes every secret of the request
    until the target is met for all. Chosen on the fixture matrix (docs/forget.md, the sixth round: on six
    fixture-seeds it met forget's own target in more cells, at a lower perplexity in most);
    ``remove``: None (default): only S changes; a :class:`RemoveConfig`: after the sparse edit, the removal stage
    (noise, then distillation from the edited model on the retained text) changes every parameter, and the verdict
    is the distilled model's (the report's ``removal`` holds the sparse stage's). Opt-in: measured robust to the
    relearning attack on the fixtures, at a cost of a partial retraining (docs/forget.md).
    """

    objective: str = "npo"
    rule: Targeted = field(default_factory=lambda: Targeted(steps=FORGET_STEPS, beta=FORGET_BETA,
                                                                 repair_steps=FORGET_REPAIR,
                                                                 polish_steps=FORGET_POLISH,
                                                                 project=FORGET_PROJECT))
    seq_len: Optional[int] = None
    batch_size: int = 8
    retain_loss: str = "ce"
    retain_windows: Optional[int] = None
    per_token: Optional[bool] = None
    decoys: int = 0
    precondition: Optional[str] = "auto"
    balance: bool = False
    focus: Optional[bool] = None
    remove: Optional[RemoveConfig] = None

    def __post_init__(self):
        if self.remove is not None and not isinstance(self.remove, RemoveConfig):
            raise TypeError(f"UpdateConfig.remove must be a sapsel_kernels.RemoveConfig or None, got "
                            f"{type(self.remove).__name__}")
        if not isinstance(self.balance, bool):
            raise TypeError(f"UpdateConfig.balance must be a bool, got {type(self.balance).__name__}")
        if self.focus is not None and not isinstance(self.focus, bool):
            raise TypeError(f"UpdateConfig.focus must be None or a bool, got {type(self.focus).__name__}")
        if not isinstance(self.objective, str):
            raise TypeError(f"UpdateConfig.objective must be a str, got {type(self.objective).__name__}")
        if not isinstance(self.rule, Targeted):
            raise TypeError(f"UpdateConfig.rule must be a sapsel_kernels.Targeted config, got "
                            f"{type(self.rule).__name__}")
        if self.rule.step_scale is not None:
            raise ValueError("UpdateConfig.rule: forget sets the rule's step_scale itself (precondition=\"fisher\"); "
                             "pass the rule without one")
        _int("UpdateConfig", "seq_len", self.seq_len, 2, none=True)
        _int("UpdateConfig", "batch_size", self.batch_size, 1)
        if self.retain_loss not in ("ce", "kl"):
            raise ValueError(f"UpdateConfig.retain_loss must be 'ce' or 'kl', got {self.retain_loss!r}")
        _int("UpdateConfig", "retain_windows", self.retain_windows, 0, none=True)
        if self.per_token is not None and not isinstance(self.per_token, bool):
            raise TypeError(f"UpdateConfig.per_token must be None or a bool, got {type(self.per_token).__name__}")
        _int("UpdateConfig", "decoys", self.decoys, 0)
        if self.precondition not in ("auto", None, "fisher"):
            raise ValueError(f"UpdateConfig.precondition must be 'auto', None or 'fisher', got {self.precondition!r}")
        if self.precondition == "fisher" and (self.rule.base != "sgd" or self.rule.rho > 0):
            raise ValueError("UpdateConfig.precondition scales the SGD step: it needs a rule with base='sgd' and "
                             f"rho=0 (got base={self.rule.base!r}, rho={self.rule.rho!r})")


@dataclass(frozen=True)
class TargetConfig:
    """When a secret counts as forgotten, and what utility may be spent.

    ``exposure``: a secret meets the target when its exposure's 95% upper bound is at most this many bits and no
    probe or sample extracts it (about 1.44 bits is the mean exposure of a secret the model never saw);
    ``max_ppl_increase``: the utility budget, a fraction of the reported perplexity (0.05 = +5%), met when the
    reported change's 95% upper bound over the test windows is within it; the search steers the validation windows
    to within ``STEER_MARGIN`` (70%) of it; ``relearn``: False (default): the verdict is
    the model's as it is; True: robustness is part of the target, a secret is met only if it is also met (exposure
    bound, greedy extraction) after the relearning attack (:class:`Evidence` ``relearn_steps``, which must then be
    at least 1, with retained text to run it on), measured on the first ``ATTACK_CANDIDATES`` (256) reported
    candidates (so its bound is wider than the secret's own, and saturates at 8 bits). The search still steers on the
    model as it is; the attack is measured once, after. Strict, and not measured on the fixture matrix: there, after
    the attack, the sparse edit leaves most secrets far above 2 bits, and even the model retrained without the
    secrets has 1-7 of 16 above 2 bits by point estimate (docs/forget.md, "Relearning, third step");
    ``UpdateConfig(remove=...)`` brings the secrets close to the retrained model's level.
    """

    exposure: float = 2.0
    max_ppl_increase: float = 0.05
    relearn: bool = False

    def __post_init__(self):
        _real("TargetConfig", "exposure", self.exposure)
        _real("TargetConfig", "max_ppl_increase", self.max_ppl_increase)
        if not isinstance(self.relearn, bool):
            raise TypeError(f"TargetConfig.relearn must be a bool, got {type(self.relearn).__name__}")


@dataclass(frozen=True)
class MeasureConfig:
    """How the verdict is measured.

    ``n_candidates``: candidates of each secret's null for the reported exposure (2000: the rank estimate reaches
    log2(2001) = 10.97 bits); ``n_monitor``: the monitored ones that steer the search (disjoint from the reported);
    ``context``: text placed before each prompt when measuring (e.g. "\\n" for line-start secrets); ``evidence``: the
    attacks measured before and after (:class:`Evidence`; None: none, faster); ``progress``: a progress bar on
    stderr (None: only on a terminal). Under a group the ranks may differ in ``progress`` only.
    """

    n_candidates: int = 2000
    n_monitor: int = 256
    context: str = ""
    evidence: Optional[Evidence] = field(default_factory=Evidence)
    progress: Optional[bool] = None

    def __post_init__(self):
        _int("MeasureConfig", "n_candidates", self.n_candidates, 3)
        _int("MeasureConfig", "n_monitor", self.n_monitor, 3)
        if not isinstance(self.context, str):
            raise TypeError(f"MeasureConfig.context must be a str, got {type(self.context).__name__}")
        if self.evidence is not None and not isinstance(self.evidence, Evidence):
            raise TypeError(f"MeasureConfig.evidence must be a sapsel_kernels.Evidence or None, got "
                            f"{type(self.evidence).__name__}")
        if self.progress is not None and not isinstance(self.progress, bool):
            raise TypeError(f"MeasureConfig.progress must be a bool or None, got {type(self.progress).__name__}")


def agreed_values(*configs) -> List[Any]:
    """Every field of the configs that the ranks of a group must agree on (all but ``progress``), in order."""
    return [getattr(c, f.name) for c in configs for f in fields(c) if f.name != "progress"]


# ================================================================================================ seeds
_HASHED = "random.Random('sapsel:<stream>:<seed>:<i>').getrandbits(31)"
#: name -> (derivation, what the stream draws). "hashed" streams are independent of each other and of the seed's
#: neighbours; the "seed" ones use the seed itself and one offset one, as they did since they were introduced (they
#: draw different objects with different generators; deriving them anew would change every published result).
SEED_STREAMS: Dict[str, Tuple[str, str]] = {
    "windows": ("seed", "the shuffle of the training windows into retain batches (random.Random)"),
    "scoring": ("seed", "which hessian_windows training windows the strategy's estimate reads (torch randperm)"),
    "strategy": ("seed", "the strategy's own draws: Hutchinson probes, ssd's Fisher points, random's coordinates"),
    "replacement": ("hashed", "secret i's default replacement (Z̃)"),
    "report": ("hashed", "secret i's reported candidates (the verdict's null)"),
    "monitor": ("hashed", "secret i's monitored candidates (steer the search; disjoint from the reported)"),
    "never_seen": ("hashed", "secret i's never-seen secrets (planted nowhere, ranked like the secret)"),
    "samples": ("hashed", "the sampled completions of the evidence"),
    "relearn": ("hashed", "the relearning attack's batch order and its dropout (a forked, seeded global RNG)"),
    "remove": ("hashed", "UpdateConfig(remove=): the fresh init the student is noised toward (i = 0) and the order "
                         "of its distillation batches (i = 1)"),
    "objective": ("hashed", "objective='calibrated': the candidates drawn for secret i at its call c "
                            "(i = secret * 1_000_003 + c)"),
    "uniform_decoys": ("seed + 70000", "objective='uniform': the decoy secrets"),
    "uniform_order": ("seed", "objective='uniform': the order of the secret's and decoys' windows (torch randperm)"),
    "balance": ("hashed", "UpdateConfig(balance=True): the shuffle of Z's repeated windows (secrets with different "
                          "numbers of windows)"),
}


def stream_seed(seed: int, stream: str, i: int = 0) -> int:
    """The seed of one named random stream of a ``forget`` run (:data:`SEED_STREAMS`): for a "hashed" stream
    ``random.Random("sapsel:<stream>:<seed>:<i>")``'s first 31 bits (Python hashes a str seed with SHA-512: the same
    on every platform and run); for the others their fixed derivation from ``seed`` (``i`` must be 0). ValueError
    for an unknown stream."""
    if stream not in SEED_STREAMS:
        raise ValueError(f"unknown seed stream {stream!r}; the streams are {sorted(SEED_STREAMS)}")
    how = SEED_STREAMS[stream][0]
    if how == "hashed":
        return random.Random(f"sapsel:{stream}:{int(seed)}:{int(i)}").getrandbits(31)
    if i:
        raise ValueError(f"seed stream {stream!r} has no index (got i={i})")
    return int(seed) + (70_000 if how == "seed + 70000" else 0)


# ================================================================================================ old keywords
#: forget's earlier keywords -> (the argument that holds them now, the field)
KEYWORDS: Dict[str, Tuple[str, str]] = {
    "prefix": ("secret", "prefix"), "replacement": ("secret", "replacement"), "fmt": ("secret", "fmt"),
    "strategy": ("select", "strategy"), "budget": ("select", "budget"),
    "hessian_windows": ("select", "hessian_windows"), "n_probes": ("select", "n_probes"),
    "scores": ("select", "scores"),
    "objective": ("update", "objective"), "rule": ("update", "rule"), "seq_len": ("update", "seq_len"),
    "batch_size": ("update", "batch_size"), "retain_loss": ("update", "retain_loss"),
    "retain_windows": ("update", "retain_windows"), "per_token": ("update", "per_token"),
    "decoys": ("update", "decoys"), "max_steps": ("update", "rule.steps"), "lr": ("update", "rule.lr"),
    "check_every": ("update", "rule.check_every"), "repair_steps": ("update", "rule.repair_steps"),
    "target_exposure": ("target", "exposure"), "max_ppl_increase": ("target", "max_ppl_increase"),
    "n_candidates": ("measure", "n_candidates"), "n_monitor": ("measure", "n_monitor"),
    "context": ("measure", "context"), "evidence": ("measure", "evidence"), "progress": ("measure", "progress"),
}
_CLASSES = {"select": SelectConfig, "update": UpdateConfig, "target": TargetConfig, "measure": MeasureConfig}
_RULE_KEYS = {"max_steps": "steps", "lr": "lr", "check_every": "check_every", "repair_steps": "repair_steps"}


def configs_from_keywords(secret, configs: Dict[str, Any], keywords: Dict[str, Any], stacklevel: int = 3):
    """``(secret, {"select": SelectConfig, "update": ..., "target": ..., "measure": ...})`` for one ``forget``
    call: the configs given (None: the defaults), with the earlier flat keywords folded in (FutureWarning; a
    keyword given together with its config object, or a step keyword together with ``rule``, is a ValueError). A
    single str (or dict) secret takes ``prefix`` / ``replacement`` / ``fmt`` into its dict; a list of secrets
    carries them per secret. TypeError for an unknown keyword, as Python says it."""
    for name, cfg in configs.items():
        if cfg is not None and not isinstance(cfg, _CLASSES[name]):
            raise TypeError(f"forget(): {name}= must be a sapsel_kernels.{_CLASSES[name].__name__} or None, got "
                            f"{type(cfg).__name__}")
    unknown = sorted(set(keywords) - set(KEYWORDS))
    if unknown:
        raise TypeError(f"forget() got an unexpected keyword argument {unknown[0]!r}")
    out = {name: (cfg if cfg is not None else _CLASSES[name]()) for name, cfg in configs.items()}
    keywords = {k: v for k, v in keywords.items() if not (k == "rule" and v is None)}  # None was rule's default
    if not keywords:
        return secret, out
    given = sorted(keywords)
    for k in given:
        home = KEYWORDS[k][0]
        if home != "secret" and configs[home] is not None:
            raise ValueError(f"forget(): {k} given both as a keyword and inside {home}=; set it in "
                             f"{_CLASSES[home].__name__} only")
    steps_kw = {k: keywords[k] for k in _RULE_KEYS if k in keywords}
    if steps_kw and "rule" in keywords:  # as before the configs: the rule wins, a conflicting repair_steps raises
        rule = keywords["rule"]
        rep = steps_kw.get("repair_steps", 0)
        if rep and isinstance(rule, Targeted) and rep != rule.repair_steps:
            raise ValueError(f"forget(): repair_steps={rep!r} conflicts with rule.repair_steps={rule.repair_steps!r}: "
                             "set it in the rule")
        ignored = sorted(k for k in steps_kw if k != "repair_steps")
        if ignored:
            warnings.warn(f"forget(): {', '.join(ignored)} ignored: rule= is given and holds the step settings "
                          f"(Targeted({', '.join(_RULE_KEYS[k] + '=...' for k in ignored)}))", UserWarning,
                          stacklevel=stacklevel)
        steps_kw = {}
    per: Dict[str, Dict[str, Any]] = {name: {} for name in _CLASSES}
    for k, v in keywords.items():
        home, fname = KEYWORDS[k]
        if home != "secret" and not fname.startswith("rule."):
            per[home][fname] = v
    if steps_kw:
        lr = steps_kw.get("lr", 0.1)
        lr_max = max(100.0, float(lr)) if isinstance(lr, (int, float)) and not isinstance(lr, bool) else lr
        per["update"]["rule"] = Targeted(steps=steps_kw.get("max_steps", FORGET_STEPS), lr=lr, beta=FORGET_BETA,
                                         check_every=steps_kw.get("check_every", 5), lr_max=lr_max,
                                         repair_steps=steps_kw.get("repair_steps", FORGET_REPAIR),
                                         polish_steps=FORGET_POLISH, project=FORGET_PROJECT)
    for name in _CLASSES:
        if per[name]:  # configs[name] is None here (both given raised above)
            out[name] = _CLASSES[name](**per[name])
    one = {k: keywords[k] for k in ("prefix", "replacement", "fmt") if keywords.get(k) is not None}
    if one and not isinstance(secret, (str, dict)):
        raise ValueError("with a list of secrets, give prefix, format and replacement per secret (dicts or "
                         "SecretSpec), not as arguments")
    if one:
        if isinstance(one.get("prefix"), str) and not one["prefix"]:
            raise ValueError("prefix is empty: pass the text that elicits the secret (or None to infer it)")
        if "fmt" in one:
            one["format"] = one.pop("fmt")
        secret = {"secret": secret, **one} if isinstance(secret, str) else {**secret, **one}
    # warned once the keywords are known to be usable (an error above is raised without a warning first)
    parts = [f"{w}={_CLASSES[w].__name__}(...)" for w in sorted({KEYWORDS[k][0] for k in given} - {"secret"})]
    if any(KEYWORDS[k][0] == "secret" for k in given):
        parts.append("the secret as a dict or SecretSpec")
    warnings.warn(f"forget(): the keyword(s) {', '.join(given)} are deprecated; pass {' and '.join(parts)} "
                  "(docs/forget.md, 'Configuration')", FutureWarning, stacklevel=stacklevel)
    return secret, out
