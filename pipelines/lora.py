"""``actstore lora``: finetune the live model with LoRA around frozen SAEs (arXiv 2501.19406).

Chen, Engels & Tegmark 2025, "Low-Rank Adapting Models for Sparse Autoencoders", §3.4: keep
the SAEs and the model frozen, splice the SAEs in (:mod:`pipelines.splice`), and train LoRA
adapters (:mod:`pipelines.adapters`) on the blocks after the first SAE so that the spliced,
adapted model predicts what the original model predicts::

    loss = mean over positions of KL(p_base(. | t_<=i) || p_adapted+SAE(. | t_<=i))

The teacher ``p_base`` is the same model with its adapters disabled and nothing spliced, so one
copy of the weights serves both passes. The paper's settings are the defaults: AdamW, learning
rate 5e-5, gradient norm clipped at 1.0, LoRA rank 64 and alpha 32, all overridable.
"After" means the blocks whose whole computation follows the first splice: ``L + 1`` on for
a splice in block ``L`` (``resid_post``, ``attn_out``, ``mlp_in``, ``mlp_out``), ``L`` on for
``resid_pre`` of block ``L``.

Before and after training, on held-out windows (:mod:`pipelines.evaluate`): CE clean, CE with
the SAEs, KL, L0 and FVU, and the CE gap closed::

    (ce_sae_before - ce_sae_after) / (ce_sae_before - ce_clean)

printed and written to ``lora.json`` beside the peft adapter in ``--out``, last.

``eval_at`` (``--eval-at``) also runs the held-out evaluation during training, after the step
that reaches each of those training-token counts (the same measurement as the final one, the
adapters in eval mode, then back to training). The learning rate is constant and the training
windows and seed do not depend on ``tokens``, so the figures at ``T`` are those of a run with
``tokens=T`` (tested): one run gives the CE gap closed at several budgets (arXiv 2501.19406
plots it against training tokens). ``LoRAResult.evals`` and ``lora.json``'s ``"evals"``
hold every evaluation after training, these and the final one (last, equal to ``after``);
they are saved with each checkpoint, so a resumed run keeps those done before it stopped.

Training checkpoints (adapter, optimiser, step, evaluations: :mod:`trainers.checkpoint`,
safetensors + JSON) go to ``out/checkpoint`` every ``checkpoint_every`` steps. Both record the
run's identity (every setting that changes the result, the model, and a digest of each SAE's files:
:mod:`pipelines.runs`): rerunning the same command resumes from the last checkpoint and trains
on exactly the windows an uninterrupted run would have, or, once the run is finished, changes
nothing and reports its figures; another run's command is refused in one line.
Shape letters: B windows, T tokens per window, V vocabulary, N positions.
"""

from __future__ import annotations

import itertools
import logging
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainers import checkpoint
from trainers.trainer import CHECKPOINT_DIR

from .adapters import ADAPTER_INFO, adapters_off, lora_model
from .capture import SITES, HookPoint
from .evaluate import EvalResult, SpliceMetrics, autocast_for, load_saes, measure
from .files import write_json_atomic
from .models import ModelDType, load_model, model_identity, model_shape
from .prefix import SharedPrefix
from .report import plot_lora_curve
from .runs import RUN_KEY, open_run, run_record
from .runtime import progress_bar
from .saes import LoadedSAE, fingerprint
from .splice import Splicer
from .text import TextConfig, local_files, take_windows, token_windows

log = logging.getLogger(__name__)

STATE_VERSION = 1


@dataclass(frozen=True)
class LoRAConfig:
    """One LoRA finetune around frozen SAEs."""

    model: str
    """Alias, local folder or HF id."""
    saes: tuple[str, ...]
    """SAE specs (:mod:`pipelines.saes`), spliced together."""
    out: str
    """Output folder: the peft adapter, ``lora.json``, the training curve."""
    rank: int = 64
    """LoRA rank r."""
    alpha: float = 32.0
    """LoRA alpha (the update is scaled by alpha / r)."""
    layers: tuple[int, ...] | None = None
    """Blocks to adapt; None: the blocks after the first SAE (module docstring)."""
    tokens: int = 1_000_000
    """Training tokens (rounded up to whole steps)."""
    text: TextConfig = field(default_factory=lambda: TextConfig(split="train", context_size=256))
    """Training text."""
    eval_split: str = "test"
    """Split of the held-out text (same dataset)."""
    eval_tokens: int = 32_768
    """Held-out tokens measured before and after."""
    batch_size: int = 4
    """Windows per optimiser step."""
    lr: float = 5e-5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    """Maximum gradient norm (0: no clipping)."""
    dropout: float = 0.0
    """LoRA dropout."""
    checkpoint_every: int = 100
    """Steps between checkpoints (0: none)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, about a third more compute)."""
    autocast: bool = True
    """bf16 autocast on CUDA."""
    seed: int = 0
    """Seed of the adapters' initial weights."""
    model_dtype: ModelDType = "auto"
    device: str = "auto"
    progress: bool = True
    overwrite: bool = False
    """Start again in an ``out`` that holds another (or the same) run, removing it."""
    eval_at: tuple[int, ...] = ()
    """Training-token counts (each below ``tokens``) after which the held-out evaluation also
    runs; the figures at ``T`` equal a run's with ``tokens=T`` (module docstring)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "eval_at", tuple(sorted(set(self.eval_at))))
        if self.rank < 1:
            raise ValueError(f"--rank must be at least 1, got {self.rank}")
        if self.alpha <= 0 or self.lr <= 0:
            raise ValueError("--alpha and --lr must be positive")
        if self.tokens <= 0 or self.eval_tokens <= 0 or self.batch_size <= 0:
            raise ValueError("--tokens, --eval-tokens and --batch-size must be positive")
        if self.grad_clip < 0 or self.weight_decay < 0 or not 0 <= self.dropout < 1 or self.checkpoint_every < 0:
            raise ValueError("--grad-clip, --weight-decay and --checkpoint-every must be >= 0 and --dropout in [0, 1)")
        bad = [t for t in self.eval_at if not 0 < t < self.tokens]
        if bad:
            raise ValueError(f"--eval-at {','.join(map(str, bad))}: each value must be a training-token count above 0 "
                             f"and below --tokens ({self.tokens:,}); drop it or raise --tokens")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.text.context_size

    @property
    def steps(self) -> int:
        return math.ceil(self.tokens / self.tokens_per_step)

    @property
    def eval_steps(self) -> tuple[int, ...]:
        """The steps after which ``eval_at`` evaluates: the first step reaching each count, as
        ``steps`` rounds ``tokens`` up; one that is the last step is the final evaluation."""
        return tuple(sorted({math.ceil(t / self.tokens_per_step) for t in self.eval_at} - {self.steps}))

    def settings(self) -> dict[str, Any]:
        """The settings that change the result (what a resumed run must share with the checkpoint).
        ``eval_at`` only when given, so runs from before it existed keep their identity."""
        skip = {"out", "progress", "device", "checkpoint_every", "overwrite"} | ({"eval_at"} if not self.eval_at else set())
        return {k: v for k, v in asdict(self).items() if k not in skip}

    def identity(self) -> dict[str, Any]:
        """The run's identity (:mod:`pipelines.runs`): its settings, the model they name, and the
        SAEs' files (retraining an SAE in its folder makes another run)."""
        return {"settings": self.settings(), "model": model_identity(self.model),
                "sae_files": [fingerprint(spec) for spec in self.saes]}


def gap_closed(before: EvalResult, after: EvalResult) -> float:
    """The CE gap closed, ``(ce_sae_before - ce_sae_after) / (ce_sae_before - ce_clean)`` (module
    docstring); NaN when the SAEs left no gap."""
    gap = before.ce_spliced - before.ce_clean
    return (before.ce_spliced - after.ce_spliced) / gap if gap else float("nan")


@dataclass(frozen=True)
class LoRAEval:
    """The held-out figures after ``steps`` optimiser steps: a run with ``tokens`` training
    tokens would report the same."""

    tokens: int
    """Training tokens (whole steps)."""
    steps: int
    after: EvalResult
    """As ``LoRAResult.after``: adapters on in the spliced and adapted passes."""
    ce_gap_closed: float

    def to_json(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "steps": self.steps, "after": self.after.to_json(), "ce_gap_closed": self.ce_gap_closed}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LoRAEval:
        return cls(d["tokens"], d["steps"], _eval_result(d["after"]), d["ce_gap_closed"])


@dataclass(frozen=True)
class LoRAResult:
    out: Path
    before: EvalResult
    after: EvalResult
    layers: tuple[int, ...]
    steps: int
    tokens: int
    """Training tokens."""
    seconds: float
    """Training time of this run (a resumed run: since the resume), ``eval_at``'s evaluations left out."""
    finished_before: bool = False
    """The run was already finished: nothing was trained or written, the figures are its ``lora.json``'s."""
    evals: tuple[LoRAEval, ...] = ()
    """Every held-out evaluation after training by step: ``eval_at``'s, then the final one (``after``)."""

    @property
    def ce_gap_closed(self) -> float:
        return gap_closed(self.before, self.after)


def adapted_layers(saes: list[LoadedSAE], n_layers: int, layers: tuple[int, ...] | None) -> tuple[int, ...]:
    """``layers`` checked against the model, or the blocks after the first SAE."""
    if layers is not None:
        bad = [i for i in layers if not 0 <= i < n_layers]
        if bad or not layers:
            raise ValueError(f"--layers {','.join(map(str, layers))}: the model has {n_layers} layers (0-{n_layers - 1})")
        return tuple(sorted(set(layers)))
    # a crosscoder overwrites every one of its layers from the clean pass: adapters help only after its deepest
    def order(p: HookPoint) -> tuple[int, int]:
        return p.layer, SITES.index(p.site)

    first = min((max((HookPoint.parse(h) for h in s.layers), key=order) if s.layers else s.point for s in saes), key=order)
    start = first.layer if first.site == "resid_pre" else first.layer + 1
    if start >= n_layers:
        raise ValueError(f"no block comes after the SAE at {first.name} ({n_layers} layers); pass --layers all or a list")
    return tuple(range(start, n_layers))


def _same_text(cfg: LoRAConfig) -> bool:
    """Whether training and held-out text come from one stream (local files have no splits)."""
    return cfg.eval_split == cfg.text.split or (
        not cfg.text.dataset.startswith("builtin:") and local_files(cfg.text.dataset) is not None)


class LoRATrainer:
    """The training loop; state (step, optimiser, curve) lives here. ``shared_blocks``: the
    leading blocks with neither adapters nor splices, run once for teacher and student
    (:mod:`pipelines.prefix`)."""

    def __init__(self, cfg: LoRAConfig, model: nn.Module, splicer: Splicer, windows: Iterator[np.ndarray],
                 shared_blocks: int = 0, record: dict[str, Any] | None = None):
        self.cfg, self.model, self.splicer, self.windows = cfg, model, splicer, windows
        self.record = record or {}
        """Saved with every checkpoint: the run's identity (:func:`pipelines.runs.run_record`)."""
        self.prefix = SharedPrefix(model, shared_blocks)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.device = next(model.parameters()).device
        self.step = 0
        self.curve: list[tuple[int, float]] = []
        """(step, KL) after each step."""
        self.evals: list[LoRAEval] = []
        """The ``eval_at`` evaluations done so far."""
        self.eval_seconds = 0.0
        """Time spent in them since this process started."""
        self.exhausted = False

    def fit(self, on_step) -> None:
        while self.step < self.cfg.steps:
            batch = list(itertools.islice(self.windows, self.cfg.batch_size))
            if not batch:
                log.warning("the training text ran out after %d steps (%d asked)", self.step, self.cfg.steps)
                self.exhausted = True
                return
            kl = self._step(torch.from_numpy(np.stack(batch)).to(self.device))
            self.step += 1
            self.curve.append((self.step, kl))
            on_step(self)

    def _step(self, ids_BT: torch.Tensor) -> float:
        self.splicer.set_inputs(ids_BT)
        with autocast_for(self.device, self.cfg.autocast):
            with torch.no_grad(), adapters_off(self.model), self.splicer.mode("clean"), self.prefix.record():
                teacher_NV = F.log_softmax(self.model(input_ids=ids_BT, use_cache=False).logits.float(), -1).flatten(0, 1)
            with self.splicer.mode("sae"), self.prefix.reuse():
                student_NV = F.log_softmax(self.model(input_ids=ids_BT, use_cache=False).logits.float(), -1).flatten(0, 1)
        loss = F.kl_div(student_NV, teacher_NV, log_target=True, reduction="batchmean")  # mean over positions
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.opt.step()
        return float(loss.detach())

    # ---- checkpoints --------------------------------------------------------------------
    def save_checkpoint(self, folder: Path, before: EvalResult) -> None:
        """The adapter weights, optimiser, step and curve (:mod:`trainers.checkpoint`)."""
        from peft import get_peft_model_state_dict

        checkpoint.save(folder, {
            "version": STATE_VERSION, "step": self.step, "curve": self.curve, "before": before.to_json(),
            "evals": [e.to_json() for e in self.evals], RUN_KEY: self.record,
            "adapter": get_peft_model_state_dict(self.model, save_embedding_layers=False), "optimizer": self.opt.state_dict(),
        })

    def load_checkpoint(self, folder: Path) -> None:
        """Adapter weights, optimiser, step and curve from the checkpoint in ``folder``."""
        from peft import set_peft_model_state_dict

        state = checkpoint.load(folder, device=self.device)
        if state.get("version") != STATE_VERSION:
            raise checkpoint.CheckpointError(f"{folder}: LoRA checkpoint version {state.get('version')!r} is not {STATE_VERSION}")
        set_peft_model_state_dict(self.model, state["adapter"])
        self.opt.load_state_dict(state["optimizer"])
        self.step, self.curve = state["step"], [tuple(x) for x in state["curve"]]
        self.evals = [LoRAEval.from_json(e) for e in state.get("evals", [])]  # absent before eval_at existed


def _eval_result(d: dict[str, Any]) -> EvalResult:
    fields = {k: v for k, v in d.items() if k not in ("delta_loss", "loss_recovered", "splices")}
    return EvalResult(**fields, splices=tuple(SpliceMetrics(**s) for s in d["splices"]))


def _finished(out: Path, info: dict[str, Any]) -> LoRAResult:
    """The result a finished run recorded in ``lora.json`` (one from before ``evals`` existed: the final one)."""
    before, after = _eval_result(info["before"]), _eval_result(info["after"])
    evals = tuple(LoRAEval.from_json(e) for e in info.get("evals", [])) or (
        LoRAEval(info["tokens"], info["steps"], after, gap_closed(before, after)),)
    return LoRAResult(out, before, after, tuple(info["layers"]), info["steps"], info["tokens"], 0.0, finished_before=True,
                      evals=evals)


def _evaluate(cfg: LoRAConfig, model: nn.Module, splicer: Splicer, held_out: list[np.ndarray], before: EvalResult,
              step: int, progress: bool) -> LoRAEval:
    """The held-out figures of the adapted model after ``step`` steps, adapters in eval mode
    (the caller puts the model back in training mode to go on)."""
    model.eval()
    with progress_bar(progress, "eval after", len(held_out), unit="windows") as advance:
        after = measure(model, splicer, held_out, batch_size=cfg.batch_size, zero=False, adapted=True,
                        autocast=cfg.autocast, on_windows=advance)
    after = replace(after, ce_zero=before.ce_zero)  # the base model's zero ablation: unchanged by the adapters
    return LoRAEval(step * cfg.tokens_per_step, step, after, gap_closed(before, after))


def train_lora(cfg: LoRAConfig) -> LoRAResult:
    """Run ``cfg``; see the module docstring."""
    out = Path(cfg.out)
    identity = cfg.identity()
    folder = open_run(out, identity, finished_file=ADAPTER_INFO, overwrite=cfg.overwrite, command="lora")
    if folder.state == "finished":
        log.info("%s holds the finished run; nothing to do", out)
        return _finished(out, folder.saved)
    resume = folder.saved if folder.state == "resume" else None
    lm = load_model(cfg.model, model_dtype=cfg.model_dtype, device=cfg.device)
    saes = load_saes(cfg.saes, lm.model, cfg.model)
    layers = adapted_layers(saes, lm.n_layers, cfg.layers)
    held_out = take_windows(replace(cfg.text, split=cfg.eval_split), lm.tokenizer, cfg.eval_tokens)
    skip = len(held_out) if _same_text(cfg) else 0  # then the held-out windows are the stream's first ones
    torch.manual_seed(cfg.seed)
    with Splicer(lm.model, saes, lm.tokenizer.bos_token_id) as splicer:
        if resume is None:
            with progress_bar(cfg.progress, "eval before", len(held_out), unit="windows") as advance:
                before = measure(lm.model, splicer, held_out, batch_size=cfg.batch_size, autocast=cfg.autocast, on_windows=advance)
        else:
            before = _eval_result(resume["before"])
        model = lora_model(lm.model, layers, cfg.rank, cfg.alpha, cfg.dropout)
        if cfg.gradient_checkpointing:  # transformers 5 renamed it; 4.x has only the old name
            enable = getattr(lm.model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                lm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # LoRA dropout and checkpointing act in training mode (the models' own dropout is 0)
        shared = min(min(s.point.layer for s in saes), layers[0])
        trainer = LoRATrainer(cfg, model, splicer, iter(()), shared_blocks=shared, record=run_record(identity))
        if resume is not None:
            trainer.load_checkpoint(out / CHECKPOINT_DIR)
            log.info("resuming %s from step %d", out, trainer.step)
        # the windows an uninterrupted run would train on from here
        trainer.windows = itertools.islice(token_windows(cfg.text, lm.tokenizer), skip + trainer.step * cfg.batch_size, None)
        start_step, t0 = trainer.step, time.perf_counter()
        tokens_per_step = cfg.tokens_per_step
        with progress_bar(cfg.progress, "lora", cfg.steps * tokens_per_step, trainer.step * tokens_per_step) as advance:
            def on_step(t: LoRATrainer) -> None:
                advance(t.step * tokens_per_step)
                if t.step in cfg.eval_steps:  # no bar of its own: the training bar is live
                    t_eval = time.perf_counter()
                    t.evals.append(_evaluate(cfg, model, splicer, held_out, before, t.step, progress=False))
                    model.train()
                    t.eval_seconds += time.perf_counter() - t_eval
                if cfg.checkpoint_every and t.step % cfg.checkpoint_every == 0 and t.step < cfg.steps:
                    t.save_checkpoint(out / CHECKPOINT_DIR, before)

            out.mkdir(parents=True, exist_ok=True)
            trainer.fit(on_step)
        seconds = time.perf_counter() - t0 - trainer.eval_seconds
        final = _evaluate(cfg, model, splicer, held_out, before, trainer.step, cfg.progress)
    evals = (*(e for e in trainer.evals if e.steps < final.steps), final)
    result = LoRAResult(out, before, final.after, layers, trainer.step, trainer.step * tokens_per_step, seconds, evals=evals)
    log.info("trained %d steps in %.0f s (%.0f tokens/s)", trainer.step - start_step, seconds,
             (trainer.step - start_step) * tokens_per_step / max(seconds, 1e-9))
    _save(result, cfg, model, saes, trainer)
    return result


def _save(result: LoRAResult, cfg: LoRAConfig, model: nn.Module, saes: list[LoadedSAE], trainer: LoRATrainer) -> None:
    """The adapter, its README and plot, then ``lora.json`` (last: it marks the run finished),
    then the checkpoint goes."""
    out = result.out
    model.save_pretrained(str(out), save_embedding_layers=False)
    (out / "README.md").write_text(  # in place of peft's empty model-card template
        f"# LoRA adapter trained around frozen SAEs by actstore\n\n"
        f"Model `{cfg.model}`, SAEs {', '.join(f'`{s.source}` at `{s.label}`' for s in saes)}; rank {cfg.rank}, "
        f"alpha {cfg.alpha:g}, blocks {list(result.layers)}, {result.tokens:,} training tokens.\n\n"
        f"CE on held-out text: clean {result.before.ce_clean:.4f}; with the SAEs {result.before.ce_spliced:.4f} before, "
        f"{result.after.ce_spliced:.4f} after: {result.ce_gap_closed:.1%} of the gap closed. Figures in `{ADAPTER_INFO}`.\n\n"
        f"Evaluate: `actstore eval --model {cfg.model} {' '.join(f'--sae {s.source}' for s in saes)} --adapter {out}`; "
        f"load in Python: `peft.PeftModel.from_pretrained(model, \"{out}\")`.\n")
    plot_lora_curve(out / "lora_curve.png", trainer.curve, result)
    info = {
        "model": {"name": cfg.model, "identity": model_identity(cfg.model), **model_shape(model.get_base_model())},
        "saes": [{"source": s.source, "hook": s.hook, **({"hook_out": s.hook_out} if s.hook_out else {})} for s in saes],
        "layers": list(result.layers), "steps": result.steps, "tokens": result.tokens,
        "text_ran_out": trainer.exhausted, "settings": {k: v for k, v in cfg.settings().items() if k != "model"},
        "before": result.before.to_json(), "after": result.after.to_json(), "ce_gap_closed": result.ce_gap_closed,
        "evals": [e.to_json() for e in result.evals], "curve": trainer.curve, RUN_KEY: trainer.record,
    }
    write_json_atomic(out / ADAPTER_INFO, info)
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)

