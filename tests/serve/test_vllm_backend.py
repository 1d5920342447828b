"""`engine.backend: vllm`: the gateway in front of vLLM gives the built-in engine's answers (GPU + vLLM only)."""

from __future__ import annotations

import importlib.util

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from lmforge.errors import ConfigError
from lmforge.serve.config import EngineConfig, ServeConfig
from lmforge.serve.engine import Engine
from lmforge.serve.sampling import SamplingParams

HAS_VLLM = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()
PROMPTS = ["The list type", "Dictionaries are", "import os\n", "An exception is raised when"]


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here")
def test_the_vllm_backend_without_vllm_is_one_clear_error(trained_run):
    with pytest.raises(ConfigError, match=r"engine.backend=vllm needs vllm, which is not installed: pip install 'lmforge\[vllm\]'"):
        Engine.from_path(str(trained_run), EngineConfig(backend="vllm"))
    with pytest.raises(ValueError, match="backend"):
        ServeConfig.model_validate({"engine": {"backend": "tgi"}})


@pytest.fixture(scope="module")
def model_dir(trained_run, tmp_path_factory):
    from lmforge.interop.export import ExportConfig, run

    out = tmp_path_factory.mktemp("vllm") / "model"
    run(ExportConfig(model=str(trained_run), out=str(out)))
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_VLLM, reason="needs vLLM and CUDA")
def test_vllm_backend_matches_the_builtin_engine_and_serves_the_openai_client(model_dir, tmp_path):
    from lmforge.serve.app import create_app
    from tests.serve.conftest import KEY, MODEL_NAME, start

    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=2)
    config = EngineConfig(device="cuda", dtype="float32", max_num_seqs=4)
    with Engine.from_path(str(model_dir), config) as builtin:
        expected = builtin.generate(PROMPTS, greedy)
    vllm_config = config.model_copy(update={"backend": "vllm", "vllm_args": {"gpu_memory_utilization": 0.3}})
    engine = Engine.from_path(str(model_dir), vllm_config)
    with engine:
        got = engine.generate(PROMPTS, greedy)
        assert [c.token_ids for c in got] == [c.token_ids for c in expected]
        assert [c.text for c in got] == [c.text for c in expected]
        for a, b in zip(got, expected, strict=True):
            assert [lp.logprob for lp in a.logprobs] == pytest.approx([lp.logprob for lp in b.logprobs], abs=1e-3)
        keys = tmp_path / "keys.txt"
        keys.write_text(f"alice:{KEY}\n")
        serve = ServeConfig.model_validate({"server": {"model_name": MODEL_NAME}, "audit": {"path": None},
                                            "auth": {"api_keys_file": str(keys), "api_keys_env": "LMFORGE_TEST_NONE"}})
        server, thread, url = start(create_app(engine, serve))
        try:
            client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
            out = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=8, temperature=0,
                                            extra_body={"ignore_eos": True})
            assert out.choices[0].text == expected[0].text
            stream = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}],
                                                    max_tokens=6, stream=True, seed=1)
            assert sum(1 for _ in stream) >= 2
            # /metrics: vLLM's own series (its `engine` label), each name once, lmforge's beside them.
            names = [f.name for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)]
            assert len(names) == len(set(names))
            families = {f.name: f for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)}
            assert "engine" in families["vllm:num_requests_running"].samples[0].labels
            assert sum(s.value for s in families["vllm:generation_tokens"].samples if s.name.endswith("_total")) >= 14
            assert "lmforge_requests" in families
        finally:
            server.should_exit = True
            thread.join(15)
