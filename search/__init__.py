"""Tensor-network structure search (installed as structlayers.search).

    from structlayers.search import tnale, tnls, greedy, Structure
    result = tnale(target, topology="tr", max_evaluations=500, workers=2, log="run.jsonl")
    print(result.summary())           # ranks, permutation, RSE, compression, evaluations, time

Every search evaluates structures through an `Evaluator` (runner.py): objective
#params/#entries + lam * RSE, a cache, parallel ALS fits on any concurrent.futures.Executor,
evaluation/time budgets and a JSON-lines log that a restarted search resumes from.
"""

from .baselines import tr_svd, tt_svd
from .budget import Allocation, ModelBudget, budget
from .fit import Fit, fit_adam, fit_als, fit_lm
from .greedy import greedy
from .layers import auto, layer_ranks
from .result import SearchResult
from .runner import BudgetExhausted, Evaluation, Evaluator
from .structure import Structure
from .tnale import tnale
from .tnls import tnls
from .tucker import TuckerShape, tucker_error, tucker_params, tucker_ranks

__all__ = ["Allocation", "BudgetExhausted", "Evaluation", "Evaluator", "Fit", "ModelBudget",
           "SearchResult", "Structure", "TuckerShape", "auto", "budget", "fit_adam", "fit_als", "fit_lm",
           "greedy", "layer_ranks", "tnale", "tnls", "tr_svd", "tt_svd", "tucker_error",
           "tucker_params", "tucker_ranks"]
