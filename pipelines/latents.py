"""``actstore latents``: what every latent of one or more SAEs responds to, from a store alone.

One pass over the store in token order, no model forward: each batch of whole context windows is
read once (every hook any SAE needs, in a background thread), every SAE's encoder runs on it, and
:class:`pipelines.latent_stats.LatentStats` folds the latents in on the device (frequency, mean,
max, histogram, top-activating and random examples with their contexts). The state is saved to
``OUT/checkpoint/`` every ``checkpoint_every`` seconds and at the end of the pass, so a killed run
resumes where it was and ends with the same files. Then each SAE's dashboard is written
(:mod:`pipelines.dashboard`): the token ids decoded with the model's tokenizer and, with
``model``, each latent's logit-lens tokens: its decoder row through the unembedding,
``W_dec[f] @ W_U^T``, the tokens it promotes and suppresses directly (nostalgebraist 2020,
"interpreting GPT: the logit lens"; Bricken et al. 2023, "Towards Monosemanticity",
§"Interpretability": logit weights).

An SAE spec is any ``--sae`` of ``actstore eval`` (:mod:`pipelines.saes`): an SAE or transcoder
(the latents of its input hook), a crosscoder (its layers read together), or a Group-SAE run's
folder (``train-sae --group``'s ``<experiment>/``, one SAE folder per member layer): one
dashboard per member layer.

Shape letters: B tokens in a batch, D width, F latents, V vocabulary.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import actstore
from actstore.dtypes import to_torch
from actstore.prefetch import Prefetcher
from trainers import checkpoint
from trainers.crosscoder import is_crosscoder_folder
from trainers.saelens_format import CONFIG_FILE
from trainers.topk import TopKSAE
from trainers.trainer import CHECKPOINT_DIR

from . import dashboard
from .capture import HookPoint
from .files import write_json_atomic
from .latent_stats import Batch, Latents, LatentStats, StatsConfig
from .models import ModelLoadError, load_model, model_spec
from .runs import RUN_KEY, open_run, run_record
from .runtime import progress_bar, resolve_device
from .saes import LoadedSAE, fingerprint, load_sae

log = logging.getLogger(__name__)

FINISHED_FILE = "latents.json"
PREFETCH_BATCHES = 2


@dataclass(frozen=True)
class LatentsConfig:
    """One ``actstore latents`` run."""

    store: str
    saes: tuple[str, ...]
    out: str
    tokens: int | None = None
    """Tokens read from the start of the store (None: every committed one)."""
    stats: StatsConfig = field(default_factory=StatsConfig)
    batch_tokens: int = 8192
    """Tokens per batch, rounded down to whole context windows (at least one)."""
    min_position: int | None = None
    """Tokens at lower positions of their window are not counted (None: 1 when the store's windows
    start with BOS, whose activations are outliers, else 0)."""
    model: str | None = None
    """Model whose tokenizer decodes the contexts and whose unembedding gives the logit-lens
    tokens (None: the store's model for the tokenizer, no logit lens)."""
    logit_tokens: int = 10
    """Logit-lens tokens listed at each end."""
    shard_size: int = 1024
    """Latents per output shard."""
    device: str = "auto"
    checkpoint_every: float = 60.0
    """Seconds between checkpoints of the pass (0: after every batch)."""
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "saes", tuple(self.saes))
        if not self.saes:
            raise ValueError("no SAE given; pass --sae DIR (one or more)")
        if self.tokens is not None and self.tokens <= 0:
            raise ValueError(f"--tokens must be positive, got {self.tokens}")
        for name in ("batch_tokens", "shard_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.min_position is not None and self.min_position < 0:
            raise ValueError(f"--min-position must be >= 0, got {self.min_position}")
        if self.logit_tokens < 0:
            raise ValueError(f"--logit-tokens must be >= 0, got {self.logit_tokens}")


@dataclass(frozen=True)
class View:
    """One dashboard: an SAE and the hooks its encoder reads."""

    name: str
    """Its folder under ``out``."""
    loaded: LoadedSAE
    reads: tuple[str, ...]
    """One hook, or a crosscoder's layers in the order of its layer axis."""

    @property
    def title(self) -> str:
        what = ", ".join(self.reads) if len(self.reads) > 1 else self.loaded.label
        return f"{what} · {self.loaded.source}"

    def encode(self, acts: dict[str, torch.Tensor], counted_B: torch.Tensor) -> Latents:
        """The batch's latents (a crosscoder's layers side by side), zero on tokens not counted:
        a TopK SAE's ``k`` per token as they are, any other's dense."""
        x_BD = torch.cat([acts[h] for h in self.reads], dim=-1) if len(self.reads) > 1 else acts[self.reads[0]]
        sae = self.loaded.sae
        if isinstance(sae, TopKSAE):
            return Latents.sparse(*sae.encode_sparse(x_BD), sae.cfg.d_sae, counted_B)
        return Latents.dense(sae.encode(x_BD), counted_B)

    def decoder_out(self) -> torch.Tensor:
        """``[F, D]``: what each latent adds to the hook it writes (a crosscoder's deepest layer)."""
        sae = self.loaded.sae
        if self.loaded.layers:
            deepest = max(range(len(self.reads)), key=lambda i: _depth(self.reads[i]))
            return sae.W_dec.view(sae.cfg.d_sae, len(self.reads), -1)[:, deepest]
        return sae.W_dec


@dataclass(frozen=True)
class LatentsResult:
    out: Path
    tokens: int
    """Tokens counted per SAE."""
    views: list[dict[str, Any]]
    """Per dashboard: name, sae, hook, d_sae, dead, tokens, path (of its page, relative to ``out``)."""
    seconds: float
    """The whole run."""
    pass_seconds: float = 0.0
    """Of which the pass over the store: first batch read to the last checkpoint."""
    resumed_from: int = 0
    """Tokens already done when the run started (0: a new run)."""
    already_finished: bool = False
    """``out`` held this run, finished: nothing was computed."""


def _depth(hook: str) -> int:
    """The block a hook belongs to (0 for a name actstore does not parse)."""
    try:
        return HookPoint.parse(hook).layer
    except ValueError:
        return 0


def _folder_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "sae"


def expand_views(specs: tuple[str, ...]) -> list[View]:
    """The dashboards the SAE specs name (a Group-SAE folder: one per member layer)."""
    views: list[View] = []
    for spec in specs:
        path = Path(spec).expanduser()
        members = []
        if path.is_dir() and not (path / CONFIG_FILE).exists() and not is_crosscoder_folder(path) \
                and not (path / "params.npz").exists():
            members = sorted(p for p in path.iterdir() if (p / CONFIG_FILE).is_file())
            if not members:
                raise FileNotFoundError(f"{spec} holds no SAE (no {CONFIG_FILE}, and no SAE folders of a Group-SAE run in it); "
                                        "give an SAE folder")
        for member in members or [spec]:
            loaded = load_sae(str(member))
            reads = loaded.layers or (loaded.hook,)
            base = _folder_name(path.name if not spec.startswith("saelens:") else spec.split("/", 1)[-1])
            name = f"{base}/{_folder_name(Path(member).name)}" if members else base
            taken = {v.name for v in views}
            unique, i = name, 2
            while unique in taken:
                unique, i = f"{name}-{i}", i + 1
            views.append(View(unique, loaded, tuple(reads)))
    return views


def _readable_tokens(store: actstore.Store) -> int:
    """Tokens in the store's committed prefix (a harvest still running commits out of order)."""
    committed = set(store.committed_shards)
    shard = 0
    while shard in committed:
        shard += 1
    return min(shard * store.config.shard_tokens, store.config.n_tokens_target)


def check_views(views: list[View], store: actstore.Store) -> None:
    """Every hook an SAE reads is in the store, at the SAE's width."""
    for v in views:
        for hook in v.reads:
            if hook not in store.hooks:
                raise ValueError(f"SAE {v.loaded.source} reads {hook}, which {store.url} does not hold (it has "
                                 f"{', '.join(store.hooks)}); harvest that hook, or give the store it was trained on")
        width = sum(store.config.width(h) for h in v.reads)
        d_in = v.loaded.sae.cfg.d_in
        if width != d_in:
            raise ValueError(f"SAE {v.loaded.source} has d_in {d_in}, but {' + '.join(v.reads)} in {store.url} is "
                             f"{width} wide; is this SAE for another model?")


def _identity(cfg: LatentsConfig, store: actstore.Store, views: list[View], n_tokens: int, min_position: int) -> dict:
    return {"store": store.url, "store_id": store.id, "tokens": n_tokens, "min_position": min_position,
            "saes": [{"name": v.name, "source": v.loaded.source, "fingerprint": fingerprint(v.loaded.source)}
                     for v in views],
            "stats": asdict(cfg.stats), "model": cfg.model, "logit_tokens": cfg.logit_tokens,
            "shard_size": cfg.shard_size}


def _batches(store: actstore.Store, hooks: list[str], start: int, stop: int, batch: int
             ) -> Iterator[tuple[int, int, dict[str, np.ndarray], np.ndarray, np.ndarray]]:
    for s in range(start, stop, batch):
        e = min(s + batch, stop)
        yield s, e, {h: store.read(h, s, e) for h in hooks}, store.tokens(s, e), store.positions(s, e)


def window_batch(store: actstore.Store, batch_tokens: int) -> int:
    """``batch_tokens`` rounded down to whole context windows (at least one)."""
    context = int(store.config.context_size)
    return max(1, batch_tokens // context) * context


def run_latents(cfg: LatentsConfig) -> LatentsResult:
    """The pass and the dashboards (see the module docstring)."""
    t0 = time.perf_counter()
    store = actstore.open_store(cfg.store)
    views = expand_views(cfg.saes)
    check_views(views, store)
    available = _readable_tokens(store)
    if available == 0:
        raise ValueError(f"{store.url} has no committed tokens yet; run actstore harvest first")
    n_tokens = min(available, cfg.tokens) if cfg.tokens else available
    min_position = cfg.min_position if cfg.min_position is not None else int(bool(store.config.prepend_bos))
    tokenizer = _tokenizer(cfg, store)
    identity = _identity(cfg, store, views, n_tokens, min_position)
    folder = open_run(cfg.out, identity, finished_file=FINISHED_FILE, overwrite=cfg.overwrite, command="actstore latents")
    out = folder.path
    if folder.state == "finished":
        log.info("%s: this latents run is already finished", out)
        saved = folder.saved or {}
        return LatentsResult(out, int(saved.get("tokens", 0)), list(saved.get("views", [])), 0.0, already_finished=True)

    device = resolve_device(cfg.device)
    for v in views:
        v.loaded.sae.to(device).eval()
    stats = {v.name: LatentStats(v.loaded.sae.cfg.d_sae, cfg.stats, device) for v in views}
    start = 0
    if folder.state == "resume":
        saved = checkpoint.load(out / CHECKPOINT_DIR)
        start = int(saved["next"])
        for v in views:
            stats[v.name].load_state_dict(saved["views"][v.name])
        log.info("resuming %s at token %d of %d", out, start, n_tokens)
    resumed_from = start
    out.mkdir(parents=True, exist_ok=True)

    def save(next_token: int) -> None:
        checkpoint.save(out / CHECKPOINT_DIR, {RUN_KEY: run_record(identity), "next": next_token,
                                              "views": {name: s.state_dict() for name, s in stats.items()}})

    hooks = sorted({h for v in views for h in v.reads})
    batch = window_batch(store, cfg.batch_tokens)
    pass_seconds = 0.0
    if start < n_tokens:
        t_pass = time.perf_counter()
        reader = Prefetcher(lambda: _batches(store, hooks, start, n_tokens, batch), PREFETCH_BATCHES, "latents-reader")
        last_save = time.perf_counter()
        with progress_bar(cfg.progress, "latents", n_tokens, start, show_rate=True) as update, torch.inference_mode():
            try:
                for s, e, acts, tokens, positions in reader:
                    _update(views, stats, device, s, e, acts, tokens, positions, min_position)
                    update(e)
                    if e < n_tokens and time.perf_counter() - last_save >= cfg.checkpoint_every:
                        save(e)
                        last_save = time.perf_counter()
            finally:
                reader.close()
        save(n_tokens)
        pass_seconds = time.perf_counter() - t_pass

    summaries = write_dashboards(cfg, views, stats, tokenizer, device)
    counted = next(iter(stats.values())).tokens
    write_json_atomic(out / FINISHED_FILE, {RUN_KEY: run_record(identity), "tokens": counted, "views": summaries})
    return LatentsResult(out, counted, summaries, time.perf_counter() - t0, pass_seconds, resumed_from)


def _update(views: list[View], stats: dict[str, LatentStats], device: torch.device, s: int, e: int,
            acts: dict[str, np.ndarray], tokens: np.ndarray, positions: np.ndarray, min_position: int) -> None:
    acts_BD = {h: to_torch(a).to(device, non_blocking=True).float() for h, a in acts.items()}
    positions_B = torch.from_numpy(positions.astype(np.int64)).to(device)
    counted_B = positions_B >= min_position
    window_start_B, window_end_B = Batch.windows(positions_B)
    index_B = torch.arange(s, e, device=device)
    tokens_B = torch.from_numpy(tokens.astype(np.int64)).to(device)
    counted = int(counted_B.sum())
    for v in views:
        stats[v.name].update(Batch(v.encode(acts_BD, counted_B), index_B, tokens_B, window_start_B, window_end_B, counted))


def _tokenizer(cfg: LatentsConfig, store: actstore.Store):
    name = cfg.model or store.config.model.name
    try:
        return model_spec(name, device="cpu").tokenizer
    except (ModelLoadError, OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        where = "--model" if cfg.model else f"the store's model {name!r}"
        raise ValueError(f"cannot load the tokenizer of {where} ({first}); pass --model with that model's "
                         "local folder or HF id") from None


def logit_lens(views: list[View], model_name: str, k: int, device: torch.device) -> dict[str, tuple[torch.Tensor, ...]]:
    """Per view: ``(top_values, top_ids, bottom_values, bottom_ids)``, each ``[F, k]``, of
    ``W_dec @ W_U^T`` (the unembedding of ``model_name``)."""
    loaded = load_model(model_name, model_dtype="float32", device=str(device))
    W_U_VD = loaded.model.get_output_embeddings().weight.detach().float()
    out = {}
    for v in views:
        W_dec_FD = v.decoder_out().detach().float().to(W_U_VD.device)
        if W_dec_FD.shape[1] != W_U_VD.shape[1]:
            raise ValueError(f"SAE {v.loaded.source} writes vectors of width {W_dec_FD.shape[1]}, but {model_name}'s "
                             f"unembedding takes {W_U_VD.shape[1]}; pass the --model the SAE belongs to")
        rows = max(1, (1 << 28) // (4 * W_U_VD.shape[0]))  # about 256 MB of logits at a time
        parts = []
        for i in range(0, W_dec_FD.shape[0], rows):
            logits_FV = W_dec_FD[i:i + rows] @ W_U_VD.T
            top, bottom = logits_FV.topk(k, dim=1), logits_FV.topk(k, dim=1, largest=False)
            parts.append((top.values, top.indices, bottom.values, bottom.indices))
        out[v.name] = tuple(torch.cat([p[j] for p in parts]).cpu() for j in range(4))
    del loaded
    return out


def write_dashboards(cfg: LatentsConfig, views: list[View], stats: dict[str, LatentStats], tokenizer: Any,
                     device: torch.device) -> list[dict[str, Any]]:
    """Each view's dashboard under ``out/<name>/`` and the page listing them."""
    out = Path(cfg.out)
    lens = logit_lens(views, cfg.model, cfg.logit_tokens, device) if cfg.model and cfg.logit_tokens else {}
    decode = dashboard.Decoder(tokenizer)
    summaries = []
    for v in views:
        st = stats[v.name]
        F = v.loaded.sae.cfg.d_sae
        folder = out / v.name
        summary = st.summary()
        index = {"title": v.title, "sae": v.loaded.source, "hook": ", ".join(v.reads), "architecture":
                 getattr(v.loaded.sae, "saelens_architecture", type(v.loaded.sae).__name__), "d_sae": F,
                 "tokens": st.tokens, "shard_size": cfg.shard_size, **summary,
                 "histogram_edges": cfg.stats.edges().tolist(), "has_logits": v.name in lens}
        shards = []
        for k in range(math.ceil(F / cfg.shard_size)):
            lo, hi = k * cfg.shard_size, min((k + 1) * cfg.shard_size, F)
            logits = list(zip(*(t[lo:hi].tolist() for t in lens[v.name]), strict=True)) if v.name in lens else None
            records = [dashboard.latent_record(r, decode, logits[i] if logits else None)
                       for i, r in enumerate(st.records(lo, hi, dashboard.DIGITS))]
            shards.append((k, records))
        dashboard.write_dashboard(folder, index, shards)
        dead = sum(1 for f in summary["frequency"] if f == 0)
        summaries.append({"name": v.name, "sae": v.loaded.source, "hook": ", ".join(v.reads), "d_sae": F,
                          "dead": dead, "tokens": st.tokens, "path": f"{v.name}/index.html"})
    dashboard.write_home(out, summaries)
    return summaries
