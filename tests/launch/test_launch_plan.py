"""``raypo plan``: architecture arithmetic against real model classes, model states against DeepSpeed's own
estimator, the memory terms' behaviour, and the command's output and exit codes."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re

import pytest
from launch_helpers import REPO

from raypo.cli import main
from raypo.config import ConfigError, load_config
from raypo.launch.catalog import KNOWN_MODELS, resolve_architecture
from raypo.launch.plan import (
    GIB,
    PlanInputs,
    activation_terms,
    gpu_total_bytes,
    head_terms,
    make_plan,
    zero3_host_bytes_per_node,
    zero3_model_states_bytes,
)
from raypo.model.shape import ModelShape

LLAMA_8B = KNOWN_MODELS["llama-3-8b"]
QWEN_32B = KNOWN_MODELS["qwen2.5-32b"]


def _hf_config(arch: ModelShape):
    from transformers import LlamaConfig, Qwen2Config

    cls = Qwen2Config if arch.attention_bias else LlamaConfig
    return cls(hidden_size=arch.hidden_size, num_hidden_layers=arch.num_layers,
               num_attention_heads=arch.num_heads, num_key_value_heads=arch.num_kv_heads,
               intermediate_size=arch.intermediate_size, vocab_size=arch.vocab_size,
               tie_word_embeddings=arch.tie_word_embeddings)


@pytest.mark.parametrize("name", ["llama-3-8b", "qwen2.5-32b", "llama-3.2-1b", "smollm2-135m"])
def test_parameter_counts_match_the_transformers_models(name):
    """Total and largest-layer parameters equal those of the real model classes (built on the meta device)."""
    import torch
    from transformers import AutoModelForCausalLM

    arch = KNOWN_MODELS[name]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_hf_config(arch))
    total = sum(p.numel() for p in model.parameters())  # parameters() counts a tied weight once
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())  # DeepSpeed's
    assert (arch.total_params, arch.largest_layer_params) == (total, largest)


def test_published_sizes():
    assert LLAMA_8B.total_params == 8_030_261_248 and LLAMA_8B.largest_layer_params == 128256 * 4096
    assert round(QWEN_32B.total_params / 1e9, 2) == 32.76 and QWEN_32B.largest_layer_params == 152064 * 5120


CASES = [(arch, gpus, nodes, opt, par)
         for arch in ("llama-3-8b", "qwen2.5-32b")
         for gpus, nodes in ((8, 1), (8, 2), (8, 4))
         for opt, par in ((False, False), (True, False), (True, True))]


@pytest.mark.parametrize("arch,gpus_per_node,nodes,offload_optimizer,offload_params", CASES)
def test_model_states_equal_deepspeeds_estimator(arch, gpus_per_node, nodes, offload_optimizer,
                                                 offload_params):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    a = KNOWN_MODELS[arch]
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        total_params=a.total_params, largest_layer_params=a.largest_layer_params,
        num_gpus_per_node=gpus_per_node, num_nodes=nodes, cpu_offload=offload_optimizer,
        cpu_offload_params=offload_params, zero_init=True, additional_buffer_factor=1.5)
    ours_gpu = zero3_model_states_bytes(a.total_params, a.largest_layer_params, gpus_per_node * nodes,
                                        offload_optimizer, offload_params)
    ours_cpu = zero3_host_bytes_per_node(a.total_params, a.largest_layer_params, gpus_per_node, nodes,
                                         offload_optimizer, offload_params)
    assert ours_gpu == pytest.approx(gpu, abs=1)  # DeepSpeed truncates to int bytes
    assert ours_cpu == pytest.approx(cpu, abs=1)


def _deepspeed_table(arch: ModelShape, gpus_per_node: int, nodes: int) -> dict[tuple[bool, bool], float]:
    """Per-GPU GiB from the table DeepSpeed's ..._all_cold estimator prints (zero_init=1 rows)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        estimate_zero3_model_states_mem_needs_all_cold(arch.total_params, arch.largest_layer_params,
                                                       num_gpus_per_node=gpus_per_node, num_nodes=nodes)
    rows = {}
    for line in buf.getvalue().splitlines():
        m = re.search(r"\|\s*([0-9.]+)GB \| offload_param=(\S+?),? offload_optimizer=(\S+?), zero_init=1",
                      line)
        if m:  # devices print as "none" or "OffloadDeviceEnum.cpu"
            rows[(m.group(3) != "none", m.group(2) != "none")] = float(m.group(1))
    assert len(rows) == 3, buf.getvalue()
    return rows


@pytest.mark.parametrize("arch,nodes,expected", [("llama-3-8b", 1, 18.78), ("qwen2.5-32b", 1, 71.56),
                                                 ("qwen2.5-32b", 2, 37.23)])
def test_plan_prints_deepspeeds_numbers(arch, nodes, expected):
    """The no-offload row of DeepSpeed's printed table is the plan's model-state line."""
    a = KNOWN_MODELS[arch]
    table = _deepspeed_table(a, 8, nodes)
    for (opt, par), gib in table.items():
        ours = zero3_model_states_bytes(a.total_params, a.largest_layer_params, 8 * nodes, opt, par) / GIB
        assert round(ours, 2) == gib
    assert table[(False, False)] == expected


def _setup(**changes) -> PlanInputs:
    base = PlanInputs(arch=LLAMA_8B, num_gpus=8, gpus_per_node=8, micro_batch=1, responses=4,
                 responses_per_forward=4, prompt_len=1024, response_len=1024, prefix_sharing=True,
                 checkpointing=True, offload_optimizer=False, offload_params=False, online_reference=True)
    return dataclasses.replace(base, **changes)


def test_activation_arithmetic():
    s = _setup()
    assert s.tokens == 1 * (1024 + 4 * 1024)
    assert _setup(prefix_sharing=False).tokens == 4 * (1024 + 1024)
    a = 8 * 4096 + 2 * (7 * 4096 + 3 * 1024 + 4 * 14336)
    assert activation_terms(s)[0].nbytes == s.tokens * (32 * 2 * 4096 + a)
    assert activation_terms(_setup(checkpointing=False))[0].nbytes == s.tokens * 32 * a
    # response chunks: memory of the chunk, not of N
    assert _setup(responses=16, responses_per_forward=4).tokens == s.tokens


def test_token_budget_bounds_the_tokens_per_forward():
    group = 1024 + 4 * 1024
    assert _setup(micro_batch=8, token_budget=3 * group).tokens == 3 * group  # the budget, not B groups
    assert _setup(micro_batch=8, token_budget=3 * group).response_tokens == 3 * 4 * 1024
    assert _setup(token_budget=100).tokens == group  # a group larger than the budget runs alone
    packed = gpu_total_bytes(_setup(micro_batch=8, token_budget=2 * group))
    assert packed < gpu_total_bytes(_setup(micro_batch=8))
    args = [str(REPO / "configs" / "quickstart.yaml"), "plan.model=llama-3-8b", "data.max_prompt_length=1024",
            "data.max_response_length=1024", "train.micro_batch_size=8", "train.token_budget=16384"]
    assert make_plan(load_config(args[0], args[1:])).inputs.tokens == 16384
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["plan", *args])
    assert "T = max(train.token_budget, one group) = max(16384, 5120) = 16384" in out.getvalue()


def test_memory_moves_the_right_way():
    base = gpu_total_bytes(_setup())
    assert gpu_total_bytes(_setup(checkpointing=False)) > base
    assert gpu_total_bytes(_setup(offload_optimizer=True)) < base
    assert gpu_total_bytes(_setup(offload_optimizer=True, offload_params=True)) < \
        gpu_total_bytes(_setup(offload_optimizer=True))
    assert gpu_total_bytes(_setup(online_reference=False)) < base
    assert gpu_total_bytes(_setup(num_gpus=16)) < base
    assert gpu_total_bytes(_setup(micro_batch=4)) > base
    assert gpu_total_bytes(_setup(lora_params=10_000_000)) < base


def test_log_prob_head_is_chunked():
    s = _setup()
    assert head_terms(s)[0].nbytes == 1024 * 128256 * 10 + 4 * 128256 * 4096
    # chunked: independent of the number of response tokens beyond one chunk
    assert head_terms(_setup(micro_batch=8))[0].nbytes == head_terms(s)[0].nbytes


def test_architecture_sources(tmp_path):
    cfg = load_config(None, ["model.path=meta-llama/Meta-Llama-3-8B-Instruct"])
    assert resolve_architecture(cfg)[0] == LLAMA_8B  # a known name in the path
    hf = {"model_type": "qwen2", "hidden_size": 5120, "num_hidden_layers": 64, "num_attention_heads": 40,
          "num_key_value_heads": 8, "intermediate_size": 27648, "vocab_size": 152064}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    arch, source = resolve_architecture(load_config(None, [f"model.path={tmp_path}"]))
    assert source.endswith("config.json") and arch.total_params == QWEN_32B.total_params
    assert ModelShape.from_hf_config(hf, "x").attention_bias
    custom = load_config(None, ["model.path=s3://b/my-model", "plan.hidden_size=1024", "plan.num_layers=4",
                                "plan.num_heads=8", "plan.num_kv_heads=8", "plan.intermediate_size=4096",
                                "plan.vocab_size=1000"])
    assert resolve_architecture(custom)[0].hidden_size == 1024
    tiny, source = resolve_architecture(load_config(REPO / "configs" / "quickstart.yaml"))
    assert tiny.hidden_size == 64 and "tiny" in source


def test_unknown_model_and_node_type_are_config_errors():
    with pytest.raises(ConfigError, match="did you mean 'qwen2.5-32b'"):
        make_plan(load_config(None, ["plan.model=qwen2.5-32"]))
    with pytest.raises(ConfigError, match="did you mean 'p4de.24xlarge'"):
        make_plan(load_config(None, ["plan.model=llama-3-8b", "plan.node_type=p4de.24xlarg"]))
    with pytest.raises(ConfigError, match="cannot tell the model's size"):
        make_plan(load_config(None, ["model.path=s3://bucket/some-model"]))


def test_plan_section_is_validated():
    with pytest.raises(ConfigError, match="plan.gpu_memory_gib=-1.0 must be > 0"):
        load_config(None, ["plan.gpu_memory_gib=-1"])
    with pytest.raises(ConfigError, match="unknown key 'plan.nodetype'.*did you mean 'node_type'"):
        load_config(None, ["plan.nodetype=p4de.24xlarge"])


def test_plan_command_fits(capsys):
    assert main(["plan", str(REPO / "configs" / "quickstart.yaml"), "plan.model=llama-3-8b",
                 "plan.node_type=p4de.24xlarge", "scaling.num_workers=8", "model.gradient_checkpointing=true",
                 "data.max_prompt_length=1024", "data.max_response_length=1024", "train.micro_batch_size=1",
                 "model.dtype=bfloat16"]) == 0
    out = capsys.readouterr().out
    for text in ("12 B x P / W", "= model states", "18.78", "-> FITS", "alternatives", "verdict: fits",
                 "T = B x (Lp + n x Lr) = 1 x (1024 + 4 x 1024) = 5120"):
        assert text in out, text


def test_plan_command_does_not_fit_exits_1(capsys):
    args = ["plan", str(REPO / "jobs" / "lipo_qwen32b.yaml"), "scaling.num_workers=8"]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "71.56" in out and "DOES NOT FIT" in out and "fixes:" in out
    assert main([*args, "deepspeed.offload_optimizer=true"]) == 0


def test_plan_without_a_cluster_gives_no_verdict(capsys):
    assert main(["plan", str(REPO / "configs" / "quickstart.yaml")]) == 0
    assert "no verdict" in capsys.readouterr().out


def test_the_log_prob_head_chunk_has_one_source():
    """The plan models the head with the chunk size the head uses: one constant, in a torch-free module."""
    from raypo.model import logprobs, shape

    assert logprobs.DEFAULT_HEAD_CHUNK_SIZE is shape.DEFAULT_HEAD_CHUNK_SIZE
    s = _setup()
    assert head_terms(s)[0].nbytes == shape.DEFAULT_HEAD_CHUNK_SIZE * 128256 * 10 + 4 * 128256 * 4096


def test_known_models_and_tiny_models_are_one_shape_type():
    from raypo.model.tiny import parse_tiny_spec

    assert all(isinstance(m, ModelShape) and m.name == name for name, m in KNOWN_MODELS.items())
    tiny, _ = resolve_architecture(load_config(None, ["model.path=tiny://llama?hidden=32&layers=3"]))
    assert dataclasses.replace(tiny, name="") == parse_tiny_spec("tiny://llama?hidden=32&layers=3").shape


def test_planning_code_does_not_import_torch():
    """The plan's modules, the model shapes and tiny:// URI parsing need no torch (a laptop without it)."""
    import subprocess
    import sys

    code = ("import sys, raypo.launch.plan, raypo.launch.plan_format, raypo.launch.catalog, raypo.cli.plan; "
            "from raypo.model.tiny import parse_tiny_spec; parse_tiny_spec('tiny://llama?hidden=32'); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
