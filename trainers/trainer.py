"""The training loop: several SAEs fitted on each batch read once.

Schedule (Conerly et al., "Circuits Updates, April 2024"; Gao et al. 2024 §A.1):
Adam with the gradient clipped to global norm 1 (Conerly et al. 2024, as SAELens does);
learning rate warmed up linearly over ``lr_warmup_steps``, constant, then decayed
linearly to 0 over the last ``1 - lr_decay_start`` of the steps (:func:`lr_multiplier`, applied
by a ``LambdaLR`` whose position is the step); the sparsity coefficient
(L1 / L0 penalties) warmed up linearly from 0 over the first ``sparsity_warmup`` of the steps.
Decoder rows kept at unit norm where the architecture needs it (gradient along each row
removed before the step, rows renormalised after). A latent is dead once it has not fired for
``dead_tokens`` tokens (Gao et al. 2024 §2.4 use 10M); dead masks feed the AuxK losses.
``b_dec`` starts at the mean of the first batch (a cheap stand-in for the geometric median).

Batches are ``[B, D]`` tensors, or ``(x_BD, y_BO)`` pairs for transcoders (:mod:`trainers.transcoder`):
the SAEs read ``x`` and reproduce ``y``; FVU and ``b_dec``'s start are then ``y``'s.

Checkpoints (:mod:`trainers.checkpoint`: safetensors + JSON, never pickle) hold every SAE's
weights, optimiser state and dead-latent counters, the step, the data source's position when it
has ``state_dict()`` (``actstore.stream`` does), and ``run_info``, the caller's JSON record of
the run (whose run a folder holds), so a resumed run continues with exactly the batches it
would have seen. A run that has reached its token budget takes no further step. The learning
rate schedule keeps no state of its own: a resumed run rebuilds it at the saved step.

Data parallel (under ``torchrun``, with ``torch.distributed`` initialised before the trainer is
made): every rank holds the same SAEs and reads its own batches (``actstore.stream`` gives each
rank a disjoint part); gradients are averaged over ranks before each step, buffers (BatchTopK's
threshold) averaged after it, a latent counts as fired when it fired on any rank, and
``tokens`` counts all ranks' tokens. With equal batch sizes and mean-reduced losses this is the
single-process step on the ranks' batches put together. Rank 0 writes and reads the checkpoint
(sending what it read to every rank, so only its machine needs the folder), holding
every rank's data position; recorded metrics are rank 0's batch.
Shape letters: B batch, D d_in, O d_out (a transcoder's target), F d_sae.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from . import checkpoint, collective, make_sae
from .sae import SAE, SAEConfig, fvu

log = logging.getLogger(__name__)
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_VERSION = 3
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Experiment:
    """One SAE to train: its name (a folder name), architecture config and learning rate."""

    name: str
    sae: SAEConfig
    lr: float = 2e-4

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"experiment name must be a plain folder name, got {self.name!r}")
        if self.lr <= 0:
            raise ValueError(f"learning rate must be positive, got {self.lr}")


@dataclass(frozen=True)
class TrainConfig:
    """How to train (shared by all experiments of a run)."""

    tokens: int
    """Training tokens (the run stops after the batch that reaches them)."""
    lr_warmup_steps: int = 100
    lr_decay_start: float = 0.8
    """Fraction of the steps after which the learning rate decays linearly to 0."""
    sparsity_warmup: float = 0.05
    """Fraction of the steps over which the sparsity coefficient rises from 0."""
    dead_tokens: int = 10_000_000
    """A latent not fired for this many tokens is dead."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 1.0
    """Clip each SAE's gradient to this global norm before the step (None: no clipping)."""
    log_every: int = 50
    """Steps between recorded metrics."""
    checkpoint_every: int = 0
    """Steps between checkpoints (0: only at the end)."""
    device: str = "cpu"
    dtype: str = "float32"
    """The SAE's compute: ``float32``, or ``bfloat16`` (autocast: matmuls in bf16, weights,
    optimiser state and losses in fp32)."""
    tf32: bool = True
    """fp32 matmuls on CUDA through TF32 tensor cores (10 mantissa bits; no effect on the CPU)."""

    def __post_init__(self) -> None:
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.dtype!r}")
        if self.tokens <= 0:
            raise ValueError(f"tokens must be positive, got {self.tokens}")
        if not 0 <= self.lr_decay_start <= 1 or not 0 <= self.sparsity_warmup <= 1:
            raise ValueError("lr_decay_start and sparsity_warmup are fractions in [0, 1]")
        if self.log_every <= 0 or self.checkpoint_every < 0 or self.dead_tokens <= 0:
            raise ValueError("log_every and dead_tokens must be positive, checkpoint_every >= 0")


def lr_multiplier(step: int, *, total_steps: int, warmup_steps: int, decay_start: float) -> float:
    """The learning rate of step ``step`` (0-based) over the experiment's own: a linear warmup
    over ``warmup_steps``, then 1, then a linear decay to 0 from ``decay_start`` of
    ``total_steps`` (see the module docstring)."""
    lr = min(1.0, (step + 1) / max(1, warmup_steps))
    decay_from = int(total_steps * decay_start)
    if step >= decay_from and total_steps > decay_from:
        lr *= max(0.0, (total_steps - step) / (total_steps - decay_from))
    return lr


@dataclass
class _Run:
    exp: Experiment
    sae: SAE
    opt: torch.optim.Adam
    since_fired_F: torch.Tensor
    history: list[dict[str, float]] = field(default_factory=list)
    since_fired_bound: int = 0
    """Host-side upper bound on ``since_fired_F.max()``, read back at each recorded step: while
    it is below ``dead_tokens`` no latent can be dead and AuxK is skipped without a device read."""
    lr_schedule: LambdaLR | None = None
    """Made at the first step of this trainer (the total number of steps known), at its step."""


class Trainer:
    """Fit ``experiments`` on ``data`` (an iterable of ``[B, D]`` tensors or ``(x_BD, y_BO)``
    pairs); see the module docstring."""

    def __init__(
        self, cfg: TrainConfig, experiments: list[Experiment], data: Iterable[torch.Tensor],
        out_dir: str | Path | None = None, on_step: Callable[[int, int], None] | None = None,
        run_info: Mapping[str, Any] | None = None, host_group: Any = None,
    ):
        names = [e.name for e in experiments]
        if not experiments or len(set(names)) != len(names):
            raise ValueError(f"experiments need distinct names, got {names}")
        widths = {e.sae.d_in for e in experiments}
        if len(widths) != 1:
            raise ValueError(f"all experiments must read the same activations; d_in differ: {sorted(widths)}")
        self.cfg = cfg
        self.data = data
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.on_step = on_step
        self.run_info = dict(run_info or {})
        """Saved with every checkpoint as it is (JSON values): what the caller needs to know whose run it is."""
        dev = torch.device(cfg.device)
        self.runs = []
        for e in experiments:
            sae = make_sae(e.sae).to(dev)
            # the fused kernel does Adam's whole update in one pass over each tensor (~9x faster on CPU)
            opt = torch.optim.Adam(sae.parameters(), lr=e.lr, betas=cfg.adam_betas, fused=dev.type in ("cpu", "cuda"))
            self.runs.append(_Run(e, sae, opt, torch.zeros(e.sae.d_sae, dtype=torch.int64, device=dev)))
        self.step = 0
        self.tokens = 0
        self.total_steps: int | None = None
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = torch.distributed.get_rank() if distributed else 0
        self.world_size = torch.distributed.get_world_size() if distributed else 1
        self._host_group = host_group
        """A gloo group for host-side counts (None: the default group, when it is gloo)."""
        if distributed and host_group is None and torch.distributed.get_backend() != "gloo":
            self._host_group = torch.distributed.new_group(backend="gloo")  # every rank makes its trainer: collective

    # ---- loop -----------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        """Whether the token budget is reached."""
        return self.tokens >= self.cfg.tokens

    def fit(self) -> Trainer:
        """Train until ``cfg.tokens`` (a finished run takes no step and writes nothing); returns
        self (``runs`` hold the SAEs and histories)."""
        first_step = self.step
        batches = self._batches()
        with self._precision():
            self._loop(batches)
        if self.out_dir is not None and self.step > first_step:
            self.save_checkpoint()
        return self

    @contextlib.contextmanager
    def _precision(self) -> Iterator[None]:
        """TF32 for fp32 CUDA matmuls (``cfg.tf32``) while training, put back after."""
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.cfg.tf32
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

    def _loop(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        while not self.finished:
            x_BD, y_BO = next(batches, (None, None))
            if x_BD is None:  # the data ran out first
                break
            if self.total_steps is None:
                self.total_steps = max(1, math.ceil(self.cfg.tokens / (len(x_BD) * self.world_size)))
            if self.step == 0:
                self._init_b_dec(x_BD if y_BO is None else y_BO)
            self._step(x_BD, y_BO)
            if self.on_step is not None:
                self.on_step(self.step, self.tokens)
            if self.out_dir is not None and self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                self.save_checkpoint()

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """``(x_BD, y_BO or None)`` on the device, float32."""
        dev = torch.device(self.cfg.device)
        for batch in self.data:
            x, y = batch if isinstance(batch, tuple | list) else (batch, None)
            if x.ndim != 2 or (y is not None and (y.ndim != 2 or len(y) != len(x))):
                shapes = [tuple(t.shape) for t in (x, y) if t is not None]
                raise ValueError(f"trainer batches must be [B, D] tensors or ([B, D], [B, O]) pairs, got shapes {shapes}")
            yield x.to(dev, non_blocking=True).float(), None if y is None else y.to(dev, non_blocking=True).float()

    def _step(self, x_BD: torch.Tensor, y_BO: torch.Tensor | None = None) -> None:
        """One step of every experiment. Nothing in it reads the device from the host, except
        at recorded steps (every ``log_every``, the first and the last), which read all their
        metrics in one transfer; under data parallel the token count goes through ``_host_group``."""
        sparsity_scale = self._sparsity_scale()
        n_tokens = self._tokens_all_ranks(x_BD)
        last = self.tokens + n_tokens >= self.cfg.tokens  # the final step is always recorded: the run's closing figures
        record = (self.step + 1) % self.cfg.log_every == 0 or self.step == 0 or last
        for run in self.runs:
            dead_F = run.since_fired_F >= self.cfg.dead_tokens
            with torch.autocast(x_BD.device.type, dtype=COMPUTE_DTYPES[self.cfg.dtype], enabled=self.cfg.dtype != "float32"):  # the forward only
                dead = dead_F if run.since_fired_bound >= self.cfg.dead_tokens else None
                out = (run.sae.training_step(x_BD, sparsity_scale, dead) if y_BO is None else
                       run.sae.training_step(x_BD, sparsity_scale, dead, target_BO=y_BO))
            run.opt.zero_grad(set_to_none=True)
            out.loss.backward()
            if self.world_size > 1:
                collective.average_gradients(run.sae.parameters(), self.world_size)
            if run.sae.unit_norm_decoder:
                run.sae.remove_parallel_gradient()
            if self.cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(run.sae.parameters(), self.cfg.grad_clip)
            if run.lr_schedule is None:
                run.lr_schedule = self._lr_schedule(run)
            lr = run.lr_schedule.get_last_lr()[0]  # this step's
            run.opt.step()
            run.lr_schedule.step()  # to the next step's
            run.sae.after_step()
            fired_F = out.fired_F
            if self.world_size > 1:
                collective.average_buffers(run.sae.buffers(), self.world_size)
                fired_F = collective.any_rank(fired_F)
            run.since_fired_F += n_tokens
            run.since_fired_F.masked_fill_(fired_F, 0)
            run.since_fired_bound += n_tokens
            if record:
                self._record(run, x_BD if y_BO is None else y_BO, out, dead_F, lr, n_tokens)
        self.step += 1
        self.tokens += n_tokens

    def _record(self, run: _Run, x_BD: torch.Tensor, out: Any, dead_F: torch.Tensor, lr: float, n_tokens: int) -> None:
        """Append this step's metrics to ``run.history``: one device-to-host read for all of them
        (``x_BD``: what the SAEs reproduce, a transcoder's target)."""
        names = ["loss", "fvu", "l0", "dead", *out.terms]
        with torch.no_grad():
            values = [out.loss.detach(), fvu(x_BD, out.recon_BD), out.l0, dead_F.float().mean(), *out.terms.values()]
            values.append(run.since_fired_F.max())
            *metrics, bound = torch.stack([v.reshape(()).to(torch.float64) for v in values]).tolist()
        run.since_fired_bound = int(bound)
        named = dict(zip(names, metrics, strict=True))
        core = {k: named.pop(k) for k in ("loss", "fvu", "l0", "dead")}
        run.history.append({"step": self.step + 1, "tokens": self.tokens + n_tokens, **core, "lr": lr, **named})

    def _lr_schedule(self, run: _Run) -> LambdaLR:
        """``run``'s learning rate schedule, at this trainer's step (0, or a checkpoint's step):
        the position is the step, so a checkpoint needs no scheduler state and an old one resumes."""
        for group in run.opt.param_groups:
            group["initial_lr"] = run.exp.lr  # the base the multiplier scales (LambdaLR's name)
        multiplier = partial(lr_multiplier, total_steps=self.total_steps or 1, warmup_steps=self.cfg.lr_warmup_steps,
                             decay_start=self.cfg.lr_decay_start)
        return LambdaLR(run.opt, multiplier, last_epoch=self.step - 1)  # it steps once, to self.step

    def _sparsity_scale(self) -> float:
        warm = self.cfg.sparsity_warmup * (self.total_steps or 1)
        return min(1.0, (self.step + 1) / warm) if warm >= 1 else 1.0

    @torch.no_grad()
    def _init_b_dec(self, x_BD: torch.Tensor) -> None:
        mean_D = x_BD.mean(0) if self.world_size == 1 else collective.sum_ranks(x_BD.sum(0)) / self._tokens_all_ranks(x_BD)
        for run in self.runs:
            run.sae.b_dec.copy_(mean_D)

    # ---- data parallel --------------------------------------------------------------------
    def _tokens_all_ranks(self, x_BD: torch.Tensor) -> int:
        """Tokens in this step's batches, all ranks together."""
        return len(x_BD) if self.world_size == 1 else collective.host_sum(len(x_BD), self._host_group)

    # ---- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write the checkpoint folder ``out_dir/checkpoint`` (:mod:`trainers.checkpoint`). Under
        data parallel every rank calls this; rank 0 writes, with every rank's data position."""
        if self.out_dir is None:
            raise ValueError("this trainer has no out_dir to checkpoint into")
        data = self.data.state_dict() if hasattr(self.data, "state_dict") else None
        folder = self.out_dir / CHECKPOINT_DIR
        if self.world_size > 1:
            states: list[Any] = [None] * self.world_size
            torch.distributed.all_gather_object(states, data)
            data = {"world_size": self.world_size, "ranks": states}
            if self.rank != 0:
                torch.distributed.barrier()
                return folder
        checkpoint.save(folder, {
            "version": CHECKPOINT_VERSION, "step": self.step, "tokens": self.tokens, "total_steps": self.total_steps,
            "train": asdict(self.cfg), "run": self.run_info,
            "runs": {r.exp.name: {
                "experiment": self._experiment(r.exp),
                "sae": r.sae.state_dict(), "opt": r.opt.state_dict(), "since_fired": r.since_fired_F, "history": r.history,
            } for r in self.runs},
            "data": data,
        })
        if self.world_size > 1:
            torch.distributed.barrier()
        return folder

    def _read_checkpoint(self, folder: Path) -> dict[str, Any]:
        """The checkpoint's state, read by rank 0 alone and sent to every rank (their SAEs and
        optimisers take it onto their own devices): only rank 0's machine needs ``folder``, as
        only rank 0 writes it. A failure to read it is raised on every rank."""
        device = self.cfg.device if self.world_size == 1 else "cpu"
        return collective.from_rank0(lambda: checkpoint.load(folder, device=device), self.rank, self.world_size)

    @staticmethod
    def _experiment(e: Experiment) -> dict[str, Any]:
        return {"arch": e.sae.arch, "sae": asdict(e.sae), "lr": e.lr}

    def load_checkpoint(self, folder: str | Path | None = None) -> None:
        """Continue from a checkpoint of a run with the same experiments (and data source);
        a checkpoint of other experiments or another number of ranks is a ``CheckpointError``."""
        folder = Path(folder) if folder is not None else (self.out_dir or Path(".")) / CHECKPOINT_DIR
        state = self._read_checkpoint(folder)
        if state.get("version") != CHECKPOINT_VERSION:
            raise checkpoint.CheckpointError(f"{folder}: trainer checkpoint version {state.get('version')!r} is not {CHECKPOINT_VERSION}")
        data = state["data"]
        parallel = isinstance(data, dict) and "ranks" in data
        saved_world = data["world_size"] if parallel else 1
        if saved_world != self.world_size:
            raise checkpoint.CheckpointError(
                f"{folder} was written by a run on {saved_world} rank(s); resume it on {saved_world}, not {self.world_size}")
        ours = {r.exp.name: self._experiment(r.exp) for r in self.runs}
        theirs = {name: saved["experiment"] for name, saved in state["runs"].items()}
        if ours != theirs:
            raise checkpoint.CheckpointError(
                f"{folder} was written by a run with other experiments; use another output folder or the same settings")
        for run in self.runs:
            saved = state["runs"][run.exp.name]
            run.sae.load_state_dict(saved["sae"])
            run.opt.load_state_dict(saved["opt"])
            run.lr_schedule = None  # rebuilt at the saved step
            run.since_fired_F.copy_(saved["since_fired"])
            run.since_fired_bound = int(run.since_fired_F.max())
            run.history = list(saved["history"])
        self.step, self.tokens, self.total_steps = state["step"], state["tokens"], state["total_steps"]
        if parallel:
            data = data["ranks"][self.rank]
        if data is not None and hasattr(self.data, "load_state_dict"):
            self.data.load_state_dict(data)


@torch.no_grad()
def evaluate(sae: SAE, batches: Iterable[torch.Tensor | tuple[torch.Tensor, torch.Tensor]], device: str = "cpu") -> dict[str, float]:
    """Held-out FVU (pooled over all tokens), mean L0 and the fraction of latents never active;
    for ``(x, y)`` pairs (a transcoder's), the FVU of ``y``."""
    resid = total = l0 = n = 0.0
    sum_D = sum_sq = None
    fired_F = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=device)
    for batch in batches:
        x, y = batch if isinstance(batch, tuple | list) else (batch, batch)
        x_BD, y_BO = x.to(device).float(), y.to(device).float()
        f_BF = sae.encode(x_BD)
        recon_BO = sae.decode(f_BF)
        if isinstance(sae, SAE):  # SAELens' SAEs are evaluated here too (benchmarks): theirs have no skip path
            recon_BO = sae.add_skip(x_BD, recon_BO)
        resid += float((y_BO - recon_BO).pow(2).sum())
        sum_D = y_BO.sum(0) if sum_D is None else sum_D + y_BO.sum(0)
        sum_sq = float(y_BO.pow(2).sum()) + (sum_sq or 0.0)
        active_BF = f_BF != 0
        l0 += float(active_BF.sum())
        fired_F |= active_BF.any(0)
        n += len(x_BD)
    if not n:
        raise ValueError("no evaluation tokens")
    total = sum_sq - float(sum_D.pow(2).sum()) / n
    return {"fvu": resid / max(total, 1e-12), "l0": l0 / n, "dead": float((~fired_F).float().mean()), "tokens": n}
