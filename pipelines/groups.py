"""``actstore groups``: layer groups for Group-SAEs (Ghilardi et al. 2024, arXiv 2410.21508).

§3.1 (layer similarity): the distance between layers ``i`` and ``j`` is the mean over tokens of
the angular distance between their activations of the same token,

    d(i, j) = E_t[ arccos(cos(a_i(t) - mu_i, a_j(t) - mu_j)) / pi ]   in [0, 1],

on mean-centred activations (``mu_i`` the mean over the sampled tokens; a residual stream's
large shared mean would otherwise make every pair look alike).

§3.2 (grouping): agglomerative clustering of the layers with complete linkage on ``d`` (the
distance between two clusters is their largest pairwise distance), cut into ``G`` groups for
every ``G`` from 1 to ``L``. ``AMAD(G)`` (Average Maximum Angular Distance) is the mean over the
``G`` groups of the largest pairwise distance inside each group (0 for a single layer).

Choice of ``G`` (a rule of ours; the paper reads it off the AMAD curve): the smallest ``G``
whose AMAD is at most ``amad_threshold`` (default :data:`DEFAULT_AMAD_THRESHOLD`), i.e. no
group spans layers further apart than that on average; ``groups=G`` sets it directly.

§3.3 (training): one SAE per group; each training token takes the activation of one layer drawn
uniformly from the group, every layer first scaled to ``E||x||^2 = D`` with its own scale
(:class:`LayerSampled`, used by ``actstore train-sae --groups groups.json``).

The tokens are a shuffled sample of the store (``actstore.stream``, the same tokens at every
layer), BOS positions dropped (their activations are outliers at every layer). Shape letters:
B batch, H layers (hooks), D width.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import actstore
from pipelines.files import read_json
from pipelines.report import plot_heatmap
from pipelines.runtime import resolve_device

DEFAULT_AMAD_THRESHOLD = 0.2
"""Default largest AMAD for the chosen number of groups (angular distance / pi)."""
DEFAULT_TOKENS = 65_536


@dataclass(frozen=True)
class GroupsConfig:
    """What ``actstore groups`` measures and how it picks ``G``."""

    store: str
    hooks: tuple[str, ...] = ()
    """Layers to group (residual-stream hooks of one width); empty: every hook of the store."""
    tokens: int = DEFAULT_TOKENS
    """Tokens sampled (at most the store's)."""
    amad_threshold: float = DEFAULT_AMAD_THRESHOLD
    """The chosen G is the smallest with AMAD(G) at most this."""
    groups: int | None = None
    """Use exactly this many groups instead of the threshold rule."""
    min_position: int = 1
    """Drop tokens at positions below this (BOS)."""
    seed: int = 0
    batch_size: int = 4096
    device: str = "auto"
    """Where the distances are computed (fp64): auto (CUDA when present), cpu, cuda, cuda:N."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "hooks", tuple(self.hooks))
        if self.tokens <= 0:
            raise ValueError(f"--tokens must be positive, got {self.tokens}")
        if not 0 <= self.amad_threshold <= 1:
            raise ValueError(f"--amad-threshold is an angular distance / pi, in [0, 1]; got {self.amad_threshold}")
        if self.groups is not None and self.groups < 1:
            raise ValueError(f"--groups must be at least 1, got {self.groups}")


@dataclass
class LayerGroups:
    """The result: distances, the AMAD curve, the chosen G and its groups (JSON-ready)."""

    hooks: list[str]
    tokens: int
    distances: list[list[float]]
    """``d(i, j)`` in hook order."""
    amad: dict[int, float]
    """AMAD for every number of groups G."""
    chosen: int
    """The chosen G."""
    rule: str
    """How G was chosen."""
    groups: list[list[str]]
    """The chosen G groups of hooks, each in hook order, ordered by their first hook."""
    partitions: dict[int, list[list[str]]] = field(repr=False, default_factory=dict)
    """The groups for every G."""

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["amad"] = {str(g): v for g, v in self.amad.items()}
        out["partitions"] = {str(g): v for g, v in self.partitions.items()}
        return out

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> LayerGroups:
        """The inverse of :meth:`to_json` (JSON keys are strings; G is an int again)."""
        return cls(**{**doc, "amad": {int(g): v for g, v in doc["amad"].items()},
                      "partitions": {int(g): p for g, p in doc.get("partitions", {}).items()}})


def layer_distances(store: actstore.Store, hooks: list[str], cfg: GroupsConfig) -> tuple[np.ndarray, int]:
    """``d [H, H]`` over a shuffled sample of up to ``cfg.tokens`` tokens, and how many were used.
    Two passes over the same sample: the means, then the angles of the centred vectors."""
    n_tokens = min(cfg.tokens, store.n_tokens)
    batch = min(cfg.batch_size, n_tokens)
    device = resolve_device(cfg.device)

    def sample():
        s = actstore.stream(store, hooks, batch, seed=cfg.seed, min_position=cfg.min_position, dtype="float32", stack=True,
                            device=str(device))
        seen = 0
        for x_BHD in s:
            take = min(len(x_BHD), n_tokens - seen)
            yield x_BHD[:take].double()
            seen += take
            if seen >= n_tokens:
                return

    sum_HD, count = None, 0
    for x_BHD in sample():
        sum_HD = x_BHD.sum(0) if sum_HD is None else sum_HD + x_BHD.sum(0)
        count += len(x_BHD)
    if not count:
        raise ValueError(f"{store.url}: no tokens left to compare after dropping positions below {cfg.min_position}")
    mean_HD = sum_HD / count
    angle_HH = torch.zeros(len(hooks), len(hooks), dtype=torch.float64, device=device)
    for x_BHD in sample():
        unit_BHD = torch.nn.functional.normalize(x_BHD - mean_HD, dim=-1)
        cos_BHH = (unit_BHD @ unit_BHD.transpose(1, 2)).clamp(-1.0, 1.0)
        angle_HH += torch.arccos(cos_BHH).sum(0)
    d_HH = (angle_HH / (count * math.pi)).cpu().numpy()
    np.fill_diagonal(d_HH, 0.0)
    return (d_HH + d_HH.T) / 2, count  # symmetric up to rounding; made exact


def complete_linkage_partitions(d_HH: np.ndarray) -> dict[int, list[list[int]]]:
    """Groups of layer indices for every G = 1..H: agglomerative clustering with complete
    linkage (scipy), cut after H - G merges. Each group sorted, groups ordered by first layer."""
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import squareform

    H = len(d_HH)
    members = {i: [i] for i in range(H)}
    partitions = {H: [[i] for i in range(H)]}
    if H > 1:
        merges = linkage(squareform(d_HH, checks=False), method="complete")
        for step, (a, b, *_rest) in enumerate(merges):
            members[H + step] = sorted(members.pop(int(a)) + members.pop(int(b)))
            partitions[H - step - 1] = sorted(members.values())
    return dict(sorted(partitions.items()))


def amad(d_HH: np.ndarray, groups: list[list[int]]) -> float:
    """Mean over groups of the largest pairwise distance inside each (0 for one layer)."""
    return float(np.mean([d_HH[np.ix_(g, g)].max() for g in groups]))


def find_groups(cfg: GroupsConfig) -> LayerGroups:
    store = actstore.open_store(cfg.store)
    hooks = list(cfg.hooks) or list(store.hooks)
    unknown = [h for h in hooks if h not in store.hooks]
    if unknown:
        raise ValueError(f"{store.url} has no hook {unknown[0]!r}; it has {', '.join(store.hooks)}")
    if len(hooks) < 2:
        raise ValueError(f"grouping needs at least two layers, got {len(hooks)} ({', '.join(hooks)}); pass more --hooks")
    widths = {h: store.config.width(h) for h in hooks}
    if len(set(widths.values())) > 1:
        raise ValueError("layers of different widths cannot share an SAE: "
                         + ", ".join(f"{h} ({w})" for h, w in widths.items()) + "; pass --hooks of one width")
    if cfg.groups is not None and cfg.groups > len(hooks):
        raise ValueError(f"--groups {cfg.groups} is more than the {len(hooks)} layers given; use at most {len(hooks)}")
    d_HH, used = layer_distances(store, hooks, cfg)
    parts = complete_linkage_partitions(d_HH)
    curve = {g: amad(d_HH, p) for g, p in parts.items()}
    if cfg.groups is not None:
        chosen, rule = cfg.groups, f"--groups {cfg.groups}"
    else:
        chosen = min(g for g, v in curve.items() if v <= cfg.amad_threshold + 1e-12)
        rule = f"smallest G with AMAD <= {cfg.amad_threshold:g}"
    named = {g: [[hooks[i] for i in grp] for grp in p] for g, p in parts.items()}
    return LayerGroups(
        hooks=hooks, tokens=used, distances=d_HH.round(6).tolist(), amad={g: round(v, 6) for g, v in curve.items()},
        chosen=chosen, rule=rule, groups=named[chosen], partitions=named,
    )


def read_groups(path: str) -> list[list[str]]:
    """Groups of hooks from ``groups.json`` (``actstore groups``'s output, its ``groups``) or
    from a JSON list of lists of hooks."""
    doc = read_json(path, "groups file", "; make one with actstore groups")
    groups = doc.get("groups") if isinstance(doc, dict) else doc
    if not (isinstance(groups, list) and groups and all(isinstance(g, list) and g and all(isinstance(h, str) for h in g) for g in groups)):
        raise ValueError(f"groups file {path} must hold a non-empty list of lists of hook names (or actstore groups' JSON)")
    return groups


class LayerSampled:
    """Batches ``[B, D]`` from a stacked stream ``[B, H, D]`` of a group's layers: each token's
    activation at one layer drawn uniformly (Group-SAE §3.3). The draws are a function of
    ``(seed, batch number)``, so a resumed stream (``load_state_dict``) draws the same layers."""

    def __init__(self, stream: actstore.Stream, seed: int):
        self.stream, self.seed = stream, seed
        self.scales = stream.scales

    def __iter__(self):
        for x_BHD in self.stream:
            n = self.stream.state_dict()["cursor"]["batches"]  # this batch's number, counted from 1
            layer_B = torch.from_numpy(np.random.default_rng([self.seed, n]).integers(0, x_BHD.shape[1], len(x_BHD)))
            # to the batch's device without a wait: an async copy of pageable memory is staged, not synchronised
            layer_B = layer_B.to(x_BHD.device, non_blocking=True)
            yield x_BHD[torch.arange(len(x_BHD), device=x_BHD.device), layer_B]

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)


def save(result: LayerGroups, out: Path) -> tuple[Path, Path]:
    """``groups.json`` and ``groups_heatmap.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "groups.json", out / "groups_heatmap.png"
    json_path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    plot_heatmap(result, png_path)
    return json_path, png_path

