"""Several LoRA adapters served over one model: a request's `model` picks one, mixed batches run together."""

from __future__ import annotations

import asyncio
import copy

import openai
import pytest
import torch
import yaml

from lmforge.errors import ConfigError
from lmforge.serve.config import EngineConfig
from lmforge.serve.engine import Engine
from lmforge.serve.lora import read_adapters
from lmforge.serve.sampling import SamplingParams
from lmforge.store.adapter import LoraSettings, apply_lora, save_adapter, weights_hash
from lmforge.store.loading import load_model
from tests.serve.conftest import KEY, MODEL_NAME, make_server

PROMPTS = ["The Python tutorial explains how", "A list comprehension is", "To open a file in Python,"]


def random_adapter(model, directory, base_path, seed: int, r: int, targets: list[str]):
    """An adapter over `model` with non-zero B (peft starts B at zero), saved as `lmforge sft` saves one."""
    wrapped = apply_lora(copy.deepcopy(model), LoraSettings(enabled=True, r=r, alpha=2 * r, target_modules=targets))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return save_adapter(directory, wrapped, str(base_path), weights_hash(model))


@pytest.fixture(scope="module")
def adapters(serve_model, trained_run, tmp_path_factory):
    model, _ = serve_model
    root = tmp_path_factory.mktemp("adapters")
    return {
        # different ranks (padded together) and targets (the output head in one only)
        "terse": str(random_adapter(model, root / "terse", trained_run, 1, 2, ["wqkv", "w13"])),
        "verbose": str(random_adapter(model, root / "verbose", trained_run, 2, 4, ["wqkv", "wo", "w13", "w2", "output"])),
    }


def greedy(model, tokenizer, prompt: str) -> str:
    engine = Engine(model, tokenizer, EngineConfig(max_num_seqs=2))
    return engine.run_to_completion([prompt], SamplingParams(max_tokens=12, temperature=0))[0].text


@pytest.fixture(scope="module")
def expected(serve_model, adapters):
    """Each model's greedy replies, from the base and from each adapter merged into it (peft's merge)."""
    model, tokenizer = serve_model
    merged = {name: load_model(path)[0] for name, path in adapters.items()}
    return {name: [greedy(m, tokenizer, p) for p in PROMPTS] for name, m in [(MODEL_NAME, model), *merged.items()]}


@pytest.fixture(scope="module")
def lora_server(serve_model, adapters, tmp_path_factory):
    model, tokenizer = serve_model
    with make_server((copy.deepcopy(model), tokenizer), tmp_path_factory.mktemp("lora-serve"),
                     lora={"adapters": adapters}, engine={"max_num_seqs": 16}) as server:
        yield server


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=KEY)


def test_models_lists_the_base_and_each_adapter_with_its_parent_and_dir(lora_server, adapters):
    cards = {m.id: m for m in client(lora_server).models.list().data}
    assert set(cards) == {MODEL_NAME, "terse", "verbose"}
    for name, path in adapters.items():
        assert cards[name].parent == MODEL_NAME and cards[name].root == path
    assert client(lora_server).models.retrieve("terse").parent == MODEL_NAME


def test_each_adapter_answers_as_its_merged_model_and_differently_from_the_others(lora_server, expected):
    api = client(lora_server)
    for name in (MODEL_NAME, "terse", "verbose"):
        replies = [api.completions.create(model=name, prompt=p, max_tokens=12, temperature=0) for p in PROMPTS]
        assert [r.choices[0].text for r in replies] == expected[name], name
        assert {r.model for r in replies} == {name}  # the reply names the model that wrote it, as vLLM's
    assert expected["terse"] != expected["verbose"] != expected[MODEL_NAME] != expected["terse"]


def test_concurrent_requests_to_the_base_and_both_adapters_run_in_one_batch_with_the_same_replies(lora_server, expected):
    engine = lora_server.engine
    mixed: list[set] = []
    select = engine.adapters.select

    def spy(names):
        mixed.append(set(names))
        select(names)

    engine.adapters.select = spy
    api = openai.AsyncOpenAI(base_url=lora_server.base_url, api_key=KEY)
    jobs = [(name, i) for i in range(len(PROMPTS)) for name in (MODEL_NAME, "terse", "verbose")]

    async def ask_all():
        replies = await asyncio.gather(*(api.completions.create(model=name, prompt=PROMPTS[i], max_tokens=12,
                                                                temperature=0) for name, i in jobs))
        return [r.choices[0].text for r in replies]

    try:
        replies = asyncio.run(ask_all())
    finally:
        del engine.adapters.select
    assert replies == [expected[name][i] for name, i in jobs]
    assert any(len(names) == 3 for names in mixed)  # the base and both adapters in one forward


def test_a_model_name_that_is_neither_the_base_nor_an_adapter_is_404(lora_server):
    with pytest.raises(openai.NotFoundError, match="'terse', 'verbose'"):
        client(lora_server).completions.create(model="chatty", prompt="Hello", max_tokens=2)


def test_an_adapter_trained_on_other_base_weights_is_refused_naming_it(serve_model, adapters, tmp_path):
    model, _ = serve_model
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).add_(0.01)
    with pytest.raises(ConfigError, match=r"lora.adapters.terse: .*terse was trained on base weights \w+, but the served"):
        read_adapters({"terse": adapters["terse"]}, other)
    with pytest.raises(ConfigError, match=r"lora.adapters.gone: .* is not a LoRA adapter dir"):
        read_adapters({"gone": str(tmp_path)}, model)
    with pytest.raises(ConfigError, match="rank 4, above lora.max_rank 2"):
        read_adapters(adapters, model, max_rank=2)


def test_prompt_logprobs_under_an_adapter_are_its_merged_models(serve_model, adapters):
    model, tokenizer = serve_model
    params = dict(max_tokens=0, prompt_logprobs=0)
    served = Engine(copy.deepcopy(model), tokenizer, EngineConfig(max_num_seqs=4),
                    read_adapters(adapters, model))
    got = served.run_to_completion([PROMPTS[0], PROMPTS[1]], [SamplingParams(**params, adapter="verbose"),
                                                              SamplingParams(**params)])
    for completion, reference in zip(got, [load_model(adapters["verbose"])[0], model], strict=True):
        want = Engine(reference, tokenizer).run_to_completion([completion.prompt_ids], SamplingParams(**params))[0]
        assert [lp.token_id for lp in completion.prompt_logprobs[1:]] == [lp.token_id for lp in want.prompt_logprobs[1:]]
        torch.testing.assert_close(torch.tensor([lp.logprob for lp in completion.prompt_logprobs[1:]]),
                                   torch.tensor([lp.logprob for lp in want.prompt_logprobs[1:]]), atol=1e-4, rtol=0)


def test_lora_modules_flag_takes_vllms_name_path_pairs_and_its_json_form(serve_config_of):
    from lmforge.cli import main

    config = serve_config_of("m", "--lora-modules", "docs=runs/a terse=runs/b",
                             "--lora-modules", '{"name": "json", "path": "runs/c"}')
    assert config.lora.adapters == {"docs": "runs/a", "terse": "runs/b", "json": "runs/c"}
    assert main(["serve", "m", "--lora-modules", "no-path"]) == 2
    assert main(["serve", "m", "--lora-modules", "a=x", "--lora-modules", "a=y"]) == 2


def test_lmforge_serve_takes_several_lora_modules_after_one_flag_as_vllm_does(capsys):
    from lmforge.cli import main

    assert main(["serve", "m", "--lora-modules", "sql-lora=runs/a", "terse=runs/b", "server.port=9",
                 "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["lora"]["adapters"] == {"sql-lora": "runs/a", "terse": "runs/b"}
    assert printed["server"]["port"] == 9  # a dotted key stays an override
    assert main(["serve", "m", "bogus=1"]) == 2  # without --lora-modules an unknown key is still an error
