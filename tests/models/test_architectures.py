"""Every causal-LM architecture a user might bring: 4 bits on every matmul weight, adapters everywhere, peft loads it.

One module fixture runs ``tests/architecture_worker.py`` in a fresh process (as a user would start one; it builds
every architecture one after the other) and each test reads one architecture's results. The
architecture table in docs/models.md is generated from the same worker:
``python tests/architecture_worker.py --markdown docs/models.md``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).parents[1] / "architecture_worker.py"
sys.path.insert(0, str(WORKER.parent))
from architecture_worker import SPECS  # noqa: E402

EAGER_ONLY = {"gemma2", "gpt_oss"}  # transformers refuses SDPA for them; its default (eager) must be used


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("archs")
    # one fresh process building every architecture in turn (the suite runs on both cores already: pytest -n 2)
    halves = [list(SPECS)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(out / f"{i}.json"), *half],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i, half in enumerate(halves)
    ]
    errors = [p.communicate(timeout=900)[1] for p in procs]
    merged: dict = {}
    for i, proc in enumerate(procs):
        path = out / f"{i}.json"
        assert path.is_file(), f"worker {i} wrote nothing (exit {proc.returncode}): {errors[i][-2000:]}"
        merged |= json.loads(path.read_text())
    return merged


@pytest.mark.parametrize("arch", list(SPECS))
def test_architecture_trains_in_4_bits_and_its_adapter_loads_in_peft(results, arch):
    result = results.get(arch)
    assert result is not None, f"{arch} was not run"
    assert "error" not in result, f"{arch}: {result.get('error')}\n{result.get('traceback')}"
    assert result["share_4bit"] >= 0.99, (arch, result["share_4bit"], result["full_precision"])
    assert result["adapted"] == result["expected"], set(result["adapted"]) ^ set(result["expected"])
    losses = result["losses"]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    assert result["peft_dequantized_max_diff"] < 1e-4, result["peft_dequantized_max_diff"]
    if result["peft_hf_bnb_max_diff"] is not None:  # transformers' own BitsAndBytesConfig base: the same 4-bit codes
        assert result["peft_hf_bnb_max_diff"] < 1e-4, result["peft_hf_bnb_max_diff"]
    assert result["attn_implementation"] == ("eager" if arch in EAGER_ONLY else "sdpa")


def test_moe_experts_are_4bit_and_adapted(results):
    for arch in ("mixtral", "qwen3_moe", "qwen2_moe", "gpt_oss", "llama4_text"):
        stacks = [n for n in results[arch]["adapted"] if ".experts." in n]
        assert len(stacks) == 4, (arch, stacks)  # two layers, two stacks each
        assert all("experts" not in n for n in results[arch]["full_precision"]), results[arch]["full_precision"]
