"""Evaluating structures for a search: objective, cache, parallel fits, budgets, a resumable log.

    f(structure) = #params / #entries + lam * RSE        (RSE squared by default, as TnALE/TNLS)

Every search algorithm asks an `Evaluator` for batches of structures. It answers from its cache,
or fits them (ALS, `fit.fit_als`) through any concurrent.futures.Executor (a process pool by
default; a Dask distributed client's `get_executor()` works the same), appends each result to a
JSON-lines log as it arrives, and stops the search with `BudgetExhausted` when the evaluation or
time budget runs out. A search restarted with the same log re-reads it and re-fits nothing it
already fitted. Fits are seeded by the structure, so a result never depends on the order or the
worker that computed it.
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
FITTER = "proximal-als-0.7"  # a log's fits are reused only by the same fitter


class BudgetExhausted(Exception):
    """The evaluation or time budget ran out; the evaluator keeps everything evaluated so far."""


@dataclass
class Evaluation:
    structure: Structure
    rse: float  # as configured: squared (||X - T||^2 / ||T||^2) or plain (its square root)
    objective: float
    seconds: float
    cores: list | None = field(default=None, repr=False)  # None when read back from a log

    @property
    def compression(self) -> float:
        return self.structure.compression


def objective(structure: Structure, rse: float, lam: float) -> float:
    return structure.num_params / structure.num_entries + lam * rse


def _die_with_parent(parent: int):
    """Worker initializer: end this worker when the search process `parent` ends, even by
    SIGKILL (then no shutdown runs, and an orphaned worker would fit forever). Linux's
    parent-death signal where the parent forked us, and a watcher thread everywhere."""
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


def _fit_job(target, key: str, fit_kwargs: dict, rse_kind: str):
    """One fit in a worker: (key, rse, seconds, cores)."""
    start = time.perf_counter()
    structure = Structure.from_key(key)
    seed = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    result = fit_als(target, structure, seed=seed, **fit_kwargs)
    rse = result.rse if rse_kind == "squared" else float(np.sqrt(result.rse))
    return key, rse, time.perf_counter() - start, result.cores


class Evaluator:
    """Objective values of structures on one target, with cache, budgets, executor and log.

    lam: weight of the RSE in the objective. rse: "squared" or "plain". fit: keyword arguments
    for fit_als (max_sweeps, tol, restarts). executor: an Executor to fit with (not shut down
    here); else `workers` processes (1: fit in this process). log: a JSON-lines path to append
    to and resume from. max_evaluations / max_seconds: budgets. progress: a tqdm bar (None:
    only when stderr is a terminal).
    """

    def __init__(self, target, lam: float = 200.0, rse: str = "squared", fit: dict | None = None,
                 executor: Executor | None = None, workers: int = 1, log=None,
                 max_evaluations: int | None = None, max_seconds: float | None = None,
                 progress: bool | None = None):
        self.target = check_target(target)
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
                "fit": self.fit_kwargs, "fitter": FITTER}

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
        for name in ("target_sha256", "shape", "lam", "rse", "fit", "fitter"):
            if found.get(name) != header[name]:
                raise ValueError(f"{self.log} was written for another search: its {name} is "
                                 f"{found.get(name)!r}, this search's is {header[name]!r}")
        for number, line in enumerate(lines[1:], start=2):
            try:
                row = json.loads(line)
                structure = Structure.from_key(row["key"])
                evaluation = Evaluation(structure, float(row["rse"]),
                                        objective(structure, float(row["rse"]), self.lam),
                                        float(row["seconds"]))
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
                   "seconds": round(evaluation.seconds, 6)}
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
        for key, rse, seconds, cores in self._fit(new):
            structure = Structure.from_key(key)
            evaluation = Evaluation(structure, rse, objective(structure, rse, self.lam), seconds, cores)
            self.cache[key] = evaluation
            self._append(evaluation)
            self.bar.update(1)
        if exhausted:
            raise BudgetExhausted(f"budget exhausted after {self.evaluations} evaluations, "
                                  f"{self.seconds:.1f} s")
        return [self.cache[s.key()] for s in structures]

    def _fit(self, keys):
        if not keys:
            return
        executor = self._executor
        if executor is None and self.workers > 1 and len(keys) > 1:
            if self._own_executor is None:
                self._own_executor = ProcessPoolExecutor(
                    self.workers, initializer=_die_with_parent, initargs=(os.getpid(),))
            executor = self._own_executor
        if executor is None:
            for key in keys:
                yield _fit_job(self.target, key, self.fit_kwargs, self.rse_kind)
            return
        futures = [executor.submit(_fit_job, self.target, key, self.fit_kwargs, self.rse_kind)
                   for key in keys]
        for future in futures:
            yield future.result()

    def cores_of(self, evaluation: Evaluation) -> list:
        """The fitted cores (re-fitted, deterministically, if the evaluation came from a log)."""
        if evaluation.cores is None:
            key = evaluation.structure.key()
            evaluation.cores = _fit_job(self.target, key, self.fit_kwargs, self.rse_kind)[3]
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
