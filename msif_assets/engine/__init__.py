"""msif engine: multi-stage EK-FAC influence for Hugging Face causal LMs (pure PyTorch).

No Dagster, no storage: fit factors, take query gradients, precondition and score.
"""

from .architectures import SUPPORTED_MODEL_TYPES, UnsupportedArchitectureError
from .batching import LMBatch, LMExample, classification_example, document_example, make_batches, query_example
from .factors import CovarianceStats, Eigenbasis, EkfacFactors, FactorMetadata, LambdaStats, assemble_factors, eigendecompose
from .influence import (
    METHODS,
    FactorArgs,
    Scores,
    factor_metadata,
    fit_covariance,
    fit_factors,
    fit_lambdas,
    preconditioned_queries,
    score_examples,
    sequence_gradients,
    token_gradients,
)
from .modules import IncompatibleModelsError, ModuleSpec, discover_modules, shared_modules
from .precondition import Damping, precondition

__all__ = [name for name in dir() if not name.startswith("_")]
