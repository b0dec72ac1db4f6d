"""kronfluence 1.0.1 EK-FAC on the same model, data, batches and absolute damping.

Matching choices (see METHOD.md, "Comparing with kronfluence"):

* tracked modules: exactly our specs (its default would also track the LM head);
* head split OFF on our side (kronfluence's EK-FAC is unsplit);
* losses summed per sequence (never token means); ``get_attention_mask`` supplied, so its A and
  S are token means over non-pad positions, like ours;
* sampled labels: the task draws them with the engine's own ``objectives.sample_from`` from a
  generator re-seeded with ``seed`` before the covariance pass and ``seed + 1`` before the Λ
  pass — the same draws, in the same order, as our engine (same batches, same logits), so the
  two fits see identical labels and agree to float32 round-off (kronfluence itself leaves
  sampling to the task; with independent draws expect Spearman ≈ 0.95–0.99 on small sets);
* ``damping_factor`` = our absolute λ;
* sign: kronfluence scores ``∇f(q)ᵀ P ∇L(z)`` with ``L = −log p``; ours use ``+log p``, so
  ``ours = −theirsᵀ`` (theirs is (Q, N)).

kronfluence's wheel *declares* torchvision as a dependency but never imports it (checked for
1.0.1: no ``import torchvision`` anywhere in the package), so ``pip install --no-deps
kronfluence==1.0.1`` plus its small deps is enough; this module asserts torchvision stayed out.
"""

from __future__ import annotations

import copy
import logging
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from msif_assets.engine import LMExample
from msif_assets.engine.objectives import sample_from as engine_sample_from

from .measure import Meter, Phase
from .workload import Data, Workload

try:  # kronfluence is optional: the benchmark runs our part without it
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs

    KRONFLUENCE_ERROR: str | None = None
except Exception as error:  # noqa: BLE001 - report any import failure, run without it
    KRONFLUENCE_ERROR = f"{type(error).__name__}: {error}"
    Task = object  # type: ignore[misc,assignment]


def kronfluence_version() -> str | None:
    if KRONFLUENCE_ERROR is not None:
        return None
    from importlib.metadata import version

    return version("kronfluence")


class ExampleDataset(Dataset):
    """Our ``LMExample`` list as kronfluence batches (dicts of tensors)."""

    def __init__(self, examples: Sequence[LMExample]):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        e = self.examples[index]
        return {"input_ids": torch.tensor(e.input_ids), "target_mask": torch.tensor(e.target_mask)}


def collate(items: list[dict[str, torch.Tensor]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad like our ``make_batches`` (same batch tensors for equal-length examples)."""
    length = max(len(i["input_ids"]) for i in items)
    ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(items), length), dtype=torch.long)
    targets = torch.zeros((len(items), length), dtype=torch.bool)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        ids[row, :n], attention[row, :n], targets[row, :n] = item["input_ids"], 1, item["target_mask"]
    return {"input_ids": ids, "attention_mask": attention, "target_mask": targets}


class LanguageModelingTask(Task):  # type: ignore[misc]
    """Summed −log p of the targets (train loss) and log p(completion | prompt) (measurement)."""

    def __init__(self, module_names: list[str], seed: int = 0, sampler: Callable = engine_sample_from):
        self.module_names = module_names
        self.sampler = sampler
        self.generator = torch.Generator().manual_seed(seed)

    def reseed(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    @staticmethod
    def _targets(batch: dict[str, torch.Tensor], model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        shifted = batch["target_mask"][:, 1:]
        return logits[:, :-1][shifted], batch["input_ids"][:, 1:][shifted]

    def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
        pred, tokens = self._targets(batch, model)
        if sample:
            with torch.no_grad():
                tokens = self.sampler(pred.detach(), self.generator)
        return F.cross_entropy(pred, tokens, reduction="sum")

    def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
        pred, tokens = self._targets(batch, model)
        return -F.cross_entropy(pred, tokens, reduction="sum")

    def get_influence_tracked_modules(self) -> list[str]:
        return list(self.module_names)

    def get_attention_mask(self, batch: Any) -> torch.Tensor:
        return batch["attention_mask"]


@dataclass
class KronResult:
    """kronfluence phases and its SS-IF scores in our orientation and sign: (N, Q), +∇log p."""

    phases: list[Phase] = field(default_factory=list)
    scores: torch.Tensor | None = None
    error: str | None = None


def run_kronfluence(
    meter: Meter, w: Workload, model: nn.Module, specs: list, data: Data, sampler: Callable = engine_sample_from,
    query_rank: int | None = None,
) -> KronResult:
    """``query_rank``: kronfluence's ``query_gradient_low_rank`` (None: its default, dense query gradients)."""
    if KRONFLUENCE_ERROR is not None:
        return KronResult(error=f"kronfluence unavailable ({KRONFLUENCE_ERROR})")
    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    with warnings.catch_warnings():  # its torch.cuda.amp.GradScaler FutureWarning, once per pass
        warnings.simplefilter("ignore", FutureWarning)
        return _run(meter, w, model, specs, data, sampler, query_rank)


def _run(meter: Meter, w: Workload, model: nn.Module, specs: list, data: Data, sampler: Callable,
         query_rank: int | None) -> KronResult:
    out = KronResult()
    task = LanguageModelingTask([s.name for s in specs], seed=w.seed, sampler=sampler)
    prepared = prepare_model(copy.deepcopy(model), task)
    device_is_cpu = next(model.parameters()).device.type == "cpu"
    with tempfile.TemporaryDirectory(prefix="kronfluence-bench-") as output_dir:
        analyzer = Analyzer(
            analysis_name="bench", model=prepared, task=task, cpu=device_is_cpu,
            disable_tqdm=True, output_dir=output_dir, log_level=logging.WARNING,
        )
        analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=collate))
        factor_args = FactorArguments(
            strategy="ekfac", use_empirical_fisher=False, covariance_max_examples=None, lambda_max_examples=None
        )
        fit = ExampleDataset(data.fit)
        common = dict(factors_name="ekfac", factor_args=factor_args, overwrite_output_dir=True)
        task.reseed(w.seed)
        with meter.phase("covariance", engine="kronfluence") as p:
            analyzer.fit_covariance_matrices(dataset=fit, per_device_batch_size=w.batch_size, **common)
        out.phases.append(p)
        with meter.phase("eigendecomposition", engine="kronfluence") as p:
            analyzer.perform_eigendecomposition(**common)
        out.phases.append(p)
        task.reseed(w.seed + 1)
        with meter.phase("lambda", engine="kronfluence") as p:
            analyzer.fit_lambda_matrices(dataset=fit, per_device_batch_size=w.batch_size, **common)
        out.phases.append(p)
        score_args = ScoreArguments(damping_factor=w.damping, query_gradient_low_rank=query_rank)
        with meter.phase(
            "pairwise scoring (SS-IF)", engine="kronfluence", note="includes query gradients + preconditioning"
        ) as p:
            analyzer.compute_pairwise_scores(
                scores_name="pairwise", factors_name="ekfac",
                query_dataset=ExampleDataset(data.queries), train_dataset=ExampleDataset(data.candidates),
                per_device_query_batch_size=w.batch_size, per_device_train_batch_size=w.batch_size,
                score_args=score_args, overwrite_output_dir=True,
            )
        out.phases.append(p)
        scores = analyzer.load_pairwise_scores("pairwise")["all_modules"]  # (Q, N), −∇log p side
    out.scores = -scores.T.double()
    assert "torchvision" not in sys.modules, "kronfluence pulled in torchvision"
    return out
