"""Evaluating structures for a search: objective, cache, parallel fits, budgets, a resumable log.

    f(structure) = #params / #entries + lam * RSE        (RSE squared by default, as TnALE/TNLS)

Every search algorithm asks an `Evaluator` for batches of structures. It answers from its cache,
or fits them (ALS, `fit.fit_als`) through any concurrent.futures.Executor (a process pool by
default; a Dask distributed client's `get_executor()` works the same), appends each result to a
JSON-lines log as it arrives, and stops the search with `BudgetExhausted` when the evaluation or
time budget runs out. A search restarted with the same log re-reads it and re-fits nothing it
already fitted. Fits are seeded by the structure, so a result never depends on the order or the
worker that computed it.

Contenders get more starts: ALS (and its LM polish) from one random start misses the exact fit of
a small structure that has one in 10-60% of tries (fresh order-4 rings; `fit.py`), and a missed
truth sends a search elsewhere for good. So on small targets (`CONTENDER_ENTRIES`) a structure
whose parameter share alone is below the best objective seen so far, the only kind that can still
win, is fitted from up to `contender_starts` starts (the first exact one ends them). The number of
starts is logged with the fit, so a resumed search retraces the same path and refits the same
cores.
"""

import ctypes
import hashlib
import json
import os
import signal
import sys
import threading
import time
import warnings
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .fit import check_target, fit_als
from .structure import Structure

RSE_KINDS = ("squared", "plain")
LOG_VERSION = 1
FITTER = "proximal-als-0.7+lm"  # a log's fits are reused only by the same fitter
# targets up to this size give contenders extra starts: order-4 rings of 3s and 4s. Order 6
# (4096 entries) fits its truths from one start in 19-20 of 20 tries, and 4 starts made its
# TnALE searches 4.7x slower (176 s against 37); at order 5 (1024 entries) they doubled the
# search tests' time
CONTENDER_ENTRIES = 2**9


class BudgetExhausted(Exception):
    """The evaluation or time budget ran out; the evaluator keeps everything evaluated so far."""


@dataclass
class Evaluation:
    structure: Structure
    rse: float  # as configured: squared (||X - T||^2 / ||T||^2) or plain (its square root)
    objective: float
    seconds: float
    cores: list | None = field(default=None, repr=False)  # None when read back from a log
    starts: int = 1  # random starts the fit took the best of

    @property
    def compression(self) -> float:
        return self.structure.compression


def objective(structure: Structure, rse: float, lam: float) -> float:
    return structure.num_params / structure.num_entries + lam * rse


def _init_worker(parent: int):
    """Worker initializer: one BLAS thread per worker (the workers are the parallelism: with
    OpenBLAS's default of a thread per core in every process, a 200 x 200 solve took 150 ms
    instead of 0.7 ms once processes' threads outnumbered the 2 cores, and LM fits took 0.7-1 s
    instead of 0.1), and the worker dies with the search (`_die_with_parent`)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    _die_with_parent(parent)


def _die_with_parent(parent: int):
    """End this worker when the search process `parent` ends, even by SIGKILL (then no shutdown
    runs, and an orphaned worker would fit forever). Linux's parent-death signal where the
    parent forked us, and a watcher thread everywhere."""
    if sys.platform.startswith("linux") and os.getppid() == parent:
        try:
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    def watch():
        while True:
            try:
                os.kill(parent, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:  # exists, owned by someone else: not ours any more
                os._exit(1)
            time.sleep(0.25)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def _fit_job(target, key: str, fit_kwargs: dict, rse_kind: str, starts: int = 1):
    """One fit in a worker, the best of `starts` (at least fit_kwargs' restarts):
    (key, rse, seconds, cores, starts)."""
    start = time.perf_counter()
    structure = Structure.from_key(key)
    seed = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    starts = max(starts, fit_kwargs.get("restarts", 1))
    result = fit_als(target, structure, seed=seed, **(fit_kwargs | {"restarts": starts}))
    rse = result.rse if rse_kind == "squared" else float(np.sqrt(result.rse))
    return key, rse, time.perf_counter() - start, result.cores, starts


class Evaluator:
    """Objective values of structures on one target, with cache, budgets, executor and log.

    lam: weight of the RSE in the objective. rse: "squared" or "plain". fit: keyword arguments
    for fit_als (max_sweeps, tol, restarts). executor: an Executor to fit with (not shut down
    here); else `workers` processes (1: fit in this process). log: a JSON-lines path to append
    to and resume from. max_evaluations / max_seconds: budgets. progress: a tqdm bar (None:
    only when stderr is a terminal). contender_starts: starts for a structure that can still win
    (see the module doc; None: 4 on targets of up to `CONTENDER_ENTRIES` entries, else 1).
    """

    def __init__(self, target, lam: float = 200.0, rse: str = "squared", fit: dict | None = None,
                 executor: Executor | None = None, workers: int = 1, log=None,
                 max_evaluations: int | None = None, max_seconds: float | None = None,
                 progress: bool | None = None, contender_starts: int | None = None):
        self.target = check_target(target)
        if contender_starts is None:
            contender_starts = 4 if self.target.size <= CONTENDER_ENTRIES else 1
        if isinstance(contender_starts, bool) or not isinstance(contender_starts, int) \
                or contender_starts < 1:
            raise ValueError(f"contender_starts must be a positive int (or None: automatic), "
                             f"got {contender_starts!r}")
        self.contender_starts = contender_starts
        if not (isinstance(lam, int | float) and lam >= 0 and np.isfinite(lam)):
            raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
        if rse not in RSE_KINDS:
            raise ValueError(f"rse must be one of {RSE_KINDS}, got {rse!r}")
        for name, value in (("max_evaluations", max_evaluations), ("max_seconds", max_seconds)):
            if value is not None and not (isinstance(value, int | float) and value > 0):
                raise ValueError(f"{name} must be positive (or None for no limit), got {value!r}")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive int, got {workers!r}")
        self.lam, self.rse_kind, self.fit_kwargs = float(lam), rse, dict(fit or {})
        self.max_evaluations, self.max_seconds = max_evaluations, max_seconds
        self.cache: dict[str, Evaluation] = {}
        self.start = time.perf_counter()
        self._executor, self._own_executor = executor, None
        self.workers = workers
        self.log = Path(log) if log is not None else None
        if self.log is not None:
            self._open_log()
        if progress not in (None, True, False):
            raise ValueError(f"progress must be None (a bar on a terminal only), True or False, "
                             f"got {progress!r}")
        # disable=None: tqdm shows the bar only when stderr is a terminal, so logs and CI output
        # never fill with carriage-return updates
        self.bar = tqdm(total=max_evaluations, desc="evaluations", unit="fit",
                        disable=None if progress is None else not progress, initial=len(self.cache))

    # --- the log -----------------------------------------------------------------------------
    def _header(self) -> dict:
        digest = hashlib.sha256(np.ascontiguousarray(self.target).tobytes()).hexdigest()
        return {"structlayers_search_log": LOG_VERSION, "target_sha256": digest,
                "shape": list(self.target.shape), "lam": self.lam, "rse": self.rse_kind,
                "fit": self.fit_kwargs, "fitter": FITTER, "contender_starts": self.contender_starts}

    def _open_log(self):
        header = self._header()
        if not self.log.exists() or self.log.stat().st_size == 0:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            self.log.write_text(json.dumps(header) + "\n")
            return
        lines = self.log.read_text().splitlines()
        try:
            found = json.loads(lines[0])
        except (json.JSONDecodeError, IndexError):
            raise ValueError(f"{self.log} is not a structlayers search log (bad first line)") from None
        if not isinstance(found, dict) or found.get("structlayers_search_log") != LOG_VERSION:
            raise ValueError(f"{self.log} is not a structlayers search log (version {LOG_VERSION})")
        for name in ("target_sha256", "shape", "lam", "rse", "fit", "fitter", "contender_starts"):
            if found.get(name) != header[name]:
                raise ValueError(f"{self.log} was written for another search: its {name} is "
                                 f"{found.get(name)!r}, this search's is {header[name]!r}")
        for number, line in enumerate(lines[1:], start=2):
            try:
                row = json.loads(line)
                structure = Structure.from_key(row["key"])
                evaluation = Evaluation(structure, float(row["rse"]),
                                        objective(structure, float(row["rse"]), self.lam),
                                        float(row["seconds"]), starts=int(row["starts"]))
            except (json.JSONDecodeError, KeyError, ValueError, TypeError) as error:
                if number == len(lines):  # a kill mid-write: drop the partial last line
                    warnings.warn(f"{self.log}: skipping its unreadable last line ({error})", stacklevel=3)
                    self.log.write_text("\n".join(lines[:-1]) + "\n")
                    break
                raise ValueError(f"{self.log}: line {number} is corrupt ({error})") from None
            self.cache[row["key"]] = evaluation

    def _append(self, evaluation: Evaluation):
        if self.log is not None:
            row = {"key": evaluation.structure.key(), "rse": evaluation.rse,
                   "objective": evaluation.objective, "params": evaluation.structure.num_params,
                   "seconds": round(evaluation.seconds, 6), "starts": evaluation.starts}
            with self.log.open("a") as f:
                f.write(json.dumps(row) + "\n")

    # --- evaluating ----------------------------------------------------------------------------
    @property
    def evaluations(self) -> int:
        """Structures evaluated so far (fits, including those resumed from the log)."""
        return len(self.cache)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def best(self) -> Evaluation | None:
        return min(self.cache.values(), key=lambda e: e.objective, default=None)

    def __call__(self, structure: Structure) -> Evaluation:
        return self.evaluate([structure])[0]

    def evaluate(self, structures) -> list[Evaluation]:
        """Evaluations of `structures` (in order). New ones are fitted in parallel; raises
        BudgetExhausted (after recording what was fitted) if the budget runs out first."""
        keys = list(dict.fromkeys(s.key() for s in structures))
        new = [k for k in keys if k not in self.cache]
        exhausted = False
        if self.max_evaluations is not None and self.evaluations + len(new) > self.max_evaluations:
            new, exhausted = new[: max(0, self.max_evaluations - self.evaluations)], True
        if self.max_seconds is not None and self.seconds > self.max_seconds:
            new, exhausted = [], True
        for key, rse, seconds, cores, starts in self._fit(new):
            structure = Structure.from_key(key)
            evaluation = Evaluation(structure, rse, objective(structure, rse, self.lam), seconds, cores,
                                    starts)
            self.cache[key] = evaluation
            self._append(evaluation)
            self.bar.update(1)
        if exhausted:
            raise BudgetExhausted(f"budget exhausted after {self.evaluations} evaluations, "
                                  f"{self.seconds:.1f} s")
        return [self.cache[s.key()] for s in structures]

    def _starts(self, keys) -> list[int]:
        """Starts for new fits: `contender_starts` for a structure whose parameter share is below
        the best objective so far, else 1 (decided before a batch is fitted: workers do not
        matter)."""
        best = self.best()
        bound = float("inf") if best is None else best.objective
        structures = [Structure.from_key(key) for key in keys]
        return [self.contender_starts if s.num_params / s.num_entries < bound else 1 for s in structures]

    def _fit(self, keys):
        if not keys:
            return
        starts = self._starts(keys)
        executor = self._executor
        if executor is None and self.workers > 1 and len(keys) > 1:
            if self._own_executor is None:
                self._own_executor = ProcessPoolExecutor(
                    self.workers, initializer=_init_worker, initargs=(os.getpid(),))
            executor = self._own_executor
        if executor is None:
            for key, n in zip(keys, starts, strict=True):
                yield _fit_job(self.target, key, self.fit_kwargs, self.rse_kind, n)
            return
        futures = [executor.submit(_fit_job, self.target, key, self.fit_kwargs, self.rse_kind, n)
                   for key, n in zip(keys, starts, strict=True)]
        for future in futures:
            yield future.result()

    def cores_of(self, evaluation: Evaluation) -> list:
        """The fitted cores (re-fitted, deterministically, if the evaluation came from a log)."""
        if evaluation.cores is None:
            key = evaluation.structure.key()
            evaluation.cores = _fit_job(self.target, key, self.fit_kwargs, self.rse_kind,
                                        evaluation.starts)[3]
        return evaluation.cores

    def close(self):
        self.bar.close()
        if self._own_executor is not None:
            self._own_executor.shutdown()
            self._own_executor = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
