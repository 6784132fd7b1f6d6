"""Trainer benchmark: actstore's SAE trainers against SAELens' trainer, same tokens, same settings.

Real SmolLM2-135M ``hook_resid_post`` activations (``--layer``) over the built-in corpus are
written to an uncompressed store; ``actstore.stream`` serves them shuffled, scaled to
``E||x||^2 = D``, BOS-position tokens dropped, and the batches are kept in memory so both
trainers see exactly the same batches in the same order (``--epochs`` passes). The last
shards are held out. For each architecture, both trainers get the same width, k or sparsity
coefficient, learning rate, batch size, LR warm-up and final linear decay, sparsity warm-up and
dead-latent window, and the same initial weights (actstore's initialisation, copied into SAELens'
SAE); everything else is each library's own (AuxK details, TopK's decoder-norm rescaling...).

The same penalty coefficient need not give the same L0 in two implementations, and FVU is only
comparable at equal L0. So where a penalty architecture (ReLU, Gated, JumpReLU) ends more than 5%
away from SAELens' L0, actstore trains once more with the coefficient scaled by
``(L0 ours / L0 SAELens)^2`` and its FVU at SAELens' L0 is read off the log-log line through its
two runs (a local piece of the sparsity-fidelity frontier); the FVU ratio uses that figure.

Each trained SAE is saved in SAELens' format, loaded back with ``sae_lens.SAE.load_from_disk``
and evaluated by the same code on the held-out tokens: FVU (lower is better) and L0. Reported:
FVU ratio actstore / SAELens (goal: at most 1.02), and training tokens/s of each (whole
``fit``, same machine, same threads, interleaved in one run; goal for TopK: at least 4x), with
the bound one fp32 encoder matmul puts on a step.

Transcoders (``--archs transcoder``): SAELens has no transcoder trainer, so actstore's
``topk-transcoder`` (layer ``--layer``'s ``mlp_in`` to its ``mlp_out``, both normalised, same
batches) is compared with :class:`DenseTranscoder`, a TopK transcoder written here from Dunefsky
et al. 2024 (arXiv 2406.11944, §3.1) with dense matrices, plain Adam, the same schedule and the same
initial weights: held-out FVU of ``mlp_out`` (goal: ratio at most 1.02) and tokens/s; and
``topk-skip-transcoder`` at the same k, whose FVU must be below the plain transcoder's.

Crosscoders (``--archs crosscoder``): one crosscoder over the 4 adjacent layers ending at
``--layer`` (``resid_post``) against 4 per-layer TopK SAEs with the same total latents (4 x
``expansion`` x D) and the same total active latents per token (4 k), on the same tokens: held-out
FVU of each layer side by side, the crosscoder's shared latents (decoder norm at least a quarter of
their largest layer's in two layers or more), and tokens/s of the one crosscoder against the four
SAEs together.

    python benchmarks/bench_train.py [--archs topk,relu,transcoder,crosscoder] [--epochs 2] [--capture-tokens 131072]
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # SAELens' and the model loader's bars

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_store import capture, store_config, write_capture  # noqa: E402
from gpu_train import matmul_rate  # noqa: E402
from report import write_json  # noqa: E402

import actstore  # noqa: E402
from pipelines import smollm2  # noqa: E402
from pipelines.models import load_model  # noqa: E402
from pipelines.train import held_out_batches, split_shards  # noqa: E402
from trainers import make_sae, sae_config  # noqa: E402
from trainers.saelens_format import HookInfo, save_saelens  # noqa: E402
from trainers.trainer import Experiment, TrainConfig, Trainer, evaluate  # noqa: E402

CONTEXT = 256
MIN_POSITION = 1
ARCHS = ("topk", "batchtopk", "matryoshka", "relu", "gated", "jumprelu", "transcoder", "crosscoder")
CROSSCODER_LAYERS = 4
# The sparsity setting of each architecture, the same number for both libraries (both define
# these penalties the same way: summed over latents, averaged over tokens, MSE summed over D;
# inputs scaled to E||x||^2 = D over the served tokens). Chosen for L0 of a few hundred here.
SPARSITY = {"relu": 0.8, "gated": 0.8, "jumprelu": 3.5}
JUMPRELU_BANDWIDTH = 0.4
JUMPRELU_INIT_THRESHOLD = 0.08
MATCH_L0_TOLERANCE = 0.05  # penalty architectures whose L0s differ more than this are compared at SAELens' L0


def saelens_sae(arch: str, d_in: int, d_sae: int, k: int, warmup_steps: int):
    """SAELens' training SAE with the benchmark's shared settings, its defaults otherwise."""
    import sae_lens as sl

    if arch == "topk":
        return sl.TopKTrainingSAE(sl.TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
    if arch == "batchtopk":
        return sl.BatchTopKTrainingSAE(sl.BatchTopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
    if arch == "matryoshka":  # the same nested widths as ours (actstore's default levels)
        widths = list(sae_config("matryoshka", d_in=d_in, d_sae=d_sae, k=k).widths)
        return sl.MatryoshkaBatchTopKTrainingSAE(sl.MatryoshkaBatchTopKTrainingSAEConfig(
            d_in=d_in, d_sae=d_sae, k=k, matryoshka_widths=widths))
    if arch == "relu":
        return sl.StandardTrainingSAE(sl.StandardTrainingSAEConfig(
            d_in=d_in, d_sae=d_sae, l1_coefficient=SPARSITY["relu"], l1_warm_up_steps=warmup_steps))
    if arch == "gated":
        return sl.GatedTrainingSAE(sl.GatedTrainingSAEConfig(
            d_in=d_in, d_sae=d_sae, l1_coefficient=SPARSITY["gated"], l1_warm_up_steps=warmup_steps))
    if arch == "jumprelu":
        return sl.JumpReLUTrainingSAE(sl.JumpReLUTrainingSAEConfig(
            d_in=d_in, d_sae=d_sae, l0_coefficient=SPARSITY["jumprelu"], l0_warm_up_steps=warmup_steps,
            jumprelu_bandwidth=JUMPRELU_BANDWIDTH, jumprelu_init_threshold=JUMPRELU_INIT_THRESHOLD))
    raise ValueError(arch)


def actstore_config(arch: str, d_in: int, d_sae: int, k: int, coeff_scale: float = 1.0):
    fields = {
        "topk": {"k": k}, "batchtopk": {"k": k}, "matryoshka": {"k": k}, "relu": {"l1_coeff": SPARSITY["relu"] * coeff_scale},
        "gated": {"l1_coeff": SPARSITY["gated"] * coeff_scale},
        "jumprelu": {"l0_coeff": SPARSITY["jumprelu"] * coeff_scale, "bandwidth": JUMPRELU_BANDWIDTH,
                     "init_threshold": JUMPRELU_INIT_THRESHOLD},
    }[arch]
    return sae_config(arch, d_in=d_in, d_sae=d_sae, **fields)


@torch.no_grad()
def same_start(theirs, cfg, first_batch: torch.Tensor) -> None:
    """Start SAELens' SAE from actstore's initial weights (as the actstore trainer sets them:
    ``b_dec`` at the first batch's mean), so the comparison is of the training loops alone."""
    ours = make_sae(cfg)
    ours.b_dec.copy_(first_batch.mean(0))
    for name, param in theirs.named_parameters():
        if name != "threshold":  # JumpReLU: both start at JUMPRELU_INIT_THRESHOLD
            param.copy_(getattr(ours, name))


def train_actstore(arch: str, batches: list[torch.Tensor], args, d_in: int, out: Path, coeff_scale: float = 1.0) -> float:
    steps = len(batches)
    cfg = TrainConfig(tokens=sum(len(b) for b in batches), lr_warmup_steps=args.warmup_steps, lr_decay_start=0.8,
                      sparsity_warmup=min(1.0, args.warmup_steps / steps), dead_tokens=args.dead_steps * args.batch_size,
                      log_every=10**9)
    exp = Experiment(arch, actstore_config(arch, d_in, d_in * args.expansion, args.k, coeff_scale), args.lr)
    trainer = Trainer(cfg, [exp], batches)
    t = time.perf_counter()
    trainer.fit()
    elapsed = time.perf_counter() - t
    save_saelens(trainer.runs[0].sae, out, HookInfo(args.hook, smollm2.NAME, CONTEXT, False))
    return trainer.tokens / elapsed


def train_saelens(arch: str, batches: list[torch.Tensor], args, d_in: int, out: Path) -> float:
    from sae_lens import SAETrainer
    from sae_lens.config import SAETrainerConfig

    steps = len(batches)
    sae = saelens_sae(arch, d_in, d_in * args.expansion, args.k, args.warmup_steps)
    same_start(sae, actstore_config(arch, d_in, d_in * args.expansion, args.k), batches[0])
    cfg = SAETrainerConfig(
        total_training_samples=steps * args.batch_size, train_batch_size_samples=args.batch_size, lr=args.lr, lr_end=args.lr,
        lr_scheduler_name="constant", lr_warm_up_steps=args.warmup_steps, lr_decay_steps=steps - int(steps * 0.8),
        dead_feature_window=args.dead_steps, feature_sampling_window=max(1, steps), device="cpu",
    )
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=iter(batches))
    t = time.perf_counter()
    trainer.fit()
    elapsed = time.perf_counter() - t
    sae.save_inference_model(out)  # BatchTopK becomes JumpReLU, as ours does
    return steps * args.batch_size / elapsed


def held_out_eval(path: Path, held: list[torch.Tensor]) -> dict[str, float]:
    """FVU and L0 of the SAE saved at ``path``, loaded by SAELens, on the held-out batches."""
    from sae_lens import SAE

    return evaluate(SAE.load_from_disk(str(path)), held)


def fvu_at_l0(points: list[dict[str, float]], l0: float) -> float:
    """FVU at ``l0`` on the line through two (L0, FVU) runs, in log-log (a local piece of the
    sparsity-fidelity frontier)."""
    (a, b) = sorted(points, key=lambda r: r["l0"])[:2]
    slope = math.log(b["fvu"] / a["fvu"]) / math.log(b["l0"] / a["l0"])
    return a["fvu"] * (l0 / a["l0"]) ** slope


def make_batches(root: Path, args) -> tuple[list[torch.Tensor], list[torch.Tensor], Any]:
    """Capture, store, and stream the activations; (train batches, held-out batches, the model)."""
    lm = load_model(smollm2.NAME, device="cpu")
    cap = capture(lm, [args.layer], args.capture_tokens, context_size=CONTEXT)
    args.hook = next(iter(cap.acts))
    cfg = store_config(lm, cap, CONTEXT, codec="none", chunk_tokens=2048, shard_tokens=args.shard_tokens)
    store = write_capture(f"{root}/store", cap, cfg)
    train_shards, eval_shards = split_shards(store, args.eval_tokens)
    stream = actstore.stream(store, args.hook, args.batch_size, seed=0, epochs=args.epochs, shards=train_shards,
                             min_position=MIN_POSITION, normalize="expected_norm", drop_last=True)
    batches = [b.float().clone() for b in stream]
    scale = stream.scales[args.hook]
    held = list(held_out_batches(store, args.hook, eval_shards, args.batch_size, MIN_POSITION, scale))
    return batches, held, lm


class DenseTranscoder(torch.nn.Module):
    """The benchmark's own TopK transcoder (Dunefsky et al. 2024 §3.1; the TopK of Gao et al. 2024,
    arXiv 2406.04093 §2.3): ``y_hat = ReLU(TopK(x @ W_enc + b_enc)) @ W_dec + b_dec``, dense
    matrices throughout, decoder rows renormalised after each step; no AuxK."""

    def __init__(self, start, k: int):
        super().__init__()
        self.k = k
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):  # actstore's initial weights, copied
            self.register_parameter(name, torch.nn.Parameter(getattr(start, name).detach().clone().contiguous()))

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        pre_BF = x_BD @ self.W_enc + self.b_enc
        top = pre_BF.topk(self.k, dim=-1)
        f_BF = torch.zeros_like(pre_BF).scatter(-1, top.indices, torch.relu(top.values))
        return f_BF @ self.W_dec + self.b_dec


def held_out_fvu(predict, held: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """``sum ||y - y_hat||^2 / sum ||y - mean(y)||^2`` over the held-out pairs."""
    with torch.no_grad():
        y_NO = torch.cat([y for _, y in held])
        y_hat_NO = torch.cat([predict(x) for x, _ in held])
    return float((y_NO - y_hat_NO).pow(2).sum() / (y_NO - y_NO.mean(0)).pow(2).sum())


def train_dense_transcoder(pairs: list[tuple[torch.Tensor, torch.Tensor]], args, cfg) -> tuple[DenseTranscoder, float]:
    """:class:`DenseTranscoder` from actstore's initial weights (``b_dec`` at the first batch's
    target mean, as actstore's trainer starts), Adam, gradient clipped to norm 1, the learning
    rate warmed up over ``warmup_steps`` and decayed linearly over the last 20% of the steps."""
    start = make_sae(cfg)
    start.b_dec.data.copy_(pairs[0][1].mean(0))
    model = DenseTranscoder(start, cfg.k)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps, decay_from = len(pairs), int(len(pairs) * 0.8)
    t = time.perf_counter()
    for step, (x_BD, y_BO) in enumerate(pairs):
        lr = args.lr * min(1.0, (step + 1) / args.warmup_steps)
        if step >= decay_from:
            lr *= (steps - step) / (steps - decay_from)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = (y_BO - model(x_BD)).pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.W_dec /= model.W_dec.norm(dim=1, keepdim=True)
    return model, sum(len(x) for x, _ in pairs) / (time.perf_counter() - t)


def make_pairs(root: Path, args) -> tuple[list, list, Any, str, str, dict[str, float]]:
    """``mlp_in`` and ``mlp_out`` of ``--layer`` captured, stored and streamed together:
    (train pairs, held-out pairs, the model, hook in, hook out, the hooks' scales)."""
    lm = load_model(smollm2.NAME, device="cpu")
    cap = capture(lm, [args.layer], args.capture_tokens, context_size=CONTEXT, sites=("mlp_in", "mlp_out"))
    hook_in, hook_out = cap.acts
    cfg = store_config(lm, cap, CONTEXT, codec="none", chunk_tokens=2048, shard_tokens=args.shard_tokens)
    store = write_capture(f"{root}/pairs", cap, cfg)
    train_shards, eval_shards = split_shards(store, args.eval_tokens)
    stream = actstore.stream(store, [hook_in, hook_out], args.batch_size, seed=0, epochs=args.epochs, shards=train_shards,
                             min_position=MIN_POSITION, normalize="expected_norm", drop_last=True, stack=False)
    pairs = [(b[hook_in].float().clone(), b[hook_out].float().clone()) for b in stream]
    held = list(zip(*(held_out_batches(store, h, eval_shards, args.batch_size, MIN_POSITION, stream.scales[h])
                      for h in (hook_in, hook_out)), strict=True))
    return pairs, held, lm, hook_in, hook_out, stream.scales


EVAL_TOKENS = 8192
"""Held-out text tokens (the corpus' test split) of the spliced evaluation: CE, loss recovered."""


def spliced(lm, folder: Path) -> dict[str, float]:
    """``actstore eval``'s figures for the SAE, transcoder or crosscoder saved in ``folder``, spliced
    into the loaded model (:func:`pipelines.evaluate.measure`) on ``EVAL_TOKENS`` of held-out text."""
    from pipelines.evaluate import load_saes, measure
    from pipelines.splice import Splicer
    from pipelines.text import TextConfig, take_windows

    windows = take_windows(TextConfig(split="test", context_size=CONTEXT), lm.tokenizer, EVAL_TOKENS)
    saes = load_saes([str(folder)], lm.model, smollm2.NAME)
    with Splicer(lm.model, saes, lm.tokenizer.bos_token_id) as splicer:
        r = measure(lm.model, splicer, windows, batch_size=4)
    return {"ce_clean": r.ce_clean, "ce_spliced": r.ce_spliced, "delta_loss": r.delta_loss, "loss_recovered": r.loss_recovered,
            "kl": r.kl}


def transcoder_rows(root: Path, args, console: Console) -> list[dict]:
    """actstore's TopK transcoder and skip-transcoder against :class:`DenseTranscoder`, same pairs."""
    pairs, held, lm, hook_in, hook_out, scales = make_pairs(root, args)
    d = lm.d_model
    console.print(f"transcoders: {sum(len(x) for x, _ in pairs):,} training pairs of {hook_in} -> {hook_out}, "
                  f"{sum(len(x) for x, _ in held):,} held out")
    cfgs = {name: sae_config("topk-transcoder", d_in=d, d_sae=d * args.expansion, k=args.k, d_out=d, skip=skip)
            for name, skip in (("topk-transcoder", False), ("topk-skip-transcoder", True))}
    steps = len(pairs)
    train = TrainConfig(tokens=sum(len(x) for x, _ in pairs), lr_warmup_steps=args.warmup_steps, lr_decay_start=0.8,
                        sparsity_warmup=min(1.0, args.warmup_steps / steps), dead_tokens=args.dead_steps * args.batch_size,
                        log_every=10**9)
    ours = {}
    for name, cfg in cfgs.items():
        trainer = Trainer(train, [Experiment(name, cfg, args.lr)], pairs)
        t = time.perf_counter()
        trainer.fit()
        rate = trainer.tokens / (time.perf_counter() - t)
        result = evaluate(trainer.runs[0].sae, held)
        folder = save_saelens(trainer.runs[0].sae, root / name, HookInfo(hook_in, smollm2.NAME, CONTEXT, False, hook_name_out=hook_out),
                              scale=scales[hook_in], scale_out=scales[hook_out])
        ours[name] = {**result, "tokens_per_s": rate, **spliced(lm, folder)}
    reference, ref_rate = train_dense_transcoder(pairs, args, cfgs["topk-transcoder"])
    ref_fvu = held_out_fvu(reference, held)
    plain, skip = ours["topk-transcoder"], ours["topk-skip-transcoder"]
    return [{"arch": "topk-transcoder", "hooks": f"{hook_in} -> {hook_out}", "actstore_fvu": plain["fvu"], "reference_fvu": ref_fvu,
             "fvu_ratio": plain["fvu"] / ref_fvu, "l0": plain["l0"], "actstore_tokens_per_s": plain["tokens_per_s"],
             "reference_tokens_per_s": ref_rate, "speedup": plain["tokens_per_s"] / ref_rate,
             **{k: plain[k] for k in ("ce_clean", "ce_spliced", "delta_loss", "loss_recovered")}},
            {"arch": "topk-skip-transcoder", "hooks": f"{hook_in} -> {hook_out}", "actstore_fvu": skip["fvu"], "l0": skip["l0"],
             "fvu_vs_plain": skip["fvu"] / plain["fvu"], "actstore_tokens_per_s": skip["tokens_per_s"],
             **{k: skip[k] for k in ("ce_clean", "ce_spliced", "delta_loss", "loss_recovered")}}]


def crosscoder_rows(root: Path, args, console: Console) -> list[dict]:
    """A crosscoder over ``CROSSCODER_LAYERS`` adjacent layers against one TopK SAE per layer (see the docstring)."""
    from trainers.crosscoder import flatten_layers, layer_fvus, save_crosscoder, shared_latents

    lm = load_model(smollm2.NAME, device="cpu")
    layers = list(range(args.layer - CROSSCODER_LAYERS + 1, args.layer + 1))
    cap = capture(lm, layers, args.capture_tokens, context_size=CONTEXT)
    hooks = list(cap.acts)
    store = write_capture(f"{root}/layers", cap, store_config(lm, cap, CONTEXT, codec="none", chunk_tokens=2048,
                                                                shard_tokens=args.shard_tokens))
    train_shards, eval_shards = split_shards(store, args.eval_tokens)
    stream = actstore.stream(store, hooks, args.batch_size, seed=0, epochs=args.epochs, shards=train_shards,
                             min_position=MIN_POSITION, normalize="expected_norm", drop_last=True)
    stacked = [b.float().clone() for b in stream]  # [B, L, D], each layer at its own scale
    held = [torch.stack(parts, 1) for parts in zip(*(held_out_batches(store, h, eval_shards, args.batch_size, MIN_POSITION,
                                                                      stream.scales[h]) for h in hooks), strict=True)]
    d = lm.d_model
    n_train = sum(len(b) for b in stacked)
    console.print(f"crosscoder: {n_train:,} tokens of {', '.join(hooks)}, {sum(len(b) for b in held):,} held out")
    train = TrainConfig(tokens=n_train, lr_warmup_steps=args.warmup_steps, lr_decay_start=0.8,
                        dead_tokens=args.dead_steps * args.batch_size, log_every=10**9)
    per_layer_fvu, per_layer_time = [], 0.0
    for i in range(len(hooks)):
        trainer = Trainer(train, [Experiment("sae", sae_config("topk", d_in=d, d_sae=d * args.expansion, k=args.k), args.lr)],
                          [b[:, i] for b in stacked])
        t = time.perf_counter()
        trainer.fit()
        per_layer_time += time.perf_counter() - t
        per_layer_fvu.append(evaluate(trainer.runs[0].sae, [b[:, i] for b in held])["fvu"])
    cfg = sae_config("crosscoder", d_in=len(hooks) * d, d_sae=len(hooks) * d * args.expansion, k=len(hooks) * args.k,
                     n_layers=len(hooks))
    trainer = Trainer(train, [Experiment("crosscoder", cfg, args.lr)], [flatten_layers(b) for b in stacked])
    t = time.perf_counter()
    trainer.fit()
    cc_time = time.perf_counter() - t
    sae = trainer.runs[0].sae
    flat_held = [flatten_layers(b) for b in held]
    cc_fvu = layer_fvus(sae, flat_held)
    l0 = evaluate(sae, flat_held)["l0"]
    folder = save_crosscoder(sae, root / "crosscoder", hooks, [stream.scales[h] for h in hooks], smollm2.NAME, CONTEXT, False)
    splice = spliced(lm, folder)
    return [{"hook": h, "crosscoder_fvu": c, "per_layer_sae_fvu": p} for h, c, p in zip(hooks, cc_fvu, per_layer_fvu, strict=True)] + [
        {"hook": "all", "crosscoder_fvu": sum(cc_fvu) / len(cc_fvu), "per_layer_sae_fvu": sum(per_layer_fvu) / len(per_layer_fvu),
         "crosscoder_l0": l0, "per_layer_sae_l0_total": len(hooks) * args.k, "latents": cfg.d_sae,
         "shared_latents": shared_latents(sae), "crosscoder_tokens_per_s": n_train / cc_time,
         "per_layer_saes_tokens_per_s": n_train / per_layer_time, **splice}]


def show_crosscoders(console: Console, rows: list[dict]) -> None:
    *layers, total = rows
    table = Table(title=f"Crosscoder over {len(layers)} layers ({total['latents']:,} latents, L0 {total['crosscoder_l0']:.0f}) vs "
                        f"{len(layers)} per-layer TopK SAEs (same total latents, L0 {total['per_layer_sae_l0_total']} together): "
                        "held-out FVU per layer")
    for col in ("layer", "FVU crosscoder", "FVU per-layer SAE"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for r in rows:
        table.add_row(r["hook"], f"{r['crosscoder_fvu']:.4f}", f"{r['per_layer_sae_fvu']:.4f}")
    console.print(table)
    console.print(f"shared latents (writing 2+ layers): {total['shared_latents']:,} of {total['latents']:,}; tokens/s: crosscoder "
                  f"{total['crosscoder_tokens_per_s']:,.0f}, the {len(layers)} SAEs together {total['per_layer_saes_tokens_per_s']:,.0f}; "
                  f"spliced (every layer replaced): CE {total['ce_clean']:.4f} -> {total['ce_spliced']:.4f}, loss recovered "
                  f"{total['loss_recovered']:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--capture-tokens", type=int, default=131072)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--shard-tokens", type=int, default=8192)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--dead-steps", type=int, default=20, help="steps without firing before a latent counts as dead")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args()
    archs = [a for a in args.archs.split(",") if a and a not in ("transcoder", "crosscoder")]
    with_transcoders = "transcoder" in args.archs.split(",")
    with_crosscoders = "crosscoder" in args.archs.split(",")
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    console = Console(width=150)

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        root = Path(tmp)
        coder_rows = transcoder_rows(root, args, console) if with_transcoders else []
        cross_rows = crosscoder_rows(root, args, console) if with_crosscoders else []
        if cross_rows:
            show_crosscoders(console, cross_rows)
        if not archs:
            show_transcoders(console, coder_rows, args, cross_rows=cross_rows)
            return
        batches, held, lm = make_batches(root, args)
        d_in = lm.d_model
        d_sae = d_in * args.expansion
        bound = matmul_rate(torch.device("cpu"), args.batch_size, d_in, d_sae, torch.float32, repeats=5)  # one fp32 encoder matmul a step
        n_train = sum(len(b) for b in batches)
        console.print(f"{n_train:,} training tokens ({len(batches)} batches of {args.batch_size}, {args.epochs} epochs "
                      f"of {args.hook}), {sum(len(b) for b in held):,} held-out tokens; d_in {d_in}, d_sae {d_sae}, "
                      f"lr {args.lr:g}, torch threads {torch.get_num_threads()}")
        rows = []
        for arch in archs:
            ours_rate = train_actstore(arch, batches, args, d_in, root / f"ours-{arch}")
            theirs_rate = train_saelens(arch, batches, args, d_in, root / f"saelens-{arch}")
            ours, theirs = held_out_eval(root / f"ours-{arch}", held), held_out_eval(root / f"saelens-{arch}", held)
            matched = ours["fvu"]
            if arch in SPARSITY and abs(ours["l0"] / theirs["l0"] - 1) > MATCH_L0_TOLERANCE:
                # same coefficient, different L0: FVU is only comparable at equal L0, so train ours once
                # more with the coefficient moved towards SAELens' L0 and read the FVU there
                train_actstore(arch, batches, args, d_in, root / f"ours-{arch}-2", (ours["l0"] / theirs["l0"]) ** 2)
                second = held_out_eval(root / f"ours-{arch}-2", held)
                matched = fvu_at_l0([ours, second], theirs["l0"])
                console.print(f"  {arch}: L0 {ours['l0']:.0f} vs SAELens {theirs['l0']:.0f}; second run at L0 "
                              f"{second['l0']:.0f} (FVU {second['fvu']:.4f}) -> FVU {matched:.4f} at L0 {theirs['l0']:.0f}")
            splice = spliced(lm, root / f"ours-{arch}")  # actstore eval's figures for actstore's SAE
            rows.append({"arch": arch, "actstore_fvu": ours["fvu"], "saelens_fvu": theirs["fvu"],
                         "actstore_loss_recovered": splice["loss_recovered"], "actstore_delta_loss": splice["delta_loss"],
                         "actstore_fvu_at_saelens_l0": matched,
                         "fvu_ratio": matched / theirs["fvu"], "actstore_l0": ours["l0"], "saelens_l0": theirs["l0"],
                         "actstore_tokens_per_s": ours_rate, "saelens_tokens_per_s": theirs_rate,
                         "speedup": ours_rate / theirs_rate})
            console.print(f"  {arch}: done")

    table = Table(title=f"SAE training, actstore vs SAELens (held-out FVU, L0; tokens/s; encoder-matmul bound {bound:,.0f} tok/s)")
    for col in ("arch", "FVU actstore", "FVU SAELens", "L0 actstore", "L0 SAELens", "FVU actstore at SAELens' L0", "FVU ratio",
                "tok/s actstore", "tok/s SAELens", "speedup", "loss recovered (actstore)"):
        table.add_column(col, justify="left" if col == "arch" else "right")
    for r in rows:
        table.add_row(r["arch"], f"{r['actstore_fvu']:.4f}", f"{r['saelens_fvu']:.4f}", f"{r['actstore_l0']:.1f}",
                      f"{r['saelens_l0']:.1f}", f"{r['actstore_fvu_at_saelens_l0']:.4f}", f"{r['fvu_ratio']:.3f}",
                      f"{r['actstore_tokens_per_s']:,.0f}",
                      f"{r['saelens_tokens_per_s']:,.0f}", f"{r['speedup']:.2f}x", f"{r['actstore_loss_recovered']:.3f}")
    console.print(table)
    console.print("goals: FVU ratio <= 1.02 for every architecture; TopK speedup >= 4x; TopK actstore >= half the bound")
    show_transcoders(console, coder_rows, args, headline_rows=rows, bound=bound, cross_rows=cross_rows)


def show_transcoders(console: Console, coder_rows: list[dict], args, headline_rows: list[dict] | None = None,
                     bound: float | None = None, cross_rows: list[dict] | None = None) -> None:
    """The transcoder table, then the JSON (SAE rows' headline too when given)."""
    rows = headline_rows or []
    if coder_rows:
        plain, skip = coder_rows
        table = Table(title=f"Transcoders {plain['hooks']}: actstore vs a dense reference (held-out FVU of the output, L0, tokens/s)")
        for col in ("arch", "FVU actstore", "FVU reference", "FVU ratio", "L0", "tok/s actstore", "tok/s reference", "speedup",
                    "spliced CE (clean)", "loss recovered"):
            table.add_column(col, justify="left" if col == "arch" else "right")
        table.add_row(plain["arch"], f"{plain['actstore_fvu']:.4f}", f"{plain['reference_fvu']:.4f}", f"{plain['fvu_ratio']:.3f}",
                      f"{plain['l0']:.1f}", f"{plain['actstore_tokens_per_s']:,.0f}", f"{plain['reference_tokens_per_s']:,.0f}",
                      f"{plain['speedup']:.2f}x", f"{plain['ce_spliced']:.4f} ({plain['ce_clean']:.4f})", f"{plain['loss_recovered']:.3f}")
        table.add_row(skip["arch"], f"{skip['actstore_fvu']:.4f}", "", f"{skip['fvu_vs_plain']:.3f} of plain", f"{skip['l0']:.1f}",
                      f"{skip['actstore_tokens_per_s']:,.0f}", "", "", f"{skip['ce_spliced']:.4f} ({skip['ce_clean']:.4f})",
                      f"{skip['loss_recovered']:.3f}")
        console.print(table)
        console.print("goals: transcoder FVU ratio <= 1.02; skip-transcoder FVU below the plain one's at the same L0")
    headline = [(f"held-out FVU actstore / SAELens at equal L0, {r['arch']}", f"{r['fvu_ratio']:.3f}", "<= 1.02") for r in rows]
    headline += [(f"training speed actstore / SAELens, {r['arch']}", f"{r['speedup']:.1f}x", ">= 4x" if r["arch"] == "topk" else "")
                 for r in rows]
    if coder_rows:
        headline += [("held-out FVU of mlp_out, TopK transcoder actstore / dense reference", f"{coder_rows[0]['fvu_ratio']:.3f}", "<= 1.02"),
                     ("held-out FVU, skip-transcoder / transcoder at the same k", f"{coder_rows[1]['fvu_vs_plain']:.3f}", "< 1")]
    if cross_rows:
        total = cross_rows[-1]
        headline += [("mean held-out FVU per layer, crosscoder / per-layer TopK SAEs (same total latents)",
                      f"{total['crosscoder_fvu']:.4f} / {total['per_layer_sae_fvu']:.4f}", ""),
                     ("crosscoder latents writing 2+ layers", f"{total['shared_latents']:,} of {total['latents']:,}", "")]
    write_json(args.json, headline, encoder_bound_tokens_per_s=bound, rows=rows, transcoder_rows=coder_rows,
               crosscoder_rows=cross_rows or [])


if __name__ == "__main__":
    main()
