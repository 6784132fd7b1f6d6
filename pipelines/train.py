"""``actstore train-sae``: train several SAEs on one hook of a store, each batch read once.

Experiments come from comma lists (the cross product of architectures, expansions, learning
rates and each architecture's sparsity setting: ``k`` for topk/batchtopk/matryoshka, ``l1_coeff`` for
relu/gated, ``l0_coeff`` for jumprelu; ``matryoshka_widths`` for every matryoshka experiment) or from a sweep file (a JSON list of objects with
``arch``, ``expansion`` or ``d_sae``, ``lr``, optional ``name``, and the architecture's own
settings). Activations are streamed shuffled (``actstore.stream``), scaled to
``E||x||^2 = D`` (the scale is folded back into the saved weights), with positions below
``min_position`` dropped (BOS by default). The last shards of the store (``eval_tokens``)
are held out for evaluation: FVU, L0 and dead fraction of every SAE on tokens it never saw.

Under ``torchrun`` (``torchrun --nproc_per_node N $(which actstore) train-sae ...``) every rank
streams its own part of the store and gradients are averaged (:mod:`pipelines.runtime`);
``--tokens`` counts all ranks' tokens and rank 0 evaluates and writes the outputs.

With ``wandb_project`` the recorded metrics also go to Weights & Biases (:mod:`pipelines.tracking`).

Output folder: one SAELens folder per experiment, ``training_curves.png`` and, for sweeps,
``l0_vs_fvu.png``, the ``checkpoint/`` folder and ``summary.json``, written last. The run's
identity (the store's id and configuration, the hooks, the experiments and every setting that
changes the result, the number of ranks) is saved with them (:mod:`pipelines.runs`): rerunning
the same command resumes the run, or, once it is finished, changes nothing; another run's
command is refused in one line (``overwrite`` starts again). The split into training and
held-out shards and the normalisation scales are fixed when the run starts, so a run on a
store extended since then resumes as it would have gone on.

Group-SAEs (:mod:`pipelines.groups`, arXiv 2410.21508 §3.3): with ``group`` (several hooks of
one width) each SAE trains on one layer per token drawn uniformly from the group, every layer
scaled by its own normalisation; it is saved once per member layer (``<experiment>/<hook>/``,
that layer's scale folded in, so each folder is an ordinary SAELens SAE of its hook) and
evaluated on every member layer's held-out tokens. :func:`train_groups` trains one such run
per group of a ``groups.json`` (``<out>/group<i>/``).

Transcoders (:mod:`trainers.transcoder`): with ``hook_out`` the experiments (``topk-transcoder``,
``batchtopk-transcoder``, ``jumprelu-transcoder``; ``<sparsity>-skip-transcoder`` for the same
with the skip path) read ``hook`` and reproduce ``hook_out`` of the same tokens, both streamed
together (:class:`Paired`), each normalised by its own scale (both folded back on save); the
held-out FVU is ``hook_out``'s. Saved in SAELens' transcoder format, ``hook_name_out`` in the
metadata.

Crosscoders (:mod:`trainers.crosscoder`): ``--arch crosscoder`` with several hooks of one width
(``hook`` as a comma list: ``group``) trains one dictionary on all of them at once, each token's
layers side by side (each normalised by its own scale), ``d_sae`` = one layer's width times the
expansion; the held-out FVU is reported per layer, with the number of latents shared by two
layers or more. Saved as :func:`trainers.crosscoder.save_crosscoder` lays out.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

import actstore
from pipelines.files import read_json, write_json_atomic
from pipelines.groups import LayerSampled
from pipelines.report import plot_training
from pipelines.runs import RUN_KEY, open_run, run_record
from pipelines.runtime import join_ranks, progress_bar
from pipelines.tracking import WandbLog
from trainers import ARCHITECTURES, sae_config
from trainers.crosscoder import flatten_layers, layer_fvus, save_crosscoder, shared_latents
from trainers.saelens_format import HookInfo, save_saelens
from trainers.trainer import COMPUTE_DTYPES, Experiment, TrainConfig, Trainer, evaluate
from trainers.transcoder import is_transcoder

log = logging.getLogger(__name__)

WARMUP_STEPS = 100
"""Learning-rate warm-up; runs shorter than 1,000 steps warm up over their first tenth."""
SPARSITY_KEY = {"topk": "k", "batchtopk": "k", "matryoshka": "k", "relu": "l1_coeff", "gated": "l1_coeff", "jumprelu": "l0_coeff",
                "topk-transcoder": "k", "batchtopk-transcoder": "k", "jumprelu-transcoder": "l0_coeff", "crosscoder": "k"}
SKIP_SUFFIX, TRANSCODER_SUFFIX = "-skip-transcoder", "-transcoder"
SWEEP_KEYS = {"name", "arch", "expansion", "d_sae", "lr"}
SUMMARY_FILE = "summary.json"
"""Written last: a run folder with it holds a finished run."""


@dataclass(frozen=True)
class TrainSAEConfig:
    """One ``train-sae`` run."""

    store: str
    hook: str
    out: str
    tokens: int
    group: tuple[str, ...] = ()
    """Several hooks of one width: train Group-SAEs on them (``hook`` is then ignored)."""
    hook_out: str | None = None
    """Transcoders: the hook they reproduce (``hook`` is what they read); every experiment is then a transcoder."""
    archs: tuple[str, ...] = ("topk",)
    expansions: tuple[int, ...] = (8,)
    lrs: tuple[float, ...] = (2e-4,)
    sparsity: dict[str, tuple[float, ...]] = field(default_factory=dict)
    """Per architecture, the values of its sparsity setting (defaults: the config's)."""
    matryoshka_widths: tuple[int, ...] = ()
    """Nested level widths of the ``matryoshka`` experiments (empty: d_sae/8, /4, /2, d_sae)."""
    sweep: tuple[dict[str, Any], ...] = ()
    """Experiments from a sweep file; replaces the comma lists when given."""
    batch_size: int = 4096
    seed: int = 0
    memory: str = "2GiB"
    normalize: bool = True
    min_position: int = 1
    eval_tokens: int = 65536
    log_every: int = 50
    checkpoint_every: int = 500
    device: str = "auto"
    """auto (this rank's GPU when CUDA is present, else the CPU), cpu, cuda, cuda:N."""
    dtype: str = "float32"
    """The SAEs' compute: float32, or bfloat16 (autocast, fp32 master weights): see ``TrainConfig``."""
    tf32: bool = True
    """fp32 matmuls on CUDA through TF32 tensor cores."""
    progress: bool = True
    wandb_project: str | None = None
    """Log to Weights & Biases under this project (rank 0), see :mod:`pipelines.tracking`."""
    wandb_name: str | None = None
    overwrite: bool = False
    """Start again in an ``out`` that holds another (or the same) run, removing it."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "group", tuple(self.group))
        unknown = [a for a in self.archs if resolve_arch(a)[0] not in ARCHITECTURES]
        if unknown:
            raise ValueError(f"unknown --arch {', '.join(unknown)}; choose from {', '.join(arch_names())}")
        archs = [resolve_arch(a)[0] for a in self.archs] if not self.sweep else [
            resolve_arch(str(e.get("arch", "topk")))[0] for e in self.sweep]
        coders = sorted({a for a in archs if is_transcoder(a)})
        plain = sorted({a for a in archs if not is_transcoder(a)})
        if self.hook_out is not None:
            if self.group:
                raise ValueError("transcoders map one hook to another: give --hook-in and --hook-out, not a group of hooks")
            if self.hook_out == self.hook:
                raise ValueError(f"--hook-in and --hook-out are both {self.hook}; a transcoder maps one hook to another "
                                 "(an MLP's input to its output: blocks.N.hook_mlp_in to blocks.N.hook_mlp_out)")
            if plain:
                raise ValueError(f"--hook-out trains transcoders, but {', '.join(plain)} {'is an SAE' if len(plain) == 1 else 'are SAEs'}; "
                                 f"use {', '.join(a + TRANSCODER_SUFFIX for a in ('topk', 'batchtopk', 'jumprelu'))}")
        elif coders:
            raise ValueError(f"{', '.join(coders)} {'needs' if len(coders) == 1 else 'need'} --hook-in and --hook-out "
                             "(what it reads and what it reproduces, e.g. blocks.6.hook_mlp_in and blocks.6.hook_mlp_out)")
        if "crosscoder" in archs:
            others = sorted(set(archs) - {"crosscoder"})
            if others:
                raise ValueError(f"a crosscoder run trains crosscoders only; train {', '.join(others)} in a run of its own")
            if len(self.group) < 2:
                raise ValueError("a crosscoder reads several layers: give --hook as a comma list of 2 or more hooks of one width")
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"unknown --dtype {self.dtype!r}; choose from {', '.join(COMPUTE_DTYPES)}")
        if self.tokens <= 0 or self.batch_size <= 0 or self.eval_tokens < 0:
            raise ValueError("tokens and batch size must be positive, eval tokens >= 0")


def resolve_arch(name: str) -> tuple[str, dict[str, Any]]:
    """An ``--arch`` name as (architecture, settings it implies): ``<sparsity>-skip-transcoder``
    is ``<sparsity>-transcoder`` with ``skip``."""
    if name.endswith(SKIP_SUFFIX):
        return name.removesuffix(SKIP_SUFFIX) + TRANSCODER_SUFFIX, {"skip": True}
    return name, {}


def arch_names() -> list[str]:
    """Every name ``--arch`` takes."""
    return [*ARCHITECTURES, *(a.removesuffix(TRANSCODER_SUFFIX) + SKIP_SUFFIX for a in ARCHITECTURES if is_transcoder(a))]


def is_crosscoder_run(cfg: TrainSAEConfig) -> bool:
    return bool(cfg.group) and all(resolve_arch(str(a))[0] == "crosscoder" for a in
                                   ([e.get("arch", "topk") for e in cfg.sweep] if cfg.sweep else cfg.archs))


def experiments(cfg: TrainSAEConfig, d_in: int, d_out: int | None = None) -> list[Experiment]:
    """The run's experiments (see the module docstring); ``d_out``: the transcoders' output width.
    A crosscoder's ``d_in`` is its layers' total width, its ``d_sae`` one layer's times the expansion."""
    out = []
    coder = {"d_out": d_out} if d_out is not None else {}
    layers = len(cfg.group) if is_crosscoder_run(cfg) else 1
    if layers > 1:
        coder = {"n_layers": layers}
    if cfg.sweep:
        for i, spec in enumerate(cfg.sweep):
            spec = dict(spec)
            arch, implied = resolve_arch(str(spec.pop("arch", "topk")))
            if arch not in ARCHITECTURES:
                raise ValueError(f"sweep entry {i}: unknown arch {arch!r}; choose from {', '.join(arch_names())}")
            spec = {**implied, **(coder if is_transcoder(arch) else {}), **spec}
            d_sae = int(spec.pop("d_sae", 0)) or d_in * int(spec.pop("expansion", 8))
            spec.pop("expansion", None)
            spec = {**(coder if arch == "crosscoder" else {}), **spec}
            lr = float(spec.pop("lr", 2e-4))
            name = spec.pop("name", None)
            try:
                sae = sae_config(arch, d_in=d_in * layers, d_sae=d_sae, seed=cfg.seed, **spec)
            except (TypeError, ValueError) as e:
                raise ValueError(f"sweep entry {i}: {e}") from None
            out.append(Experiment(name or _name(sae, lr), sae, lr))
    else:
        for name, expansion, lr in itertools.product(cfg.archs, cfg.expansions, cfg.lrs):
            arch, implied = resolve_arch(name)
            key = SPARSITY_KEY[arch]
            for value in cfg.sparsity.get(name, cfg.sparsity.get(arch, (None,))):
                fields = {**implied, **(coder if is_transcoder(arch) or arch == "crosscoder" else {})}
                if value is not None:
                    fields[key] = int(value) if key == "k" else float(value)
                if arch == "matryoshka" and cfg.matryoshka_widths:
                    fields["widths"] = cfg.matryoshka_widths
                sae = sae_config(arch, d_in=d_in * layers, d_sae=d_in * expansion, seed=cfg.seed, **fields)
                out.append(Experiment(_name(sae, lr), sae, lr))
    names = [e.name for e in out]
    if len(set(names)) != len(names):
        raise ValueError(f"experiments repeat: {sorted(n for n in names if names.count(n) > 1)}")
    return out


def _name(sae, lr: float) -> str:
    key = SPARSITY_KEY[sae.arch]
    value = getattr(sae, key)
    arch = sae.arch.removesuffix(TRANSCODER_SUFFIX) + SKIP_SUFFIX if getattr(sae, "skip", False) else sae.arch
    return f"{arch}-{sae.d_sae}-{key.split('_')[0]}{value:g}-lr{lr:g}"


@dataclass
class TrainResult:
    out: Path
    rows: list[dict[str, Any]]
    tokens_per_s: float
    """Training tokens per second, all ranks together."""
    rank: int = 0
    finished_before: bool = False
    """The run was already finished: nothing was trained or written, ``rows`` are its summary's."""


def train_sae(cfg: TrainSAEConfig) -> TrainResult:
    """Run ``cfg``; see the module docstring. Under ``torchrun`` every rank runs this; rank 0
    writes the outputs and evaluates."""
    store = actstore.open_store(cfg.store)
    hooks = list(cfg.group) or [cfg.hook, *([cfg.hook_out] if cfg.hook_out else [])]
    for hook in hooks:
        if hook not in store.hooks:
            raise KeyError(f"hook {hook!r} is not in {store.url}; it has {', '.join(store.hooks)}")
    widths = {h: store.config.width(h) for h in hooks}
    crosscoder = is_crosscoder_run(cfg)
    if cfg.group and len(set(widths.values())) > 1:
        what = "a crosscoder's layers" if crosscoder else "a group's layers"
        raise ValueError(f"{what} must share one width: " + ", ".join(f"{h} ({w})" for h, w in widths.items()))
    d_in = widths[hooks[0]]
    exps = experiments(cfg, d_in, widths[cfg.hook_out] if cfg.hook_out else None)
    out = Path(cfg.out)
    with join_ranks(cfg.device) as ranks:
        identity = run_identity(cfg, store, hooks, exps, ranks.world_size)
        # rank 0's --out decides (new, resume or finished) for every rank: the others' machines need not hold it
        folder = ranks.from_main(lambda: open_run(out, identity, finished_file=SUMMARY_FILE, overwrite=cfg.overwrite,
                                                  command="train-sae"))
        if folder.state == "finished":
            log.info("%s holds the finished run; nothing to do", out)
            return TrainResult(out, list(folder.saved["experiments"]), 0.0, ranks.rank, finished_before=True)
        saved = folder.saved[RUN_KEY] if folder.state == "resume" else {}
        if saved:  # the held-out split and the scales of the run's start, whatever the store holds now
            train_shards, eval_shards = saved["train_shards"], saved["eval_shards"]
        else:
            train_shards, eval_shards = split_shards(store, cfg.eval_tokens)
        stream = actstore.stream(
            store, hooks if len(hooks) > 1 else cfg.hook, cfg.batch_size, seed=cfg.seed, epochs=None, memory=cfg.memory,
            stack=not cfg.hook_out,  # a transcoder's pair as a dict: the two widths may differ
            shards=train_shards, min_position=cfg.min_position, normalize="expected_norm" if cfg.normalize else "none",
            scales=saved.get("scales"), rank=ranks.rank, world_size=ranks.world_size,
            device=str(ranks.device),  # batches land on the training device: pinned, non-blocking, converted there
        )
        data = (Flattened(stream) if crosscoder else LayerSampled(stream, cfg.seed) if cfg.group else
                Paired(stream, cfg.hook, cfg.hook_out) if cfg.hook_out else stream)
        scales = {h: stream.scales.get(h, 1.0) for h in hooks}
        steps = math.ceil(cfg.tokens / (cfg.batch_size * ranks.world_size))
        train = TrainConfig(tokens=cfg.tokens, log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
                            device=str(ranks.device), dead_tokens=min(10_000_000, max(cfg.batch_size, cfg.tokens // 4)),
                            lr_warmup_steps=min(WARMUP_STEPS, max(1, steps // 10)), dtype=cfg.dtype, tf32=cfg.tf32)
        record = {**run_record(identity), "store_url": store.url, "train_shards": train_shards, "eval_shards": eval_shards,
                  "scales": scales}
        trainer = Trainer(train, exps, data, out_dir=out, run_info=record, host_group=ranks.control)
        if folder.state == "resume":
            trainer.load_checkpoint()
            log.info("resuming %s from step %d", out, trainer.step)
        tracker = None
        if cfg.wandb_project and ranks.main:
            settings = {k: v for k, v in asdict(cfg).items() if k not in ("sweep", "progress")}
            tracker = WandbLog(cfg.wandb_project, cfg.wandb_name, {**settings, "world_size": ranks.world_size, "experiments": {
                e.name: {"arch": e.sae.arch, "d_sae": e.sae.d_sae, "lr": e.lr, **e.sae.hyperparameters()} for e in exps}}, out)
        start_tokens, t0 = trainer.tokens, time.perf_counter()
        with progress_bar(cfg.progress and ranks.main, "train-sae", cfg.tokens, trainer.tokens) as advance:
            def on_step(step: int, tokens: int) -> None:
                advance(tokens)
                if tracker is not None:
                    tracker(trainer)

            trainer.on_step = on_step
            trainer.fit()
        rate = (trainer.tokens - start_tokens) / max(time.perf_counter() - t0, 1e-9)
    rows = [_row(run) for run in trainer.runs]
    if not ranks.main:
        return TrainResult(out, rows, rate, ranks.rank)
    meta = store.config
    per_layer: dict[str, dict[str, dict[str, float]]] = {run.exp.name: {} for run in trainer.runs}
    if crosscoder and eval_shards:  # every layer of a token side by side, as trained; FVU per layer
        sides = [torch.cat(parts, 1) for parts in zip(*(held_out_batches(store, h, eval_shards, cfg.batch_size, cfg.min_position,
                                                                         scales[h]) for h in hooks), strict=True)]
        for run in trainer.runs:
            whole = evaluate(run.sae, sides, train.device)
            per_layer[run.exp.name] = {h: {**whole, "fvu": f} for h, f in zip(hooks, layer_fvus(run.sae, sides, train.device), strict=True)}
    for hook in (hooks if not cfg.hook_out else [cfg.hook_out]) if eval_shards and not crosscoder else ():
        held_out: list[Any] = list(held_out_batches(store, hook, eval_shards, cfg.batch_size, cfg.min_position, scales[hook]))  # read once, evaluated by every SAE
        if cfg.hook_out:  # (input, target) pairs: the same tokens of both hooks
            held_out = list(zip(held_out_batches(store, cfg.hook, eval_shards, cfg.batch_size, cfg.min_position, scales[cfg.hook]),
                                held_out, strict=True))
        for run in trainer.runs:
            per_layer[run.exp.name][hook] = evaluate(run.sae, held_out, train.device)
    for run, row in zip(trainer.runs, rows, strict=True):
        layers = per_layer[run.exp.name]
        if layers:  # one layer: its figures; a group: the mean over its layers, and each layer's
            row.update({f"eval_{k}": sum(m[k] for m in layers.values()) / len(layers) for k in ("fvu", "l0", "dead")})
            row["eval_tokens"] = sum(m["tokens"] for m in layers.values()) // (len(layers) if crosscoder else 1)
            if cfg.group:
                row["eval_layers"] = layers
        extra = {"store": store.url, "tokens": trainer.tokens, "summary": row}
        if crosscoder:
            row["shared_latents"] = shared_latents(run.sae)
            save_crosscoder(run.sae, out / run.exp.name, hooks, [scales[h] for h in hooks], meta.model.name, meta.context_size,
                            meta.prepend_bos, extra=extra)
            continue
        if cfg.group:
            extra["group"] = hooks
        if cfg.hook_out:
            extra["hook_out"] = cfg.hook_out
            info = HookInfo(cfg.hook, meta.model.name, meta.context_size, meta.prepend_bos, hook_name_out=cfg.hook_out)
            save_saelens(run.sae, out / run.exp.name, info, scale=scales[cfg.hook], extra=extra, scale_out=scales[cfg.hook_out])
        for hook in hooks if not cfg.hook_out else ():
            info = HookInfo(hook, meta.model.name, meta.context_size, meta.prepend_bos)
            save_saelens(run.sae, out / run.exp.name / hook if cfg.group else out / run.exp.name, info, scale=scales[hook], extra=extra)
    plot_training(out, {run.exp.name: run.history for run in trainer.runs})
    summary = {"store": store.url, "hook": cfg.hook if not cfg.group else None,
               "group": hooks if cfg.group and not crosscoder else None, **({"crosscoder": hooks} if crosscoder else {}),
               **({"hook_out": cfg.hook_out} if cfg.hook_out else {}),
               "tokens": trainer.tokens, "scales": scales, "world_size": ranks.world_size, "experiments": rows,
               RUN_KEY: run_record(identity)}
    write_json_atomic(out / SUMMARY_FILE, summary)  # last: its presence marks the run finished
    if tracker is not None:
        tracker.finish(rows)
    return TrainResult(out, rows, rate, ranks.rank)


def run_identity(cfg: TrainSAEConfig, store: actstore.Store, hooks: list[str], exps: list[Experiment],
                 world_size: int) -> dict[str, Any]:
    """What makes a run this run (:mod:`pipelines.runs`): the store (its id; its URL for stores
    made before ids) and its configuration but for the token target (a store may grow), the
    hooks, the experiments and every setting that changes the result, and the number of ranks."""
    return {
        "store": {"id": store.id} if store.id else {"url": store.url},
        "store_config": {k: v for k, v in store.config.to_json().items() if k != "n_tokens_target"},
        "hooks": hooks, "group": bool(cfg.group),
        "experiments": {e.name: {"arch": e.sae.arch, "sae": asdict(e.sae), "lr": e.lr} for e in exps},
        "tokens": cfg.tokens, "batch_size": cfg.batch_size, "seed": cfg.seed, "normalize": cfg.normalize,
        "min_position": cfg.min_position, "eval_tokens": cfg.eval_tokens, "log_every": cfg.log_every,
        "world_size": world_size,
        **({"dtype": cfg.dtype} if cfg.dtype != "float32" else {}),  # only when set: runs from before it resume
    }


def train_groups(cfg: TrainSAEConfig, groups: list[list[str]]) -> list[TrainResult]:
    """One Group-SAE run per group (``<out>/group<i>/``), each with ``cfg``'s experiments and token
    budget; a single-layer group trains an ordinary SAE of that layer."""
    store = actstore.open_store(cfg.store)
    for i, group in enumerate(groups):
        missing = [h for h in group if h not in store.hooks]
        if missing:
            raise KeyError(f"group {i} names hook {missing[0]!r}, which {store.url} lacks; it has {', '.join(store.hooks)}")
    results = []
    for i, group in enumerate(groups):
        single = len(group) == 1
        run = replace(cfg, hook=group[0], group=() if single else tuple(group), out=str(Path(cfg.out) / f"group{i}"))
        results.append(train_sae(run))
    return results


def _row(run) -> dict[str, Any]:
    """An experiment's settings and its last recorded training FVU and L0."""
    last = run.history[-1] if run.history else {}
    return {"name": run.exp.name, "arch": run.exp.sae.arch, "d_sae": run.exp.sae.d_sae, "lr": run.exp.lr,
            **run.exp.sae.hyperparameters(), "train_fvu": last.get("fvu"), "train_l0": last.get("l0")}


def split_shards(store: actstore.Store, eval_tokens: int) -> tuple[list[int], list[int]]:
    """Committed shards split into (train, held out): the last shards, at least ``eval_tokens``
    tokens of them (at least one shard is kept for training)."""
    shards = sorted(store.committed_shards)
    if not shards:
        raise actstore.EmptyStoreError(f"store {store.url} has no committed tokens to train on")
    held: list[int] = []
    while eval_tokens > 0 and len(held) < len(shards) - 1 and store.config.tokens_in(held) < eval_tokens:
        held.insert(0, shards[-1 - len(held)])
    if eval_tokens > 0 and store.config.tokens_in(held) < eval_tokens:  # one shard at least stays for training
        log.warning("%s has %d committed shard(s): %s tokens held out for evaluation instead of the %s asked "
                    "(eval tokens); harvest more, or ask for fewer to silence this", store.url, len(shards),
                    f"{store.config.tokens_in(held):,}", f"{eval_tokens:,}")
    return shards[: len(shards) - len(held)], held


class Flattened:
    """``[B, L D]`` batches (a crosscoder's input) from a stacked stream ``[B, L, D]`` of its layers."""

    def __init__(self, stream: actstore.Stream):
        self.stream = stream
        self.scales = stream.scales

    def __iter__(self) -> Iterator[torch.Tensor]:
        for x_BLD in self.stream:
            yield flatten_layers(x_BLD)

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)


class Paired:
    """``(x_BD, y_BO)`` batches of a transcoder (``hook_in``'s and ``hook_out``'s activations of the
    same tokens) from a stream of both hooks as a dict; its position is the stream's, so a
    resumed run reads on from where it stopped."""

    def __init__(self, stream: actstore.Stream, hook_in: str, hook_out: str):
        self.stream, self.hook_in, self.hook_out = stream, hook_in, hook_out
        self.scales = stream.scales

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.stream:
            yield batch[self.hook_in], batch[self.hook_out]

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)


def held_out_batches(store: actstore.Store, hook: str, shards: list[int], batch_size: int, min_position: int,
                     scale: float) -> Iterator[torch.Tensor]:
    """``hook``'s activations in ``shards``, in store order, as float32 ``[<=batch_size, D]``
    batches times ``scale``, positions below ``min_position`` dropped."""
    for shard in shards:
        a, b = store.config.shard_range(shard)
        for lo in range(a, b, batch_size):
            hi = min(b, lo + batch_size)
            x = torch.from_numpy(store.read(hook, lo, hi).astype("float32"))
            if min_position > 0:
                x = x[torch.from_numpy(store.positions(lo, hi) >= min_position)]
            if len(x):
                yield x * scale


def read_sweep(path: str) -> tuple[dict[str, Any], ...]:
    """A sweep file: a JSON list of experiment objects."""
    doc = read_json(path, "sweep file")
    if not isinstance(doc, list) or not all(isinstance(x, dict) for x in doc) or not doc:
        raise ValueError(f"sweep file {path} must hold a non-empty JSON list of objects")
    return tuple(doc)


