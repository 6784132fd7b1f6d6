"""Bad input and faults as a new user meets them (issue 19): every case ends in exactly one
``error:`` line and exit code 2, with no traceback, and the store or run folder it touched is
byte-identical afterwards. Also: a crafted checkpoint never runs code, filters that leave
nothing fail at once instead of hanging, and the API's bad arguments are clear errors.

The CLI runs in this process (:func:`tests.helpers.run_cli_here`), not once per interpreter.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import pickle
import re
import shutil
import threading
from pathlib import Path

import pytest

import actstore
from actstore.remote import Location
from tests.helpers import assert_same_arrays, folder_bytes, make_config, make_data, write_shards
from tests.helpers import run_cli_here as run_cli
from trainers import checkpoint

HOOK = "blocks.0.hook_resid_post"


def assert_one_error_line(res, *fragments: str) -> str:
    """Exit code 2, exactly one line on stderr, starting ``error:``, holding ``fragments``."""
    assert res.exit_code == 2, (res.exit_code, res.stderr[-2000:], repr(res.exception))
    lines = res.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


class Pwned:
    """Unpickling this creates ``marker``: the proof that loading a file ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def craft_pickle(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"version": 2, "runs": Pwned(marker)}))


def make_store(path: Path) -> str:
    cfg = make_config(dtype="float32", n_tokens_target=8192, shard_tokens=1024, chunk_tokens=128)
    with actstore.open_store(str(path), "w", config=cfg) as w:
        write_shards(w, cfg, make_data(cfg), range(cfg.n_shards))
    return str(path)


def train_args(store: str, out: Path, *extra: object) -> list[object]:
    return ["train-sae", "--store", store, "--hook", HOOK, "--out", out, "--tokens", "1k", "--k", "4", "--expansion", "2",
            "--batch-size", "256", "--eval-tokens", "1k", "--no-progress", *extra]


@pytest.fixture(scope="module")
def w(tmp_path_factory, tiny_llama) -> dict[str, Path | str]:
    """Every artifact the cases touch, made once."""
    root = tmp_path_factory.mktemp("bad-inputs")
    p: dict[str, Path | str] = {"tmp": root, "model": tiny_llama}
    p["store"] = make_store(root / "store")
    p["store2"] = make_store(root / "store2")  # the same configuration, another store (another id)
    p["run"] = root / "run"
    res = run_cli(*train_args(str(p["store"]), p["run"]))
    assert res.exit_code == 0, res.stderr
    p["sae"] = next(d for d in Path(p["run"]).iterdir() if (d / "cfg.json").exists())

    p["pickled"] = root / "pickled"  # an old-style checkpoint that runs code when unpickled
    p["marker"] = root / "pwned"
    craft_pickle(root / "pickled" / "checkpoint.pt", root / "pwned")
    p["garbage_ckpt"] = root / "garbage-ckpt"
    (root / "garbage-ckpt" / "checkpoint").mkdir(parents=True)
    (root / "garbage-ckpt" / "checkpoint" / "state.json").write_text("not a checkpoint {")
    p["tampered"] = root / "tampered"  # the run's checkpoint with its tensor file damaged, not finished
    shutil.copytree(p["run"], p["tampered"])
    (Path(p["tampered"]) / "summary.json").unlink()
    tensors = next((Path(p["tampered"]) / "checkpoint").glob("tensors-*.safetensors"))
    data = bytearray(tensors.read_bytes())
    data[-5] ^= 0xFF
    tensors.write_bytes(bytes(data))
    p["odd_summary"] = root / "odd-summary"  # a finished-run file whose record is not an object
    (root / "odd-summary").mkdir()
    (root / "odd-summary" / "summary.json").write_text('{"run": 5, "experiments": []}')
    p["foreign"] = root / "foreign"
    (root / "foreign").mkdir()
    (root / "foreign" / "notes.txt").write_text("my notes\n")

    for name, change in (("garbage_sae", "weights"), ("bad_din", "d_in"), ("bad_cfg", "cfg")):
        shutil.copytree(p["sae"], root / name)
        p[name] = root / name
        if change == "weights":
            (root / name / "sae_weights.safetensors").write_bytes(b"garbage, not safetensors")
        elif change == "d_in":
            cfg = json.loads((root / name / "cfg.json").read_text())
            (root / name / "cfg.json").write_text(json.dumps({**cfg, "d_in": 32}))
        else:
            (root / name / "cfg.json").write_text("{ not json")

    (root / "empty.txt").write_text("")
    (root / "rows.jsonl").write_text('{"content": "hello"}\n')
    (root / "sweep.json").write_text(json.dumps([{"arch": "topk", "k": 4, "kk": 2}]))
    (root / "badsweep.json").write_text("[{")
    for name, doc in (("notstore", {"zarr_format": 3, "node_type": "group", "attributes": {}}), ("newer", None)):
        (root / name).mkdir()
        if doc is None:
            doc = json.loads((Path(p["store"]) / "zarr.json").read_text())
            doc["attributes"]["actstore"]["format_version"] = 99
        (root / name / "zarr.json").write_text(json.dumps(doc))
    (root / "garbage_zarr").mkdir()
    (root / "garbage_zarr" / "zarr.json").write_text("{{{")
    p["notstore"], p["newer"], p["garbage_zarr"] = root / "notstore", root / "newer", root / "garbage_zarr"

    p["harvested"] = root / "harvested"
    res = run_cli(*harvest_args(tiny_llama, p["harvested"]))
    assert res.exit_code == 0, res.stderr

    p["lora_pickled"] = root / "lora-pickled"
    craft_pickle(root / "lora-pickled" / "checkpoint" / "state.pt", root / "pwned")
    p["lora_other"] = root / "lora-other"  # a LoRA checkpoint of another run
    checkpoint.save(root / "lora-other" / "checkpoint", {"version": 1, "run": {"identity": {"settings": {"rank": 8}}}})
    return p


def harvest_args(model: object, out: object, *extra: object) -> list[object]:
    return ["harvest", "--model", model, "--out", out, "--layers", "0-1", "--tokens", "512", "--context-size", "64",
            "--batch-size", "2", "--chunk-tokens", "64", "--shard-tokens", "256", "--model-dtype", "float32",
            "--no-progress", *extra]


def lora_args(model: object, sae: object, out: object, *extra: object) -> list[object]:
    return ["lora", "--model", model, "--sae", sae, "--out", out, "--tokens", "256", "--eval-tokens", "64",
            "--context-size", "32", "--rank", "4", "--no-progress", *extra]


# Each case: (id, the command's arguments given the artifacts, fragments of the error line, the
# artifact it touches, which must be byte-identical afterwards).
CASES = [
    # info
    ("info-missing", lambda p: ["info", p["tmp"] / "nothing"], ["no store at"], "tmp"),
    ("info-not-a-store", lambda p: ["info", p["notstore"]], ["not an actstore store"], "notstore"),
    ("info-newer-format", lambda p: ["info", p["newer"]], ["newer than this actstore reads", "upgrade"], "newer"),
    ("info-garbage-zarr-json", lambda p: ["info", p["garbage_zarr"]], ["not valid JSON"], "garbage_zarr"),
    ("info-empty-url", lambda p: ["info", ""], ["needs a path or URL"], "tmp"),
    # harvest: each refused before a store is touched (and, where the store exists, before the weights load)
    ("harvest-unknown-model", lambda p: harvest_args("gemma-7z", p["tmp"] / "h1"), ["unknown model 'gemma-7z'"], "tmp"),
    ("harvest-layer-past-depth", lambda p: [*harvest_args(p["model"], p["tmp"] / "h2"), "--layers", "0-4"],
     ["layer 4 is past the model's depth", "4 layers (0-3)"], "tmp"),
    ("harvest-unknown-site", lambda p: [*harvest_args(p["model"], p["tmp"] / "h3"), "--sites", "resid_mid"], ["unknown site resid_mid"], "tmp"),
    ("harvest-bad-layers", lambda p: [*harvest_args(p["model"], p["tmp"] / "h4"), "--layers", "3-1"], ["cannot read layers"], "tmp"),
    ("harvest-bad-count", lambda p: [*harvest_args(p["model"], p["tmp"] / "h5"), "--tokens", "lots"], ["cannot read a count"], "tmp"),
    ("harvest-zero-tokens", lambda p: [*harvest_args(p["model"], p["tmp"] / "h6"), "--tokens", "0"], ["not a positive whole count"], "tmp"),
    ("harvest-unknown-codec", lambda p: [*harvest_args(p["model"], p["tmp"] / "h7"), "--codec", "lz4"], ["unknown --codec"], "tmp"),
    ("harvest-unknown-model-dtype", lambda p: [*harvest_args(p["model"], p["tmp"] / "h8"), "--model-dtype", "int8"],
     ["unknown --model-dtype"], "tmp"),
    ("harvest-unknown-dtype", lambda p: [*harvest_args(p["model"], p["tmp"] / "h9"), "--dtype", "float64"], ["unknown dtype"], "tmp"),
    ("harvest-cuda-missing", lambda p: [*harvest_args(p["model"], p["tmp"] / "h10"), "--device", "cuda"], ["no CUDA GPU"], "tmp"),
    ("harvest-tpu", lambda p: [*harvest_args(p["model"], p["tmp"] / "h11"), "--device", "tpu"], ["device 'tpu'"], "tmp"),
    ("harvest-empty-dataset", lambda p: [*harvest_args(p["model"], p["tmp"] / "h12"), "--dataset", p["tmp"] / "empty.txt"],
     ["yielded no tokens"], "tmp"),
    ("harvest-missing-column", lambda p: [*harvest_args(p["model"], p["tmp"] / "h13"), "--dataset", p["tmp"] / "rows.jsonl"],
     ["column 'text' not found", "--text-column"], "tmp"),
    ("harvest-another-configuration", lambda p: [*harvest_args(p["model"], p["harvested"]), "--context-size", "32"],
     ["another configuration", "context_size", "--overwrite"], "harvested"),
    ("harvest-target-below-committed", lambda p: [*harvest_args(p["model"], p["harvested"]), "--tokens", "256"],
     ["already holds committed tokens up to 512", "at least 512"], "harvested"),
    ("harvest-into-foreign-folder", lambda p: harvest_args(p["model"], p["foreign"]), ["holds files but no actstore store"], "foreign"),
    ("harvest-overwrite-foreign-folder", lambda p: [*harvest_args(p["model"], p["foreign"]), "--overwrite"],
     ["refusing to overwrite"], "foreign"),
    # train-sae
    ("train-missing-store", lambda p: train_args(str(p["tmp"] / "nothing"), p["tmp"] / "t0"), ["no store at"], "tmp"),
    ("train-unknown-hook", lambda p: [*train_args(p["store"], p["tmp"] / "t1"), "--hook", "blocks.9.hook_resid_post"], ["not in"], "store"),
    ("train-unknown-arch", lambda p: [*train_args(p["store"], p["tmp"] / "t2"), "--arch", "sparse-magic"], ["unknown --arch"], "store"),
    ("train-k-too-large", lambda p: [*train_args(p["store"], p["tmp"] / "t3"), "--k", "500"], ["k (500) must be between 1 and the SAE width"], "store"),
    ("train-sweep-unknown-key", lambda p: [*train_args(p["store"], p["tmp"] / "t4"), "--sweep", p["tmp"] / "sweep.json"],
     ["unknown setting"], "store"),
    ("train-sweep-missing", lambda p: [*train_args(p["store"], p["tmp"] / "t5"), "--sweep", p["tmp"] / "nope.json"],
     ["does not exist"], "store"),
    ("train-sweep-bad-json", lambda p: [*train_args(p["store"], p["tmp"] / "t6"), "--sweep", p["tmp"] / "badsweep.json"],
     ["not valid JSON"], "store"),
    ("train-bad-tokens", lambda p: [*train_args(p["store"], p["tmp"] / "t7"), "--tokens", "abc"], ["cannot read a count"], "store"),
    ("train-zero-batch", lambda p: [*train_args(p["store"], p["tmp"] / "t8"), "--batch-size", "0"], ["must be positive"], "store"),
    ("train-bad-memory", lambda p: [*train_args(p["store"], p["tmp"] / "t9"), "--memory", "lots"], ["as a size"], "store"),
    ("train-cuda-missing", lambda p: [*train_args(p["store"], p["tmp"] / "t10"), "--device", "cuda"], ["no CUDA GPU"], "store"),
    ("train-cuda0-missing", lambda p: [*train_args(p["store"], p["tmp"] / "t11"), "--device", "cuda:0"], ["no CUDA GPU"], "store"),
    ("train-tpu", lambda p: [*train_args(p["store"], p["tmp"] / "t12"), "--device", "tpu"], ["device 'tpu'"], "store"),
    ("train-filter-leaves-nothing", lambda p: [*train_args(p["store"], p["tmp"] / "t13"), "--min-position", "500", "--no-normalize"],
     ["min_position=500 leaves no tokens", "positions 0-15"], "store"),
    ("train-filter-leaves-nothing-normalized", lambda p: [*train_args(p["store"], p["tmp"] / "t14"), "--min-position", "16"],
     ["min_position=16 leaves no tokens"], "store"),
    ("train-hook-and-groups", lambda p: [*train_args(p["store"], p["tmp"] / "t15"), "--groups", p["tmp"] / "g.json"],
     ["not both"], "store"),
    ("train-per-layer-without-groups", lambda p: [*train_args(p["store"], p["tmp"] / "t16"), "--per-layer"], ["--groups"], "store"),
    ("train-another-store", lambda p: train_args(p["store2"], p["run"]), ["holds another run", "store.id", "--overwrite"], "run"),
    ("train-other-settings", lambda p: [*train_args(p["store"], p["run"]), "--seed", "1"], ["holds another run", "seed: 1 != 0"], "run"),
    ("train-other-experiments", lambda p: [*train_args(p["store"], p["run"]), "--k", "8"], ["holds another run", "experiments"], "run"),
    ("train-pickled-checkpoint", lambda p: train_args(p["store"], p["pickled"]), ["pickle format", "never loaded", "--overwrite"], "pickled"),
    ("train-garbage-checkpoint", lambda p: train_args(p["store"], p["garbage_ckpt"]), ["is damaged", "--overwrite"], "garbage_ckpt"),
    ("train-tampered-checkpoint", lambda p: train_args(p["store"], p["tampered"]), ["SHA-256"], "tampered"),
    ("train-odd-summary", lambda p: train_args(p["store"], p["odd_summary"]), ["without a recorded identity"], "odd_summary"),
    ("train-foreign-folder", lambda p: train_args(p["store"], p["foreign"]), ["holds files but no train-sae run"], "foreign"),
    ("train-overwrite-foreign-folder", lambda p: [*train_args(p["store"], p["foreign"]), "--overwrite"], ["refusing to delete"], "foreign"),
    # eval and import-sae
    ("eval-missing-sae", lambda p: ["eval", "--model", p["model"], "--sae", p["tmp"] / "nope", "--tokens", "64"], ["does not exist"], "tmp"),
    ("eval-garbage-weights", lambda p: ["eval", "--model", p["model"], "--sae", p["garbage_sae"], "--tokens", "64"],
     ["not a readable safetensors file"], "garbage_sae"),
    ("eval-d-in-disagrees", lambda p: ["eval", "--model", p["model"], "--sae", p["bad_din"], "--tokens", "64"],
     ["the config and the weights disagree"], "bad_din"),
    ("eval-garbage-cfg", lambda p: ["eval", "--model", p["model"], "--sae", p["bad_cfg"], "--tokens", "64"], ["not valid JSON"], "bad_cfg"),
    ("import-missing-file", lambda p: ["import-sae", p["tmp"] / "nope.npz", "--out", p["tmp"] / "i0"], ["does not exist"], "tmp"),
    # lora: refused before the model loads
    ("lora-pickled-checkpoint", lambda p: lora_args(p["model"], p["sae"], p["lora_pickled"]), ["pickle format", "never loaded"],
     "lora_pickled"),
    ("lora-another-run", lambda p: lora_args(p["model"], p["sae"], p["lora_other"]), ["holds another run", "--overwrite"], "lora_other"),
    ("lora-rank-zero", lambda p: [*lora_args(p["model"], p["sae"], p["tmp"] / "l0"), "--rank", "0"], ["--rank must be at least 1"], "tmp"),
    ("lora-missing-sae", lambda p: lora_args(p["model"], p["tmp"] / "nope", p["tmp"] / "l1"), ["does not exist"], "tmp"),
]


@pytest.mark.parametrize("name, args, fragments, touched", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line_and_touches_nothing(w, name, args, fragments, touched):
    before = folder_bytes(w[touched])
    assert_one_error_line(run_cli(*args(w)), *fragments)
    assert folder_bytes(w[touched]) == before
    assert not Path(w["marker"]).exists()


def test_the_table_is_large_enough():
    assert len(CASES) >= 40


def test_a_crafted_checkpoint_never_runs_code(tmp_path, w):
    marker = tmp_path / "pwned"
    for out, args in ((tmp_path / "train", train_args(w["store"], tmp_path / "train")),
                      (tmp_path / "lora", lora_args(w["model"], w["sae"], tmp_path / "lora"))):
        for name in ("checkpoint.pt", "checkpoint/state.pt"):
            craft_pickle(out / name, marker)
        pickle.loads((out / "checkpoint.pt").read_bytes())  # the proof of concept: unpickling it runs its code
        assert marker.exists()
        marker.unlink()
        assert_one_error_line(run_cli(*args), "pickle format")
        assert not marker.exists(), "loading the run folder ran the crafted file's code"
    # and nothing in the code base unpickles: checkpoints are safetensors + JSON
    top = Path(__file__).resolve().parents[1]
    for folder in ("actstore", "trainers", "pipelines"):
        for path in (top / folder).rglob("*.py"):
            text = path.read_text()
            assert "torch.load(" not in text and "pickle.load" not in text, path


def test_a_full_disk_is_one_line_and_the_harvest_resumes_bit_identically(tmp_path, w, monkeypatch):
    out = tmp_path / "s"
    real_open, refused = builtins.open, []

    def full_at_the_third_shard(file, mode="r", *args, **kwargs):
        """The disk fills up when the harvest writes shard 2's objects (zarr v3 keys
        ``<array>/c/2`` then ``/0`` per further dimension) into ``out``."""
        if "w" in mode and str(file).startswith(str(out)) and re.search(r"/c/2(/0)*$", str(file)):
            refused.append(str(file))
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return real_open(file, mode, *args, **kwargs)

    args = [*harvest_args(w["model"], out), "--tokens", "1024"]
    with monkeypatch.context() as m:
        m.setattr(builtins, "open", full_at_the_third_shard)
        m.setattr(io, "open", full_at_the_third_shard)  # pathlib's writes
        assert_one_error_line(run_cli(*args), "No space left on device", "free some space", "resume")
    assert refused, "the harvest wrote no shard object through open(): fault injection missed"
    store = actstore.open_store(str(out))
    assert store.committed_shards == [0, 1]
    assert json.loads((out / "zarr.json").read_text())["attributes"]["actstore"]["n_tokens"] == 512
    assert run_cli(*args).exit_code == 0
    assert run_cli(*[*harvest_args(w["model"], tmp_path / "ref"), "--tokens", "1024"]).exit_code == 0

    assert_same_arrays(out, tmp_path / "ref")


def test_a_read_only_location_is_one_line(tmp_path, w, monkeypatch):
    def read_only(self, key, data):
        raise OSError(errno.EROFS, "Read-only file system", self.path(key))

    monkeypatch.setattr(Location, "write_bytes_atomic", read_only)
    assert_one_error_line(run_cli(*harvest_args(w["model"], tmp_path / "ro")), "Read-only file system", "writable")
    monkeypatch.undo()

    def read_only_save(folder, state):
        raise OSError(errno.EROFS, "Read-only file system", str(folder))

    monkeypatch.setattr(checkpoint, "save", read_only_save)
    assert_one_error_line(run_cli(*train_args(w["store"], tmp_path / "ro-run")), "Read-only file system", "writable")


# ---- the API: clear errors, no hang ------------------------------------------------------------
@pytest.mark.parametrize("call, match", [
    (lambda s: actstore.stream(s, HOOK, batch_size=1.5), "batch_size must be a whole number"),
    (lambda s: actstore.stream(s, HOOK, batch_size=True), "batch_size must be a whole number"),
    (lambda s: actstore.stream(s, HOOK, 64, device="cuda"), "no CUDA GPU"),
    (lambda s: actstore.stream(s, HOOK, 64, device="tpu"), "device 'tpu'"),
    (lambda s: actstore.stream(s, HOOK, 64, epochs=2.5), "epochs must be a whole number"),
    (lambda s: actstore.stream(None, HOOK, 64), "give an open Store or its path"),
    (lambda s: actstore.open_store(None), "needs a path or URL"),
    (lambda s: actstore.open_store(""), "needs a path or URL"),
    (lambda s: actstore.open_store("  "), "needs a path or URL"),
])
def test_api_bad_arguments_are_clear_errors(w, call, match):
    with pytest.raises(ValueError, match=match):
        call(w["store"])


def test_api_accepts_a_path_object(w):
    assert actstore.open_store(Path(w["store"])).n_tokens == 8192


def first_batch_or_error(make_stream) -> BaseException | None:
    """The error an endless stream raises before its first batch, waiting at most a minute (a
    stream that hangs fails the test instead of the suite)."""
    outcome: list[BaseException | None] = []

    def consume() -> None:
        try:
            next(iter(make_stream()))
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    thread.join(60)
    assert outcome, "the stream hung"
    return outcome[0]


def test_filters_that_leave_nothing_fail_at_once_instead_of_hanging(w):
    with pytest.raises(actstore.EmptyStreamError, match="min_position=999 leaves no tokens"):
        actstore.stream(w["store"], HOOK, 64, epochs=None, min_position=999)
    with pytest.raises(actstore.EmptyStreamError, match="min_position=16 leaves no tokens"):
        actstore.stream(w["store"], HOOK, 64, epochs=None, min_position=16, normalize="expected_norm")
    every_id = list(range(50_000))  # the synthetic store's token ids are below 50,000
    error = first_batch_or_error(lambda: actstore.stream(w["store"], HOOK, 64, epochs=None, drop_token_ids=every_id))
    assert isinstance(error, actstore.EmptyStreamError) and "drop_token_ids=[0, 1," in str(error) and "keep none" in str(error)
    error = first_batch_or_error(lambda: actstore.stream(w["store"], HOOK, 64, epochs=1, drop_token_ids=every_id))
    assert isinstance(error, actstore.EmptyStreamError)
    with pytest.raises(actstore.EmptyStreamError, match="keep none of the .* tokens sampled"):
        actstore.stream(w["store"], HOOK, 64, drop_token_ids=every_id, normalize="expected_norm")


def test_no_error_line_leaks_a_secret(tmp_path, w, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-key-123")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key-id-456")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    line = assert_one_error_line(run_cli("info", "s3://bucket/store"), "cannot read s3://bucket/store")
    assert "very-secret-key-123" not in line and "key-id-456" not in line
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == "very-secret-key-123"
