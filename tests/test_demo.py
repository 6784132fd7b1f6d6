"""``actstore demo``'s stages end to end on a tiny random Llama (the real demo runs SmolLM2 in
``make demo``): every stage runs, the summary names each, and the four plots are written."""

from __future__ import annotations

import pytest
from rich.console import Console

from pipelines.demo import DemoConfig, run_demo
from pipelines.report import demo_table


@pytest.mark.slow
def test_demo_runs_every_stage(tmp_path, tiny_llama):
    cfg = DemoConfig(out=str(tmp_path / "demo"), model=str(tiny_llama), layers=(0, 1, 2, 3), sae_layer=1, context_size=32,
                     chunk_tokens=64, shard_tokens=512, tokens=4096, sae_tokens=8192, sae_batch_size=256, eval_tokens=256, lora_tokens=512,
                     progress=False)
    console = Console(record=True, width=150)
    result = run_demo(cfg, console)
    assert [name for name, _, _ in result.stages] == ["harvest", "info", "groups", "train-sae", "eval", "lora", "latents"]
    assert set(result.evals) == {"topk", "jumprelu"} and result.lora.steps == 4
    assert [p.name for p in result.pngs] == ["groups_heatmap.png", "training_curves.png", "l0_vs_fvu.png", "lora_curve.png"]
    console.print(demo_table(result))
    text = console.export_text()
    for stage in ("1/7 harvest", "3/7 groups", "6/7 lora", "7/7 latents", "CE gap closed", "loss recovered"):
        assert stage in text
    latents = tmp_path / "demo" / "latents"
    assert (latents / "index.html").is_file() and len(list(latents.glob("topk*/latents-*.jsonl"))) == 1
    assert '"logits"' in next(latents.glob("topk*/latents-00000.jsonl")).read_text()
    again = run_demo(cfg, Console(record=True, width=150))  # a rerun reuses the store and replaces the rest
    assert again.stages[0][2].startswith("4,096 tokens") and again.lora.steps == 4
