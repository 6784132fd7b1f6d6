"""Load SAEs to splice into a live model, from any of the places researchers keep them.

An SAE spec (``--sae``) is one of

- a folder in SAELens' format (``cfg.json`` + ``sae_weights.safetensors``): what ``actstore
  train-sae`` writes and what SAELens' ``SAE.save_model`` writes (``SAE.load_from_disk`` reads
  the same folders), read by :func:`trainers.saelens_format.load_saelens`; a transcoder's folder
  (SAELens' transcoder format) names the hook it writes as ``metadata.hook_name_out``;
- a Gemma Scope ``params.npz`` (or a folder holding one), the hook read from the release's
  ``layer_N`` folder name (:mod:`trainers.gemma_scope`);
- ``saelens:<release>/<sae_id>``: a released SAE fetched by SAELens' ``SAE.from_pretrained``
  (needs the hub), written to a temporary SAELens folder and read as above.

:func:`check_saes` then checks them against the model: the hook exists in the model, the SAE's
``d_in`` is the hook's width (a transcoder's ``d_out`` its output hook's), and no two SAEs
write the same hook.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

from trainers import SAE
from trainers.crosscoder import WEIGHTS_FILE as CROSSCODER_WEIGHTS
from trainers.crosscoder import is_crosscoder_folder, load_crosscoder
from trainers.gemma_scope import hook_from_path, load_gemma_scope
from trainers.saelens_format import CONFIG_FILE, WEIGHTS_FILE, HookInfo, load_saelens, save_saelens

from .capture import SITES, HookPoint

SAELENS_PREFIX = "saelens:"
SPEC_HELP = "an SAE folder (cfg.json + sae_weights.safetensors), a Gemma Scope params.npz, or saelens:<release>/<sae_id>"


@dataclass(frozen=True)
class LoadedSAE:
    """An SAE and where it reads."""

    sae: SAE
    hook: str
    """TransformerLens-style hook name, e.g. ``blocks.12.hook_resid_post``: where it reads."""
    source: str
    """The spec it was loaded from."""
    hook_out: str | None = None
    """Where a transcoder writes (its output replaces that activation); None for an SAE."""
    layers: tuple[str, ...] = ()
    """A crosscoder's hooks, in the order of its layer axis (it reads and writes all of them); ``hook`` is the first."""

    @property
    def point(self) -> HookPoint:
        return HookPoint.parse(self.hook)

    @property
    def writes(self) -> tuple[str, ...]:
        """The hooks whose activations this SAE replaces."""
        return self.layers or (self.hook_out or self.hook,)

    @property
    def label(self) -> str:
        """``hook`` for an SAE, ``hook -> hook_out`` for a transcoder (report rows)."""
        return f"{self.hook} -> {self.hook_out}" if self.hook_out else self.hook

    def layer_label(self, hook: str) -> str:
        """A crosscoder's report row for one of its layers."""
        return f"{hook} (crosscoder of {len(self.layers)})"


def _from_pretrained(spec: str) -> LoadedSAE:
    release, _, sae_id = spec.removeprefix(SAELENS_PREFIX).partition("/")
    if not release or not sae_id:
        raise ValueError(f"{spec!r}: write saelens:<release>/<sae_id>, e.g. saelens:gemma-scope-2b-pt-res-canonical/layer_12/width_16k/canonical")
    try:
        from sae_lens import SAE as SAELensSAE
    except ImportError as e:
        raise ValueError(f"{spec!r} needs SAELens: pip install sae-lens") from e
    try:
        released = SAELensSAE.from_pretrained(release, sae_id, device="cpu")
    except Exception as e:  # hub offline, unknown release or id: SAELens and the hub raise their own types
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"cannot fetch {spec!r} with SAELens: {first_line}") from e
    released = released[0] if isinstance(released, tuple) else released
    with tempfile.TemporaryDirectory(prefix="actstore-sae-") as tmp:
        released.save_model(tmp)
        sae, info = load_saelens(tmp)
    return LoadedSAE(sae, info.hook_name, spec)


def load_sae(spec: str) -> LoadedSAE:
    """The SAE named by ``spec`` (see the module docstring)."""
    if spec.startswith(SAELENS_PREFIX):
        return _from_pretrained(spec)
    path = Path(spec).expanduser()
    if path.is_dir() and not (path / CONFIG_FILE).exists() and (path / "params.npz").is_file():
        path = path / "params.npz"
    if path.is_file() and path.suffix == ".npz":
        hook = hook_from_path(path)
        if hook is None:
            raise ValueError(f"cannot tell the hook of {path} (no layer_N folder in its path); "
                             "import it first: actstore import-sae PARAMS --hook blocks.N.hook_resid_post --out DIR")
        return LoadedSAE(load_gemma_scope(path), hook, spec)
    if path.is_dir() and is_crosscoder_folder(path):
        sae, hooks, _ = load_crosscoder(path)
        try:
            first = min(hooks, key=lambda h: (HookPoint.parse(h).layer, SITES.index(HookPoint.parse(h).site)))
        except ValueError as e:
            raise ValueError(f"crosscoder {spec} reads a hook actstore cannot splice: {e}") from None
        return LoadedSAE(sae, first, spec, layers=tuple(hooks))
    if path.is_dir():
        try:
            sae, info = load_saelens(path)
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}/{CONFIG_FILE} is not an SAELens config (missing or bad field {e})") from None
        return LoadedSAE(sae, info.hook_name, spec, info.hook_name_out)
    raise FileNotFoundError(f"SAE {spec} does not exist; give {SPEC_HELP}")


def import_gemma_scope(params: str, out: str, model: str, hook: str | None = None, context_size: int = 1024) -> LoadedSAE:
    """``actstore import-sae``: the Gemma Scope ``params`` saved as an SAELens folder ``out`` (new
    or empty) that reads ``hook`` (default: from the ``layer_N`` folder in the path) of ``model``;
    the result's ``source`` is that folder."""
    if not Path(params).is_file():
        raise FileNotFoundError(f"{params} does not exist; give the path of a Gemma Scope params.npz file")
    hook = hook or hook_from_path(params)
    if hook is None:
        raise ValueError(f"cannot tell the hook from {params} (no layer_N folder); pass --hook blocks.N.hook_resid_post")
    target = Path(out)
    if target.exists() and any(target.iterdir()):
        raise ValueError(f"output folder {target} is not empty; choose a new folder")
    sae = load_gemma_scope(params)
    save_saelens(sae, target, HookInfo(hook, model, context_size, True), extra={"imported_from": str(params)})
    return LoadedSAE(sae, hook, str(target))


def fingerprint(spec: str) -> str:
    """A SHA-256 over the files ``spec`` loads (``cfg.json`` and the weights, or ``params.npz``),
    so a run can tell an SAE retrained in place from the one it started with; a released SAE
    fetched by name is its name."""
    if spec.startswith(SAELENS_PREFIX):
        return spec
    path = Path(spec).expanduser()
    names = (CONFIG_FILE, WEIGHTS_FILE, CROSSCODER_WEIGHTS, "params.npz")
    if not path.exists():
        raise FileNotFoundError(f"SAE {spec} does not exist; give {SPEC_HELP}")
    files = sorted(p for p in path.iterdir() if p.name in names and p.is_file()) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"{path} is not an SAE folder: it needs {CONFIG_FILE} and {WEIGHTS_FILE}, or a params.npz")
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0")
        with open(f, "rb") as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


def check_saes(saes: list[LoadedSAE], n_layers: int, d_model: int, model_name: str) -> None:
    """Every SAE reads a hook ``model_name`` has, at the hook's width, and hooks are distinct."""
    if not saes:
        raise ValueError(f"no SAE given; pass --sae with {SPEC_HELP}")
    seen: dict[str, str] = {}
    for s in saes:
        ends = [("reads", s.hook, s.sae.cfg.d_in, "d_in")]
        if s.layers:  # a crosscoder reads and writes each of its layers, one layer's width each
            ends = [("reads", h, s.sae.cfg.d_layer, "d_in") for h in s.layers]
        if s.hook_out:
            ends.append(("writes", s.hook_out, getattr(s.sae.cfg, "width_out", s.sae.cfg.d_in), "d_out"))
        for verb, hook, width, name in ends:
            try:
                point = HookPoint.parse(hook)
            except ValueError as e:
                raise ValueError(f"SAE {s.source} {verb} {hook!r}, a hook actstore cannot splice: {e}") from None
            if point.layer >= n_layers:
                raise ValueError(f"SAE {s.source} {verb} {hook}, but {model_name} has {n_layers} layers (0-{n_layers - 1}); "
                                 "is this SAE for another model?")
            if width != d_model:
                raise ValueError(f"SAE {s.source} has {name} {width}, but {hook} of {model_name} is {d_model} wide; "
                                 "is this SAE for another model?")
        for hook in s.writes:
            if hook in seen:
                raise ValueError(f"SAEs {seen[hook]} and {s.source} both replace {hook}; splice one SAE per hook")
            seen[hook] = s.source
