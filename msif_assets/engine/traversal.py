"""The one traversal: forward + backward over batches, handing each tracked module's
``a`` (inputs) and ``s`` (output gradients) to a collector.

Weights never get gradients: every parameter is frozen for the pass and the input
embeddings' output is made to require grad, so autograd computes only what flows back
through activations — no ``.grad`` buffers, no weight-gradient GEMMs we would throw away.
Collectors do their own (cheaper) contractions on ``a`` and ``s``.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterable, Iterator, Protocol

import torch
from torch import nn

from .batching import LMBatch
from .modules import ModuleSpec
from .objectives import LabelSource, logit_gradient

log = logging.getLogger(__name__)


class Collector(Protocol):
    """What a traversal accumulates. ``a``: (B, T, d_in) with the bias 1 appended; ``s``:
    (B, T, d_out), gradient of the summed objective w.r.t. the module output.

    Batches are right-padded and the models causal, so ``s`` is exactly 0 at pad positions:
    products with ``s`` need no mask. Only statistics of ``a`` alone (the A covariance) must
    drop pads themselves, using ``batch.attention_mask`` from ``begin_batch``."""

    def begin_batch(self, batch: LMBatch) -> None: ...

    def collect(self, spec: ModuleSpec, a: torch.Tensor, s: torch.Tensor) -> None: ...


@contextmanager
def _frozen_parameters(model: nn.Module) -> Iterator[None]:
    previous = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in previous:
        p.requires_grad_(False)
    handle = model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
    try:
        yield
    finally:
        handle.remove()
        for p, flag in previous:
            p.requires_grad_(flag)


@contextmanager
def _module_hooks(model: nn.Module, specs: list[ModuleSpec], collector: Collector) -> Iterator[None]:
    modules = dict(model.named_modules())
    handles = []

    def make_hook(spec: ModuleSpec):
        def forward_hook(_module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            a = inputs[0].detach()
            if spec.has_bias:
                a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
            output.register_hook(lambda s: collector.collect(spec, a, s.detach()))

        return forward_hook

    try:
        for spec in specs:
            handles.append(modules[spec.name].register_forward_hook(make_hook(spec)))
        yield
    finally:
        for handle in handles:
            handle.remove()


_label: ContextVar[str] = ContextVar("msif_progress_label", default="")
_label_source: Callable[[], str] | None = None


@contextmanager
def progress_label(label: str) -> Iterator[None]:
    """Name what the body works on (``"pt_covariance [shard-03]"``): every :class:`Progress`
    line logged inside it starts with the label."""
    token = _label.set(label)
    try:
        yield
    finally:
        _label.reset(token)


def set_progress_label_source(source: Callable[[], str] | None) -> None:
    """Where labels come from when no :func:`progress_label` is active: a callable returning
    the label of the work in progress, or ``""``. The engine knows nothing of Dagster; the
    definitions install one that names the running asset and partition (``defs/progress.py``)."""
    global _label_source
    _label_source = source


def current_progress_label() -> str:
    label = _label.get()
    if not label and _label_source is not None:
        try:
            label = _label_source()
        except Exception:  # a label is a courtesy: it never breaks the work it describes
            label = ""
    return label


class Progress:
    """Logs ``<label>: <what> 12/96 (detail), 41.0s`` at most every ``every`` seconds (and
    always when ``force``): long steps are never silent, and each line names what it works on
    (see :func:`progress_label`)."""

    def __init__(self, what: str, total: int | None = None, every: float = 10.0):
        self.what, self.total, self.every = what, total, every
        self.started = self.last = time.perf_counter()

    def update(self, done: int, detail: str = "", force: bool = False) -> None:
        now = time.perf_counter()
        if force or now - self.last > self.every:
            self.last = now
            of = f"/{self.total}" if self.total else ""
            label = current_progress_label()
            log.info("%s%s %d%s%s, %.1fs", f"{label}: " if label else "", self.what, done, of,
                     f" ({detail})" if detail else "", now - self.started)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def traverse(
    model: nn.Module,
    specs: list[ModuleSpec],
    batches: Iterable[LMBatch],
    collector: Collector,
    labels: LabelSource = "data",
    seed: int = 0,
    description: str = "traversal",
    total_batches: int | None = None,
) -> None:
    """Run forward + backward of ``Σ log p(targets)`` over ``batches``, feeding ``collector``.

    ``labels="sampled"`` draws targets from the model (true Fisher), seeded by ``seed`` so a
    pass is reproducible. The model is put in eval mode (no dropout) and restored afterwards.
    """
    device = model_device(model)
    generator = torch.Generator(device=device).manual_seed(seed) if labels == "sampled" else None
    was_training = model.training
    model.eval()
    progress = Progress(f"{description}: batch", total_batches)
    try:
        with _frozen_parameters(model), _module_hooks(model, specs, collector):
            for done, batch in enumerate(batches, start=1):
                batch = batch.to(device)
                collector.begin_batch(batch)
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                logits.backward(logit_gradient(logits, batch, labels, generator))
                progress.update(done)
    finally:
        model.train(was_training)
