"""Ranks for a structured layer that replaces a given dense weight, under a parameter budget.

    spec = layer_ranks(W, "tt", budget=0.1)            # "tt:cores=3,rank=4x7" (10% of W's params)
    sl.structurize(model, auto("btt", budget=0.05), project=True)   # every layer chooses its own

tucker: the Tucker core shape of W tensorized as the layer does, (o_1..o_d, i_1..i_d), by the
        packing integer program (`tucker_ranks`, the energy of the mode unfoldings).
tt / btt: per-bond ranks, greedy: start at rank 1 everywhere and keep adding one to the bond
        whose increment lowers the projection error (`from_dense`) most per extra parameter, while
        the layer fits the budget. For 2-core BTT that is the largest rank that fits.
The budget counts the layer's parameters without bias: an int, or a float in (0, 1] as a
fraction of W's size.
"""

import torch

from .tucker import tucker_ranks

KINDS = ("btt", "tt", "tucker")


def layer_ranks(weight: torch.Tensor, kind: str, budget, cores: int = 2) -> str:
    """A spec string for `kind` with the ranks chosen for `weight` (out, in) within `budget`."""
    import structlayers as sl

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise TypeError(f"weight must be a 2-D torch.Tensor (out, in), got {type(weight).__name__}")
    out_features, in_features = weight.shape
    limit = _budget(budget, weight.numel())
    if kind == "tucker":
        probe = sl.Tucker(in_features, out_features, rank=1, modes=cores, bias=False, device="meta")
        full = torch.zeros(probe.padded_out, probe.padded_in, dtype=torch.float64)
        full[:out_features, :in_features] = weight.detach().double().cpu()
        tensor = full.reshape(*probe.out_factors, *probe.in_factors).numpy()
        smallest = probe.num_params
        if limit < smallest:
            raise ValueError(f"budget {limit} is below the smallest Tucker layer ({smallest} params)")
        shape = tucker_ranks(tensor, limit, "ip")
        return f"tucker:modes={cores},rank={'x'.join(map(str, shape.ranks))}"
    cls = sl.BTT if kind == "btt" else sl.TT
    base = {"cores": cores}
    ranks = [1] * (cores - 1)

    def layer(r):
        return cls(in_features, out_features, rank=tuple(r), bias=False, **base)

    current = layer(ranks)
    if current.num_params > limit:
        raise ValueError(f"budget {limit} is below the smallest {kind} layer ({current.num_params} params)")
    error = current.project_(weight)
    while True:
        best = None
        for k in range(len(ranks)):
            grown = ranks[:k] + [ranks[k] + 1] + ranks[k + 1:]
            try:
                candidate = layer(grown)
            except ValueError:  # beyond what the sizes allow on this bond
                continue
            extra = candidate.num_params - current.num_params
            if candidate.num_params > limit or extra <= 0:
                continue
            gain = (error - candidate.project_(weight)) / extra
            if best is None or gain > best[0]:
                best = (gain, grown, candidate)
        if best is None:
            break
        _, ranks, current = best
        error = current.project_(weight)
    rank_text = "x".join(map(str, ranks)) if len(set(ranks)) > 1 else str(ranks[0])
    return f"{kind}:cores={cores},rank={rank_text}"


def auto(kind: str, budget, cores: int = 2):
    """A structurize chooser: (name, module) -> the spec `layer_ranks` picks for its weight."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")

    def choose(name, module):
        from structlayers.linear_like import adapter_of, read_linear

        weight, _ = read_linear(module, adapter_of(module))  # (out, in), also for GPT-2's Conv1D
        return layer_ranks(weight, kind, budget, cores)

    return choose


def _budget(budget, dense_params: int) -> int:
    if isinstance(budget, bool) or not isinstance(budget, int | float) or budget <= 0:
        raise ValueError(f"budget must be a positive int (parameters) or a fraction in (0, 1], "
                         f"got {budget!r}")
    if isinstance(budget, float):
        if budget > 1:
            raise ValueError(f"a fractional budget must be in (0, 1], got {budget}")
        return max(1, int(budget * dense_params))
    return budget
