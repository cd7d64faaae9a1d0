"""The method contract and its registry.

A method states which parameters train and returns a loss for a batch; the one
shared trainer (bench.train) owns the optimizer, schedule, precision, clipping,
checkpointing and evaluation, so every method gets the same protocol.

    @register_method("my_method")
    class MyMethod(Method):
        @dataclass(frozen=True)
        class Hparams:
            lam: float = 1.0
            SEARCH = {"lam": ("log10_uniform", -2, 1)}   # optional: the random-search space

        def __init__(self, clip, task, hparams):
            super().__init__(clip, task, hparams)
            self.train_only(self.model.visual)          # what trains

        def loss(self, batch):
            return F.cross_entropy(self.predict(batch["images"]), batch["labels"])

A method that extends another extends its Hparams too (`class Hparams(ERM.Hparams):`, also a frozen
dataclass) and declares only its new fields, or a field whose default it changes; the parent's fields come
first. SEARCH, a class attribute, is inherited unless the subclass's Hparams sets its own.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.metadata
import importlib.util
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from bench import text
from bench.config import from_dict
from bench.data import Task
from bench.errors import BenchError
from bench.models import Clip
from bench.registry import Registry

log = logging.getLogger(__name__)

METHODS: Registry[type["Method"]] = Registry("method")
register_method = METHODS.register


@dataclass(frozen=True)
class NoHparams:
    pass


class Method(nn.Module):
    """Base class. Subclasses set `Hparams` (a frozen dataclass), decide what trains, and define `loss`."""

    name: ClassVar[str]
    Hparams: ClassVar[type] = NoHparams
    trains: ClassVar[bool] = True  # False: evaluated as is (the zero-shot baseline)
    # A reference row: tables and plots list baselines first, in this order; the zero-shot model is 0 (and is
    # drawn as the reference point in plots), plain fine-tuning (ERM) 1. Read with baseline_of(cls): only the
    # class that sets it is a baseline, so a method subclassing ERM is not (bench.results records it per run).
    baseline: ClassVar[int | None] = None

    def __init__(self, clip: Clip, task: Task, hparams: Any):
        super().__init__()
        self.model = clip.model
        self.clip = clip
        self.task = task
        self.hparams = hparams
        self.model.requires_grad_(False)
        self.logit_scale_init = float(self.model.logit_scale.exp().item())
        self.templates = list(task.templates)

    @classmethod
    def check_hparams(cls, hparams: Any) -> None:
        """Reject hparam values the method cannot use (a closed set of choices, a range), before any model is
        built: raise BenchError('hparams.<key>: <value> ...; <fix>') (check_choice and check_range help).
        Called by resolve_hparams, so `bench run`, prepare and sweep expansion all check. Default: nothing."""

    @classmethod
    def check_resources(cls, hparams: Any, cfg: Any) -> None:
        """Check that the files this method reads besides the dataset (a captioner's weights, an image-text pool)
        are there, before launch: raise BenchError('hparams.<key>: <path> not found; <how to get it>').
        Called by `bench sweep` (bench.sweep.check_resources: once per distinct method, hparams and data root)
        and `bench datasets --check --sweep`. cfg: the run's RunConfig. Default: nothing."""

    # ---- what trains ----------------------------------------------------------------------
    def train_only(self, *modules: nn.Module | nn.Parameter) -> None:
        """Mark these modules or parameters as trained (everything starts frozen)."""
        for m in modules:
            m.requires_grad_(True)

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The state that training changes: trainable parameters (frozen ones come from the pretrained model)."""
        return {n: p.detach().clone() for n, p in self.trainable_parameters()}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.named_parameters())
        missing = [n for n, _ in self.trainable_parameters() if n not in state]
        if missing:
            raise BenchError(f"checkpoint lacks trained parameters {missing[:3]}; it belongs to another method")
        with torch.no_grad():
            for n, v in state.items():
                params[n].copy_(v)

    # ---- optional hooks: own optimizer, state updated after each step ----------------------------
    # The trainer keeps the schedule (it scales each param group's "lr"), clipping, precision, checkpointing
    # (optimizer.state_dict() with every checkpoint) and evaluation; a method that defines none of these is
    # trained with the trainer's AdamW and has nothing to update or save besides its trained parameters.
    def make_optimizer(self, named_params: list[tuple[str, nn.Parameter]], lr: float, weight_decay: float
                       ) -> torch.optim.Optimizer | None:
        """The method's own optimizer over `named_params` (its trainable parameters), with base learning rate lr
        in every param group; its state must live in its state_dict (anything else must be a function of the
        pretrained weights) so that a resumed run continues exactly. None (default): the trainer's AdamW
        (bench.train.make_optimizer) with train.weight_decay."""
        return None

    def after_step(self, step: int, total_steps: int) -> None:
        """Called after the optimizer's step `step` (0-based) of `total_steps`, e.g. to update an EMA teacher.
        State it changes belongs in extra_state(), or a resumed run diverges from an unbroken one."""

    def extra_state(self) -> dict[str, torch.Tensor]:
        """State besides the trained parameters that training changes (an EMA teacher): the live tensors, by
        name. Saved with every checkpoint (key "method_extra") and copied back into these tensors on resume by
        load_extra_state. Not part of checkpoint_state: WiSE-FT and final.pt see the trained parameters only."""
        return {}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        own = self.extra_state()
        if own.keys() != state.keys():
            missing, unknown = sorted(set(own) - set(state)), sorted(set(state) - set(own))
            raise BenchError(f"checkpoint's extra state does not match method {type(self).name!r} (missing "
                             f"{missing[:3]}, unknown {unknown[:3]}); it belongs to another method or version")
        with torch.no_grad():
            for n, v in state.items():
                own[n].copy_(v)

    # ---- the loss: what a method must define ------------------------------------------------
    def loss(self, batch: dict[str, Any]) -> torch.Tensor | tuple[torch.Tensor, dict[str, float]]:
        """Define this, or `features` and `loss_from_features` (then this is their composition)."""
        if type(self).features is Method.features:
            raise NotImplementedError(f"{type(self).__name__} defines neither loss nor features")
        batch = self.drawn(batch)
        return self.loss_from_features(self.features(batch), batch)

    # ---- gradient accumulation (train.accum_steps > 1; bench/accumulate.py) --------------------------
    # The trainer splits a step's batch into micro-batches and takes one of two routes, each giving the gradient
    # of the unsplit step; a method that allows neither is refused at load time.
    # - mean: loss(batch) equals the size-weighted mean of loss(part) over the parts of a split (a mean over
    #   examples, plus terms that do not depend on the examples). Declare `loss_is_mean = True` in the class
    #   that defines `loss`: it is read from there, so a subclass with a loss of its own does not inherit it.
    # - features: the loss couples the examples (contrastive). Define `features(batch)` (per-example feature
    #   rows: each part's rows, concatenated in order, are the batch's) and `loss_from_features(features,
    #   batch)` instead of `loss`; the features of every part are computed without gradients, the loss from all
    #   of them once, then each part's features again with gradients, back-propagated with their share of it.
    # Random draws of a step go in `draw`, made once per full batch, so a split step draws what the unsplit
    # one does; per-example entries it adds are named in `row_keys` (split with the batch), the rest are shared.
    loss_is_mean: ClassVar[bool] = False
    row_keys: ClassVar[tuple[str, ...]] = ()

    def draw(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The step's random draws (from torch's RNG, seeded per step by the trainer), added to the batch."""
        return {}

    def drawn(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch with this step's draws; a batch (or part of one) that has them is returned as it is."""
        return batch if batch.get("drawn") else {**batch, **self.draw(batch), "drawn": True}

    def features(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} defines no features")

    def loss_from_features(self, features: dict[str, torch.Tensor], batch: dict[str, Any]
                           ) -> torch.Tensor | tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError(f"{type(self).__name__} defines no loss_from_features")

    @classmethod
    def accumulation_route(cls) -> str | None:
        """'features', 'mean', or None: how a step of this method may be split (see above)."""
        owner = next(c for c in cls.__mro__ if "loss" in vars(c))
        if owner is Method and cls.features is not Method.features:
            return "features"
        return "mean" if vars(owner).get("loss_is_mean", False) else None

    # ---- inference: used by evaluation --------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_image(images), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(text.encode_text(self.model, tokens), dim=-1)

    def text_head(self, classnames: list[str], templates: list[str] | None = None) -> torch.Tensor:
        """(K, D) template-averaged class embeddings from the current text tower."""
        device = next(self.model.parameters()).device
        raw = text.raw_embeddings(self.encode_text, self.clip.tokenize, classnames,
                                  templates or self.templates, device)
        return text.class_weights(raw)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Logits over the task's seen classes."""
        return self.logit_scale_init * self.encode_image(images) @ self.seen_head().t()

    def seen_head(self) -> torch.Tensor:
        return self.text_head(self.task.seen_names)

    def evaluating(self) -> contextlib.AbstractContextManager:
        """A context manager entered around each evaluation (bench/evaluate.py `evaluate`, so also around each
        post-hoc WiSE or soup variant, whose weights are loaded into the method just before). A method that caches
        anything derived from its weights (FLYP's and LoRA's text head) drops it on entry, since the weights may
        have changed since the last evaluation; one that evaluates other weights than it trains (WiSE-FT: the
        interpolation with the zero-shot weights) swaps them in on entry and restores the trained ones on exit.
        The default does nothing."""
        return contextlib.nullcontext()


def baseline_of(cls: type[Method]) -> int | None:
    """The class's own `baseline` (Method.baseline), not inherited: subclasses of a baseline are not baselines."""
    return vars(cls).get("baseline")


def resolve_hparams(method: str, hparams: dict | None, source: str = "config") -> Any:
    cls = METHODS.get(method)
    resolved = from_dict(cls.Hparams, hparams or {}, source, prefix="hparams.")
    try:
        cls.check_hparams(resolved)
    except BenchError as err:
        raise BenchError(f"{source}: {err}") from None
    return resolved


def check_choice(hparams: Any, key: str, choices: tuple) -> None:
    """For check_hparams: hparams.<key> must be one of `choices`."""
    value = getattr(hparams, key)
    if value not in choices:
        raise BenchError(f"hparams.{key}: {value!r} is not one of {', '.join(map(str, choices))}; set one of them")


def check_range(hparams: Any, key: str, lo: float | None = None, hi: float | None = None, hi_open: bool = False,
                what: str = "") -> None:
    """For check_hparams: lo <= hparams.<key> <= hi (< hi if hi_open); None: unbounded. NaN and inf fail."""
    value = getattr(hparams, key)
    ok = (lo is None or value >= lo) and (hi is None or (value < hi if hi_open else value <= hi))
    if not (ok and math.isfinite(value)):
        rng = (f"in [{lo:g}, {hi:g}{')' if hi_open else ']'}" if lo is not None and hi is not None
               else f"at least {lo:g}" if lo is not None else f"at most {hi:g}")
        raise BenchError(f"hparams.{key}: {value!r} is out of range; set it {rng}{f' ({what})' if what else ''}")


def build_method(name: str, clip: Clip, task: Task, hparams: dict | None, source: str = "config") -> Method:
    cls = METHODS.get(name)
    return cls(clip, task, resolve_hparams(name, hparams, source))


# ---- plugins: methods from the user's own files ----------------------------------------------
_BUILTINS_LOADED = False


def load_builtin_methods() -> None:
    """Import the shipped methods (the explicit list in methods/__init__.py) and entry points."""
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    importlib.import_module("methods")
    for ep in importlib.metadata.entry_points(group="rft_bench.methods"):
        try:
            ep.load()
        except Exception as err:  # noqa: BLE001
            raise BenchError(f"entry point {ep.name} = {ep.value} failed to import: {err}; fix or uninstall it") from None


def load_plugin(path: str | Path) -> None:
    """Import a user's Python file so that its @register_method classes join the registry."""
    path = Path(path).resolve()
    if not path.is_file():
        raise BenchError(f"plugin {path} not found; give the path of a .py file that registers methods")
    module_name = f"rft_bench_plugin_{path.stem}_{abs(hash(str(path))) % 10**8}"
    if module_name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BenchError:
        raise
    except Exception as err:  # noqa: BLE001
        del sys.modules[module_name]
        raise BenchError(f"plugin {path} failed to import ({type(err).__name__}: {err}); fix the file") from None


def hparams_dict(hparams: Any) -> dict:
    return dataclasses.asdict(hparams) if dataclasses.is_dataclass(hparams) else dict(hparams)
