"""The ``actstore`` command line: options -> config -> pipeline call.

User mistakes (a wrong path, a bad option value, a store from a newer actstore) are printed as
one line on stderr with exit code 2; no tracebacks. Secrets (S3 keys) come from the environment
and are never echoed.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from collections.abc import Callable, Iterator
from typing import Annotated, Any, TypeVar

# actstore shows its own progress; the libraries' loading bars (tqdm, read from the environment
# when tqdm is imported) would bury it, and the one-line errors
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import typer  # noqa: E402
from rich.console import Console  # noqa: E402

import actstore  # noqa: E402
from actstore.errors import machine_error  # noqa: E402
from pipelines.groups import DEFAULT_AMAD_THRESHOLD  # noqa: E402

app = typer.Typer(
    name="actstore",
    help="Activation caching for sparse-autoencoder research: harvest, store, stream, train, evaluate, LoRA.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
F = TypeVar("F", bound=Callable[..., Any])
USER_ERROR = 2


def user_errors(fn: F) -> F:
    """Turn actstore's named errors, bad values and the machine's refusals (a full disk, a
    read-only folder) into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (actstore.ActstoreError, ValueError, KeyError, IndexError, FileNotFoundError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            typer.echo(f"error: {msg}", err=True)
            raise typer.Exit(USER_ERROR) from None
        except OSError as e:
            what = machine_error(e)
            if what is None:
                raise
            typer.echo(f"error: {what}", err=True)
            raise typer.Exit(USER_ERROR) from None

    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def _exit_on_interrupt(message: str) -> Iterator[None]:
    """Ctrl-C: ``message`` on stderr and exit code 130, no traceback."""
    try:
        yield
    except KeyboardInterrupt:
        typer.echo(message, err=True)
        raise typer.Exit(130) from None


def _print_json(doc: Any) -> None:
    typer.echo(json.dumps(doc, indent=2))


RESUME_HINT = "interrupted; rerun the same command to resume from the last checkpoint"
FINISHED = "the run in {out} is finished; nothing to do (its figures below; --overwrite starts it again)"


# ---- options several commands share ------------------------------------------------------
# Defined once here, used as ``name: Alias = default`` (each command keeps its own default);
# json_flag and progress_flag fix the flag's spelling where a command words its help its own way.
def json_flag(help: str = "Print machine-readable JSON.") -> Any:
    return typer.Option("--json", help=help)


def progress_flag(help: str = "Show a progress bar.") -> Any:
    return typer.Option("--progress/--no-progress", help=help)


SAE_HELP = "An SAE folder (cfg.json + sae_weights.safetensors, from train-sae or SAELens), a Gemma Scope params.npz, or saelens:<release>/<sae_id>; repeat to splice several."

JsonOpt = Annotated[bool, json_flag()]
ProgressOpt = Annotated[bool, progress_flag()]
ProgressBarsOpt = Annotated[bool, progress_flag("Show progress bars.")]
StoreOpt = Annotated[str, typer.Option(help="Store path or URL.")]
ModelOpt = Annotated[str, typer.Option(help="Alias (smollm2-135m, gemma-2-2b, ...), local folder or HF id.")]
SaeOpt = Annotated[list[str], typer.Option(help=SAE_HELP)]
ModelDTypeOpt = Annotated[str, typer.Option(help="auto, float32, bfloat16, float16.")]
DeviceOpt = Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda, cuda:N.")]
OverwriteRunOpt = Annotated[bool, typer.Option(help="Start again in an --out that holds a run (it is removed).")]
# the text a model reads (pipelines.text.TextConfig)
DatasetOpt = Annotated[str, typer.Option(help="builtin:python-docs, a .txt/.jsonl/.parquet file, folder or glob, or an HF dataset.")]
TextColumnOpt = Annotated[str, typer.Option(help="Column holding the text.")]
ContextSizeOpt = Annotated[int, typer.Option(help="Tokens per window.")]


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False,
    storage_option: Annotated[list[str] | None, typer.Option(
        "--storage-option", help="key=value for the filesystem of every store the command opens (fsspec/s3fs: "
                                 "endpoint_url=..., anon=true, client_kwargs={...} as JSON); repeatable, never stored.")] = None,
) -> None:
    from actstore.remote import parse_storage_options, use_storage_options

    try:
        use_storage_options(parse_storage_options(storage_option or []))
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(USER_ERROR) from None
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()


@app.command()
@user_errors
def info(
    url: Annotated[str, typer.Argument(help="Store path or URL (s3://bucket/key, memory://...).")],
    as_json: JsonOpt = False,
) -> None:
    """Describe a store: model, dataset, hooks, tokens, dtype, codec, sizes and per-hook norms."""
    from pipelines.info import describe_store
    from pipelines.report import show, store_tables

    summary = describe_store(url)
    if as_json:
        _print_json(summary)
    else:
        show(store_tables(summary))


@app.command()
@user_errors
def harvest(
    model: Annotated[str, typer.Option(help="Alias (smollm2-135m, gemma-2-2b, gemma-2-9b, llama-3.2-1b, llama-3.1-8b), local folder or HF id.")],
    out: Annotated[str, typer.Option(help="Store path or URL (s3://bucket/prefix).")],
    layers: Annotated[str, typer.Option(help="Blocks to capture: 0-25, 3,7,11, mixes, or all.")] = "all",
    sites: Annotated[str, typer.Option(help="Comma list of resid_post, resid_pre, attn_out, mlp_in, mlp_out.")] = "resid_post",
    dataset: DatasetOpt = "builtin:python-docs",
    split: Annotated[str, typer.Option(help="Split of an HF dataset, or of the built-in corpus (train, test: every tenth docstring, all).")] = "train",
    text_column: Annotated[str, typer.Option(help="Column holding the text (rows with input_ids are used as token ids).")] = "text",
    tokens: Annotated[str, typer.Option(help="Tokens to store: 20000, 20k, 5M (rounded up to whole contexts).")] = "1M",
    context_size: Annotated[int, typer.Option(help="Tokens per context window.")] = 1024,
    batch_size: Annotated[int, typer.Option(help="Context windows per forward pass.")] = 8,
    bos: Annotated[bool, typer.Option("--bos/--no-bos", help="Put BOS at position 0 of every window.")] = True,
    seed: Annotated[int, typer.Option(help="Seed of the document order.")] = 0,
    dtype: Annotated[str, typer.Option(help="Storage dtype: bfloat16, float16, float32, float8_e4m3fn.")] = "bfloat16",
    codec: Annotated[str, typer.Option(help="zstd (byte-shuffled) or none.")] = "zstd",
    chunk_tokens: Annotated[int, typer.Option(help="Tokens per inner chunk (0: at least 1 MiB).")] = 0,
    shard_tokens: Annotated[int, typer.Option(help="Tokens per shard, the unit of commit (0: the store's, else about 64 MiB per hook).")] = 0,
    shards_in_flight: Annotated[int, typer.Option(help="Shards compressed and uploaded at once (0: one per 4 cores, 2 to 4); host memory holds about (this + 2) shards x hooks x 64 MiB.")] = 0,
    writer_threads: Annotated[int, typer.Option(help="Threads compressing shards (0: the cores this rank may use).")] = 0,
    revision: Annotated[str | None, typer.Option(help="HF revision of the model.")] = None,
    model_dtype: Annotated[str, typer.Option(help="auto (bf16 on CUDA and AVX512-BF16/AMX CPUs, else float32), float32, bfloat16, float16.")] = "auto",
    device: DeviceOpt = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace a store made with another configuration.")] = False,
    progress: ProgressOpt = True,
) -> None:
    """Run a model over text and store residual-stream activations; re-run the same command to resume."""
    from actstore.units import parse_count, parse_layers
    from pipelines.harvest import HarvestConfig
    from pipelines.harvest import harvest as run_harvest
    from pipelines.models import model_depth
    from pipelines.text import TextConfig

    _model_dtype(model_dtype)
    if codec not in ("zstd", "none"):
        raise ValueError(f"unknown --codec {codec!r}; choose zstd or none")
    n_layers = model_depth(model, revision) if layers.strip() == "all" else None
    cfg = HarvestConfig(
        model=model,
        out=out,
        layers=parse_layers(layers, n_layers),
        sites=tuple(s.strip() for s in sites.split(",") if s.strip()),
        text=TextConfig(dataset=dataset, split=split, text_column=text_column, context_size=context_size,
                        prepend_bos=bos, seed=seed),
        tokens=parse_count(tokens),
        batch_size=batch_size,
        dtype=dtype,  # type: ignore[arg-type]
        codec=codec,  # type: ignore[arg-type]
        chunk_tokens=chunk_tokens,
        shard_tokens=shard_tokens,
        shards_in_flight=shards_in_flight,
        writer_threads=writer_threads,
        revision=revision,
        model_dtype=model_dtype,  # type: ignore[arg-type]
        device=device,
        overwrite=overwrite,
        progress=progress,
    )
    with _exit_on_interrupt("interrupted; committed shards are kept: rerun the same command to resume"):
        result = run_harvest(cfg)
    typer.echo(
        f"{result.url}: {result.store_tokens:,} tokens committed"
        + (f" ({result.tokens_written:,} this run, {result.tokens_per_s:,.0f} tok/s)" if result.tokens_written else "")
    )


@app.command("train-sae")
@user_errors
def train_sae(
    store: StoreOpt,
    out: Annotated[str, typer.Option(help="Output folder (one SAELens folder per experiment).")],
    hook: Annotated[str | None, typer.Option(help="Hook to train on, e.g. blocks.12.hook_resid_post; a comma list trains Group-SAEs on those layers.")] = None,
    groups: Annotated[str | None, typer.Option(help="groups.json from actstore groups: one Group-SAE run per group (out/group<i>).")] = None,
    per_layer: Annotated[bool, typer.Option("--per-layer", help="With --groups: also train one SAE per member layer (same settings and tokens) and compare.")] = False,
    hook_in: Annotated[str | None, typer.Option(help="Transcoders: the hook they read, e.g. blocks.6.hook_mlp_in (with --hook-out).")] = None,
    hook_out: Annotated[str | None, typer.Option(help="Transcoders: the hook they reproduce, e.g. blocks.6.hook_mlp_out (with --hook-in).")] = None,
    tokens: Annotated[str, typer.Option(help="Training tokens: 500k, 5M...")] = "5M",
    arch: Annotated[str, typer.Option(help="Comma list of topk, batchtopk, matryoshka, relu, gated, jumprelu; with --hook-in/--hook-out: "
                                           "topk-transcoder, batchtopk-transcoder, jumprelu-transcoder and their -skip-transcoder forms; with --hook a,b,...: crosscoder.")] = "topk",
    k: Annotated[str, typer.Option(help="Comma list of k (topk, batchtopk, matryoshka, crosscoder and the transcoders).")] = "32",
    widths: Annotated[str | None, typer.Option(help="Matryoshka: comma list of nested level widths ending at d_sae (default d_sae/8, /4, /2, d_sae).")] = None,
    expansion: Annotated[str, typer.Option(help="Comma list of d_sae / d_in.")] = "8",
    lr: Annotated[str, typer.Option(help="Comma list of learning rates.")] = "2e-4",
    l1_coeff: Annotated[str | None, typer.Option(help="Comma list of L1 coefficients (relu, gated).")] = None,
    l0_coeff: Annotated[str | None, typer.Option(help="Comma list of L0 coefficients (jumprelu, jumprelu transcoders).")] = None,
    sweep: Annotated[str | None, typer.Option(help="JSON file: a list of experiments (replaces the comma lists).")] = None,
    batch_size: Annotated[int, typer.Option(help="Tokens per batch.")] = 4096,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints (0: only at the end); rerun to resume.")] = 500,
    eval_tokens: Annotated[str, typer.Option(help="Tokens held out (the store's last shards) for evaluation; 0 for none.")] = "64k",
    memory: Annotated[str, typer.Option(help="Shuffle memory of the stream, e.g. 2GiB.")] = "2GiB",
    min_position: Annotated[int, typer.Option(help="Drop tokens at positions below this (1 drops BOS).")] = 1,
    normalize: Annotated[bool, typer.Option("--normalize/--no-normalize", help="Scale to E||x||^2 = d_in (folded back on save).")] = True,
    seed: Annotated[int, typer.Option(help="Seed of the data order and initial weights.")] = 0,
    device: DeviceOpt = "auto",
    dtype: Annotated[str, typer.Option(help="SAE compute: float32, or bfloat16 (autocast matmuls; fp32 weights, optimiser, losses).")] = "float32",
    tf32: Annotated[bool, typer.Option("--tf32/--no-tf32", help="fp32 matmuls on CUDA through TF32 tensor cores.")] = True,
    as_json: Annotated[bool, json_flag("Print the summary as JSON.")] = False,
    progress: ProgressOpt = True,
    wandb: Annotated[str | None, typer.Option(help="Also log metrics to this Weights & Biases project (WANDB_MODE=offline works).")] = None,
    wandb_name: Annotated[str | None, typer.Option(help="W&B run name.")] = None,
    overwrite: OverwriteRunOpt = False,
) -> None:
    """Train SAEs on a store's activations, several configurations on each batch read once; rerun to resume.

    Data parallel: torchrun --nproc_per_node N $(which actstore) train-sae ... (each rank streams its own part)."""
    from actstore.units import parse_count, parse_list
    from pipelines.groups import read_groups
    from pipelines.report import show, train_table
    from pipelines.train import TrainSAEConfig, read_sweep, train_groups
    from pipelines.train import train_sae as run_train

    if (hook_in is None) != (hook_out is None):
        raise ValueError("transcoders need both --hook-in (what they read) and --hook-out (what they reproduce)")
    if hook_in is not None and (hook is not None or groups is not None):
        raise ValueError("give --hook-in and --hook-out for transcoders, or --hook / --groups for SAEs, not both")
    if hook_in is None and (hook is None) == (groups is None):
        raise ValueError("give --hook (one hook, or a comma list for one Group-SAE) or --groups groups.json, not both")
    layers = [h.strip() for h in (hook_in or hook).split(",") if h.strip()] if (hook_in or hook) else []
    archs = tuple(a.strip() for a in arch.split(",") if a.strip())
    sparsity: dict[str, tuple[float, ...]] = {}
    for name in archs:
        base = name.removesuffix("-skip-transcoder").removesuffix("-transcoder")
        if base in ("topk", "batchtopk", "matryoshka", "crosscoder"):
            sparsity[name] = parse_list(k, int)
        elif base in ("relu", "gated") and l1_coeff:
            sparsity[name] = parse_list(l1_coeff)
        elif base == "jumprelu" and l0_coeff:
            sparsity[name] = parse_list(l0_coeff)
    cfg = TrainSAEConfig(
        store=store, hook=layers[0] if layers else "", group=tuple(layers) if len(layers) > 1 else (), out=out,
        hook_out=hook_out.strip() if hook_out else None,
        tokens=parse_count(tokens), archs=archs, expansions=parse_list(expansion, int),
        lrs=parse_list(lr), sparsity=sparsity, matryoshka_widths=parse_list(widths, int) if widths else (), sweep=read_sweep(sweep) if sweep else (), batch_size=batch_size,
        seed=seed, memory=memory, normalize=normalize, min_position=min_position, checkpoint_every=checkpoint_every,
        eval_tokens=0 if eval_tokens.strip() == "0" else parse_count(eval_tokens), device=device, dtype=dtype, tf32=tf32,
        progress=progress and not as_json,
        wandb_project=wandb, wandb_name=wandb_name, overwrite=overwrite,
    )
    if per_layer:
        if not groups:
            raise ValueError("--per-layer compares Group-SAEs with per-layer SAEs; give --groups groups.json")
        from pipelines.group_eval import compare_groups
        from pipelines.report import comparison_tables

        comparison = compare_groups(cfg, read_groups(groups))
        if comparison.group_results[0].rank != 0:
            return
        if as_json:
            _print_json(comparison.summary())
            return
        show(comparison_tables(comparison))
        typer.echo(f"group SAEs in {out}/group<i>, per-layer SAEs in {out}/per_layer/<hook>")
        return
    with _exit_on_interrupt(RESUME_HINT):
        results = train_groups(cfg, read_groups(groups)) if groups else [run_train(cfg)]
    if results[0].rank != 0:  # under torchrun, rank 0 reports
        return
    named = [(f"group{i}/" if groups else "", r) for i, r in enumerate(results)]
    finished = all(r.finished_before for r in results)
    if as_json:
        _print_json({"out": out, "tokens_per_s": [r.tokens_per_s for r in results], "finished_before": finished,
                     "experiments": [{**row, "name": prefix + row["name"]} for prefix, r in named for row in r.rows]})
        return
    if finished:
        typer.echo(FINISHED.format(out=out))
    what = f"groups of {groups}" if groups else f"{layers[0]} -> {hook_out}" if hook_out else ", ".join(layers)
    show([train_table(named, what)])
    if not finished:
        typer.echo(f"SAEs (SAELens format), summary.json and plots in {out}")


@app.command()
@user_errors
def groups(
    store: StoreOpt,
    hooks: Annotated[str | None, typer.Option(help="Comma list of hooks to group (default: all of the store's).")] = None,
    tokens: Annotated[str, typer.Option(help="Tokens sampled to measure layer distances: 64k, 1M...")] = "64k",
    amad_threshold: Annotated[float, typer.Option(help="Choose the smallest G whose AMAD is at most this.")] = DEFAULT_AMAD_THRESHOLD,
    n_groups: Annotated[int | None, typer.Option("--groups", help="Use exactly this many groups instead.")] = None,
    out: Annotated[str, typer.Option(help="Folder for groups.json and groups_heatmap.png.")] = "groups",
    seed: Annotated[int, typer.Option(help="Seed of the token sample.")] = 0,
    device: DeviceOpt = "auto",
    as_json: Annotated[bool, json_flag("Print the result as JSON.")] = False,
) -> None:
    """Group similar layers for Group-SAEs: layer distances, AMAD for every G, the chosen groups (arXiv 2410.21508)."""
    from pathlib import Path

    from actstore.units import parse_count
    from pipelines.groups import GroupsConfig, find_groups, save
    from pipelines.report import groups_tables, show

    chosen_hooks = tuple(h.strip() for h in hooks.split(",") if h.strip()) if hooks else ()
    cfg = GroupsConfig(store=store, hooks=chosen_hooks, tokens=parse_count(tokens), amad_threshold=amad_threshold,
                       groups=n_groups, seed=seed, device=device)
    result = find_groups(cfg)
    json_path, png_path = save(result, Path(out))
    if as_json:
        _print_json(result.to_json())
        return
    show(groups_tables(result))
    typer.echo(f"groups in {json_path}, heatmap in {png_path}")


@app.command("eval")
@user_errors
def eval_saes(
    model: ModelOpt,
    sae: SaeOpt,
    adapter: Annotated[str | None, typer.Option(help="A LoRA adapter folder from actstore lora (on in the spliced pass).")] = None,
    dataset: DatasetOpt = "builtin:python-docs",
    split: Annotated[str, typer.Option(help="Held-out split (the built-in corpus' test split: docstrings harvests leave out).")] = "test",
    text_column: TextColumnOpt = "text",
    tokens: Annotated[str, typer.Option(help="Tokens evaluated: 32k, 1M...")] = "32k",
    context_size: ContextSizeOpt = 256,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 4,
    seed: Annotated[int, typer.Option(help="Seed of the document order.")] = 0,
    model_dtype: ModelDTypeOpt = "auto",
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Splice SAEs into the live model: CE clean and spliced, delta loss, loss recovered, KL, L0 and FVU."""
    from actstore.units import parse_count
    from pipelines.evaluate import EvalConfig, evaluate
    from pipelines.report import eval_tables, show
    from pipelines.text import TextConfig

    cfg = EvalConfig(model=model, saes=tuple(sae), adapter=adapter, tokens=parse_count(tokens), batch_size=batch_size,
                     text=TextConfig(dataset=dataset, split=split, text_column=text_column, context_size=context_size, seed=seed),
                     model_dtype=_model_dtype(model_dtype), device=device, progress=progress and not as_json)
    result = evaluate(cfg)
    if as_json:
        _print_json(result.to_json())
        return
    show(eval_tables(result, f"eval: {model}, {len(sae)} SAE(s)" + (f", adapter {adapter}" if adapter else "")))


@app.command()
@user_errors
def latents(
    out: Annotated[str, typer.Option(help="Output folder: one dashboard per SAE (open OUT/index.html), its data as JSON lines.")],
    store: Annotated[str | None, typer.Option(help="Store path or URL (not needed with --serve on a finished --out).")] = None,
    sae: Annotated[list[str] | None, typer.Option(help="An SAE, transcoder or crosscoder folder, a Gemma Scope params.npz, "
                                                      "or a Group-SAE run's folder (one dashboard per layer); repeatable.")] = None,
    tokens: Annotated[str, typer.Option(help="Tokens read from the start of the store: 1M, 50k... or all.")] = "all",
    top: Annotated[int, typer.Option(help="Top-activating examples kept per latent.")] = 20,
    samples: Annotated[int, typer.Option(help="Random activating examples kept per latent (shown at lower quantiles).")] = 24,
    before: Annotated[int, typer.Option(help="Context tokens shown before an example's token.")] = 10,
    after: Annotated[int, typer.Option(help="Context tokens shown after it.")] = 5,
    model: Annotated[str | None, typer.Option(help="The store's model (alias, folder or HF id): adds logit-lens tokens; "
                                                   "its tokenizer decodes the contexts.")] = None,
    logit_tokens: Annotated[int, typer.Option(help="Logit-lens tokens listed at each end.")] = 10,
    batch_tokens: Annotated[str, typer.Option(help="Tokens per batch (whole context windows).")] = "8192",
    min_position: Annotated[int | None, typer.Option(help="Skip tokens at lower positions (default: 1 when windows start with BOS).")] = None,
    shard_size: Annotated[int, typer.Option(help="Latents per output file.")] = 1024,
    checkpoint_every: Annotated[float, typer.Option(help="Seconds between checkpoints of the pass.")] = 60.0,
    device: DeviceOpt = "auto",
    overwrite: OverwriteRunOpt = False,
    serve: Annotated[bool, typer.Option("--serve", help="Serve OUT over HTTP afterwards (Ctrl-C stops).")] = False,
    port: Annotated[int, typer.Option(help="Port of --serve.")] = 8000,
    as_json: JsonOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """What each SAE latent responds to, from the store alone: statistics, top and random contexts, logit tokens, a static HTML dashboard."""
    from pathlib import Path

    from actstore.units import parse_count
    from pipelines.dashboard import serve as serve_folder
    from pipelines.latent_stats import StatsConfig
    from pipelines.latents import FINISHED_FILE, LatentsConfig, run_latents
    from pipelines.report import latents_table, show

    if store is None and not sae:
        if not serve:
            raise ValueError("give --store and --sae (or --serve to show a finished --out)")
        if not (Path(out) / FINISHED_FILE).is_file():
            raise FileNotFoundError(f"{out} holds no finished latents run to serve; run actstore latents --store S --sae DIR --out {out} first")
    else:
        if store is None or not sae:
            raise ValueError("give both --store and --sae")
        cfg = LatentsConfig(store=store, saes=tuple(sae), out=out, tokens=None if tokens == "all" else parse_count(tokens),
                            stats=StatsConfig(top=top, samples=samples, before=before, after=after), model=model,
                            logit_tokens=logit_tokens, batch_tokens=parse_count(batch_tokens), min_position=min_position,
                            shard_size=shard_size, checkpoint_every=checkpoint_every, device=device, overwrite=overwrite,
                            progress=progress and not as_json)
        with _exit_on_interrupt(RESUME_HINT):
            result = run_latents(cfg)
        if as_json:
            _print_json({"out": str(result.out), "tokens": result.tokens, "seconds": result.seconds,
                         "resumed_from": result.resumed_from, "views": result.views})
        else:
            if result.already_finished:
                typer.echo(f"the run in {out} is finished; nothing to do (its dashboards below; --overwrite starts it again)",
                           err=True)
            show([latents_table(result)])
    if serve:
        with contextlib.suppress(KeyboardInterrupt):
            serve_folder(Path(out), port)


@app.command()
@user_errors
def lora(
    model: ModelOpt,
    sae: SaeOpt,
    out: Annotated[str, typer.Option(help="Output folder: the peft adapter, lora.json, lora_curve.png.")],
    rank: Annotated[int, typer.Option(help="LoRA rank.")] = 64,
    alpha: Annotated[float, typer.Option(help="LoRA alpha (updates scaled by alpha / rank).")] = 32.0,
    layers: Annotated[str, typer.Option(help="Blocks to adapt: after (the blocks after the first SAE), all, or 10-29, 3,7,11.")] = "after",
    tokens: Annotated[str, typer.Option(help="Training tokens: 100k, 15M...")] = "1M",
    eval_tokens: Annotated[str, typer.Option(help="Held-out tokens measured before and after.")] = "32k",
    eval_at: Annotated[str | None, typer.Option(help="Comma list of training-token counts below --tokens (24k,48k) at which the held-out evaluation also runs; each equals a run with that --tokens.")] = None,
    dataset: DatasetOpt = "builtin:python-docs",
    split: Annotated[str, typer.Option(help="Training split.")] = "train",
    eval_split: Annotated[str, typer.Option(help="Held-out split (local files have none: their first windows are held out).")] = "test",
    text_column: TextColumnOpt = "text",
    context_size: ContextSizeOpt = 256,
    batch_size: Annotated[int, typer.Option(help="Windows per optimiser step.")] = 4,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 5e-5,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.0,
    grad_clip: Annotated[float, typer.Option(help="Gradient norm clip (0: none).")] = 1.0,
    dropout: Annotated[float, typer.Option(help="LoRA dropout.")] = 0.0,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints (0: none); rerun to resume.")] = 100,
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing", help="Recompute activations in the backward pass (less memory).")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the document order and the adapters' initial weights.")] = 0,
    model_dtype: ModelDTypeOpt = "auto",
    device: Annotated[str, typer.Option(help="auto (CUDA when present, bf16 autocast), cpu, cuda, cuda:N.")] = "auto",
    as_json: Annotated[bool, json_flag("Print the before/after figures as JSON.")] = False,
    progress: ProgressBarsOpt = True,
    overwrite: OverwriteRunOpt = False,
) -> None:
    """Finetune the model with LoRA around frozen SAEs (KL to the original model); report the CE gap closed (arXiv 2501.19406)."""
    from actstore.units import parse_count, parse_layers
    from pipelines.lora import LoRAConfig, train_lora
    from pipelines.models import model_depth
    from pipelines.report import before_after_table, layer_span, show
    from pipelines.text import TextConfig

    chosen = None if layers.strip() == "after" else parse_layers(layers, model_depth(model) if layers.strip() == "all" else None)
    try:
        budgets = tuple(parse_count(t) for t in eval_at.split(",") if t.strip()) if eval_at else ()
    except ValueError as e:
        raise ValueError(f"--eval-at {eval_at}: {e}") from None
    cfg = LoRAConfig(
        model=model, saes=tuple(sae), out=out, rank=rank, alpha=alpha, layers=chosen, tokens=parse_count(tokens),
        eval_tokens=parse_count(eval_tokens), eval_at=budgets, eval_split=eval_split, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
        grad_clip=grad_clip, dropout=dropout, checkpoint_every=checkpoint_every, gradient_checkpointing=gradient_checkpointing,
        text=TextConfig(dataset=dataset, split=split, text_column=text_column, context_size=context_size, seed=seed),
        seed=seed, model_dtype=_model_dtype(model_dtype), device=device, progress=progress and not as_json,
        overwrite=overwrite,
    )
    with _exit_on_interrupt(RESUME_HINT):
        result = train_lora(cfg)
    if as_json:
        _print_json({"out": out, "layers": list(result.layers), "steps": result.steps, "tokens": result.tokens,
                     "before": result.before.to_json(), "after": result.after.to_json(),
                     "ce_gap_closed": result.ce_gap_closed, "evals": [e.to_json() for e in result.evals],
                     "finished_before": result.finished_before})
        return
    if result.finished_before:
        typer.echo(FINISHED.format(out=out))
    show([before_after_table(result, f"lora: {model}, rank {rank}, blocks {layer_span(result.layers)}, {result.tokens:,} tokens")])
    typer.echo(f"CE gap closed: {result.ce_gap_closed:.1%}; adapter, lora.json and lora_curve.png in {out}")


@app.command()
@user_errors
def demo(
    out: Annotated[str, typer.Option(help="Folder for the store, groups, SAEs, adapter and plots (the store is reused on a rerun).")] = "runs/demo",
    tokens: Annotated[str, typer.Option(help="Tokens harvested.")] = "48k",
    lora_tokens: Annotated[str, typer.Option(help="LoRA training tokens.")] = "40k",
    progress: ProgressBarsOpt = True,
) -> None:
    """The whole pipeline offline on SmolLM2-135M: harvest, info, groups, train-sae, eval, lora (about 10 min on 2 cores)."""
    from actstore.units import parse_count
    from pipelines.demo import DemoConfig, run_demo
    from pipelines.report import demo_table

    console = Console()
    result = run_demo(DemoConfig(out=out, tokens=parse_count(tokens), lora_tokens=parse_count(lora_tokens), progress=progress), console)
    console.rule("[bold]summary")
    console.print(demo_table(result))
    typer.echo("plots: " + ", ".join(str(p) for p in result.pngs))


def _model_dtype(value: str) -> Any:
    if value not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"unknown --model-dtype {value!r}; choose auto, float32, bfloat16 or float16")
    return value


@app.command("import-sae")
@user_errors
def import_sae(
    params: Annotated[str, typer.Argument(help="A Gemma Scope params.npz file.")],
    out: Annotated[str, typer.Option(help="Output folder (SAELens format).")],
    model: Annotated[str, typer.Option(help="Model the SAE reads, e.g. gemma-2-2b.")] = "gemma-2-2b",
    hook: Annotated[str | None, typer.Option(help="Hook it reads (default: from the layer_N folder in the path).")] = None,
    context_size: Annotated[int, typer.Option(help="Context size it was trained with.")] = 1024,
) -> None:
    """Import a Gemma Scope SAE (params.npz) into an SAELens folder that lora and evaluation read."""
    from pipelines.saes import import_gemma_scope

    saved = import_gemma_scope(params, out, model, hook, context_size)
    typer.echo(f"JumpReLU SAE d_in {saved.sae.cfg.d_in}, d_sae {saved.sae.cfg.d_sae} reading {saved.hook} of {model} saved in {saved.source}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
