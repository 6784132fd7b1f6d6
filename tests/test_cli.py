"""``actstore info``: the table, the JSON, and one-line errors with exit code 2."""

from __future__ import annotations

import json

import actstore
from tests.helpers import make_config, make_data, write_shards
from tests.helpers import run_cli_process as run_cli


def make_store(path):
    cfg = make_config()
    with actstore.open_store(str(path), "a", config=cfg) as w:
        write_shards(w, cfg, make_data(cfg), [0, 1])
    return cfg


def test_info_table(tmp_path):
    make_store(tmp_path / "s")
    out = run_cli("info", str(tmp_path / "s"))
    assert out.returncode == 0, out.stderr
    for text in ("tiny-llama", "synthetic", "512 committed of 1,000", "bfloat16", "zstd-1", "blocks.1.hook_mlp_out", "compression"):
        assert text in out.stdout


def test_info_json(tmp_path):
    make_store(tmp_path / "s")
    out = run_cli("info", str(tmp_path / "s"), "--json")
    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout)
    assert s["n_tokens"] == 512 and s["n_tokens_target"] == 1000 and s["model"]["d_model"] == 48
    assert s["compression_ratio"] > 1.0 and s["hooks"]["blocks.0.hook_resid_post"]["count"] == 512


def test_info_errors_are_one_line_exit_2(tmp_path):
    out = run_cli("info", str(tmp_path / "missing"))
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: no store at")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    out = run_cli("info", str(tmp_path / "other"))
    assert out.returncode == 2 and "not an actstore store" in out.stderr and "Traceback" not in out.stderr


def test_storage_options_reach_the_store_every_command_opens(s3_server, unique, monkeypatch):
    from actstore.remote import use_storage_options
    from tests.helpers import free_port, run_cli_here

    cfg = make_config()
    data = make_data(cfg)
    url = f"s3://actstore-test/options-{unique}"
    with actstore.open_store(url, "a", config=cfg) as w:
        write_shards(w, cfg, data, w.pending_shards())
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")  # the endpoint now comes only from --storage-option
    try:
        found = run_cli_here("--storage-option", f"endpoint_url={s3_server}", "--storage-option", "skip_instance_cache=true",
                             "info", url, "--json")
        assert found.exit_code == 0, found.output
        assert json.loads(found.stdout)["n_tokens"] == 1000
        closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there: the option is what the filesystem used
        missed = run_cli_here("--storage-option", f"endpoint_url={closed}", "--storage-option",
                              'config_kwargs={"retries": {"max_attempts": 1}}', "info", url)
        assert missed.exit_code == 2 and closed in missed.output and len(missed.output.strip().splitlines()) == 1, missed.output
    finally:
        use_storage_options({})
    bad = run_cli_here("--storage-option", "endpoint_url", "info", url)
    assert bad.exit_code == 2 and "--storage-option 'endpoint_url' is not key=value" in bad.output
