"""On-policy alignment data on a real model, end to end: SmolLM2-135M-Instruct (the smollm2 extra) ->
``raypo data tasks`` -> ``raypo data generate`` -> ``raypo data score`` -> ``raypo train`` with LoRA on
ZeRO-3 (CPU, gloo) for 2 steps -> ``raypo eval RUN --generate`` against the reference on held-out prompts.
Skipped when the extra is not installed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from raypo.cli.main import main
from raypo.data.tasks import DIMENSIONS

pytestmark = pytest.mark.e2e
MODEL = "smollm2://135m-instruct"


def _extra_missing() -> str:
    from raypo.model.gguf_source import shipped_gguf_path

    try:
        import gguf  # noqa: F401

        shipped_gguf_path(MODEL)
    except (ImportError, ValueError) as err:
        return f"the smollm2 extra is not installed ({err})"
    return ""


@pytest.mark.skipif(bool(_extra_missing()), reason=_extra_missing() or "n/a")
def test_generate_score_and_train_smollm2(ray_cluster, tmp_path, capsys) -> None:
    from raypo.model.loading import load_tokenizer, resolve_model_source

    model_dir = Path(resolve_model_source(MODEL))  # converted once into the cache (~15 s), then reused
    assert (model_dir / "model.safetensors").is_file() and (model_dir / ".raypo-complete").is_file()
    assert resolve_model_source(MODEL) == str(model_dir)
    assert "<|im_start|>" in load_tokenizer(MODEL).apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)

    prompts = tmp_path / "prompts.jsonl"
    assert main(["data", "tasks", "--out", str(prompts), "--num-prompts", "4", "--num-heldout", "2"]) == 0
    gen, scored = tmp_path / "gen.parquet", tmp_path / "scored.parquet"
    assert main(["data", "generate", "--model", MODEL, "--prompts", str(prompts), "--out", str(gen),
                 "--num-responses", "2", "--max-new-tokens", "8", "--batch-size", "4"]) == 0
    assert main(["data", "score", str(gen), "--out", str(scored)]) == 0
    table = pq.read_table(scored)
    scores = table.column("scores").to_pylist()
    assert table.num_rows == 4 and all(len(s) == 2 and len(s[0]) == 4 for s in scores)

    config = tmp_path / "smollm2.yaml"
    config.write_text("deepspeed:\n  zero_stage: 3\nscaling:\n  num_workers: 1\n  use_gpu: false\n")
    storage = tmp_path / "runs"
    code = main(["train", str(config), f"model.path={MODEL}", "model.dtype=float32",
                 "model.lora.enabled=true", "model.lora.r=4", f"data.train_path={scored}",
                 "data.eval_fraction=0.0",
                 "data.max_prompt_length=64", "data.max_response_length=8", "loss.name=lambda_dpo",
                 "optimizer.warmup_steps=0", "optimizer.lr=1e-3", "train.micro_batch_size=2",
                 "train.max_steps=2", "train.epochs=1", "logging.tensorboard=false",
                 f"checkpoint.storage_path={storage}", "checkpoint.run_name=smol",
                 "checkpoint.every_steps=2"])
    assert code == 0
    out = capsys.readouterr().out
    loss = float(out.split("train/loss:")[1].split()[0])
    assert loss == loss and loss > 0  # finite, a real DPO-style loss
    assert os.path.isdir(storage / "smol" / "step_00000002")
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == "llama"

    capsys.readouterr()  # the run directory -> its checkpoint, exported once; generations vs the reference
    heldout = tmp_path / "prompts.heldout.jsonl"
    assert main(["eval", str(storage / "smol"), "--generate", "--prompts", str(heldout), "--local",
                 "--max-new-tokens", "8", "--json"]) == 0
    gen = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["generation"]
    assert gen["num_prompts"] == 2 and gen["reference"]["source"]
    [result] = gen["results"]
    assert list(result["win_rate"]) == list(DIMENSIONS)
    assert all(0.0 <= v <= 1.0 for v in result["win_rate"].values()) and result["mean_words"] > 0
