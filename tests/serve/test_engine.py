"""The engine: continuous batching gives each request what it would get alone."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.model.decode import generate_tokens
from lmforge.serve.config import EngineConfig
from lmforge.serve.engine import Engine, RequestError
from lmforge.serve.sampling import SamplingConfig, SamplingParams

PROMPTS = [
    "The list type",
    "Dictionaries are",
    "import os\n",
    "An exception is raised when",
    "The for statement in Python differs a bit from what you may be used to in C or Pascal.",
    "Strings",
]


def reference(model, tokenizer, prompt: str, **sampling) -> list[int]:
    return list(generate_tokens(model, tokenizer.encode_prompt(prompt), stop_ids=tokenizer.stop_ids, **sampling))


@pytest.fixture(scope="module")
def engine(serve_model):
    model, tokenizer = serve_model
    # A small prefill chunk, so prompts are spread over steps while other rows decode.
    with Engine(model, tokenizer, EngineConfig(max_num_seqs=4, prefill_chunk_tokens=5)) as engine:
        yield engine


def test_batched_greedy_and_seeded_sampling_equal_the_reference_decoder(engine, serve_model):
    model, tokenizer = serve_model
    greedy = engine.generate(PROMPTS, SamplingParams(max_tokens=24, temperature=0))
    seeded = engine.generate(PROMPTS, SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9, top_k=50, seed=7))
    assert engine.steps > 0
    for prompt, g, s in zip(PROMPTS, greedy, seeded, strict=True):
        assert g.token_ids == reference(model, tokenizer, prompt, max_tokens=24, temperature=0)
        assert s.token_ids == reference(model, tokenizer, prompt, max_tokens=24, temperature=0.9, top_p=0.9, top_k=50, seed=7)
        assert g.text == tokenizer.decode(g.token_ids) and s.text == tokenizer.decode(s.token_ids)
        assert g.finish_reason in ("stop", "length")


def test_offline_generation_runs_in_the_calling_thread_and_equals_the_reference(serve_model):
    model, tokenizer = serve_model
    offline = Engine(model, tokenizer, EngineConfig(max_num_seqs=2, prefill_chunk_tokens=5))
    greedy = offline.run_to_completion(PROMPTS, SamplingParams(max_tokens=16, temperature=0))
    assert offline._thread is None and offline.stats().running == 0  # no engine thread was started
    for prompt, g in zip(PROMPTS, greedy, strict=True):
        assert g.token_ids == reference(model, tokenizer, prompt, max_tokens=16, temperature=0)


def test_a_sampling_config_section_samples_as_the_reference_decoder_does(engine, serve_model):
    # quickstart's `sampling` section: a config-file form of one request's parameters.
    model, tokenizer = serve_model
    section = SamplingConfig(max_tokens=16, temperature=0.8, top_k=50, seed=0)
    out = engine.generate([PROMPTS[0]], section.params())[0]
    assert out.token_ids == reference(model, tokenizer, PROMPTS[0], max_tokens=16, temperature=0.8, top_k=50, seed=0)


def test_prompt_logprobs_equal_a_full_forward(engine, serve_model):
    model, tokenizer = serve_model
    ids = tokenizer.encode_prompt(PROMPTS[4])
    out = engine.generate([ids], SamplingParams(max_tokens=0, prompt_logprobs=2))[0]
    assert out.token_ids == [] and out.finish_reason == "length"
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    for i, entry in enumerate(out.prompt_logprobs[1:]):
        assert entry.token_id == ids[i + 1]
        assert entry.logprob == pytest.approx(logprobs[i, ids[i + 1]].item(), abs=1e-4)
        assert entry.top[0][0] == int(logprobs[i].argmax()) and len(entry.top) == 2


def test_stop_strings_cut_the_text_and_penalties_change_the_choice(engine):
    free = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0]
    assert len(free.token_ids) == 30 and free.finish_reason == "length"
    stop = free.text.strip()[3:6]
    cut = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=30, temperature=0, stop=[stop], ignore_eos=True))[0]
    assert cut.finish_reason == "stop" and cut.text == free.text[: free.text.index(stop)]
    penalised = engine.generate(
        [PROMPTS[0]], SamplingParams(max_tokens=30, temperature=0, frequency_penalty=2.0, presence_penalty=2.0, ignore_eos=True)
    )[0]
    assert penalised.token_ids != free.token_ids
    # A frequency penalty of 2 makes repeats rarer than in the free run.
    assert len(set(penalised.token_ids)) >= len(set(free.token_ids))


def test_cancel_and_timeout_free_their_slots(engine):
    long = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)
    handle = engine.submit(PROMPTS[1], long)
    first = next(iter(handle))
    assert not first.finished
    handle.cancel()
    last = list(handle)[-1]
    assert last.finished and last.finish_reason == "cancelled"
    timed = engine.submit(PROMPTS[1], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True, timeout_s=1e-6))
    assert timed.result().finish_reason == "timeout"
    deadline = time.monotonic() + 5
    while engine.stats().running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats().running == 0 and engine.stats().kv_cache_usage == 0


def test_async_stream_yields_deltas_that_add_up(engine):
    async def main():
        deltas = [out async for out in engine.stream(PROMPTS[2], SamplingParams(max_tokens=12, temperature=0))]
        return deltas

    deltas = asyncio.run(main())
    whole = engine.generate([PROMPTS[2]], SamplingParams(max_tokens=12, temperature=0))[0]
    assert deltas[-1].finished and sum(len(d.token_ids) for d in deltas) == len(whole.token_ids)
    assert "".join(d.text for d in deltas) == whole.text


def test_a_stream_that_falls_behind_gets_what_piled_up_as_one_output(engine):
    """The engine runs ahead of a slow consumer: its outputs merge, nothing is lost or reordered."""
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=1)

    async def main():
        handle = engine.submit(PROMPTS[2], params, loop=asyncio.get_running_loop())
        while not handle._queue.qsize() or not handle._queue._queue[-1].finished:  # let the request finish
            await asyncio.sleep(0.01)
        return [out async for out in handle]

    outputs = asyncio.run(main())
    whole = engine.generate([PROMPTS[2]], params)[0]
    assert len(outputs) == 1 and outputs[0].finished and outputs[0].finish_reason == "length"
    assert outputs[0].token_ids == whole.token_ids and outputs[0].text == whole.text
    assert [lp.token_id for lp in outputs[0].logprobs] == whole.token_ids
    assert outputs[0].queued_at is not None and outputs[0].scheduled_at is not None  # the first output's timing


def test_stream_interval_sends_the_first_token_alone_then_every_n(serve_model):
    model, tokenizer = serve_model
    params = SamplingParams(max_tokens=11, temperature=0, ignore_eos=True)
    with Engine(model, tokenizer, EngineConfig(max_num_seqs=2, stream_interval=4)) as engine:
        outputs = list(engine.submit(PROMPTS[0], params))
        whole = engine.generate([PROMPTS[0]], params)[0]
    assert [len(o.token_ids) for o in outputs] == [1, 4, 4, 2]
    assert [t for o in outputs for t in o.token_ids] == whole.token_ids
    assert "".join(o.text for o in outputs) == whole.text


def test_bad_prompts_are_refused_before_they_run(engine):
    with pytest.raises(RequestError, match="empty"):
        engine.submit([], SamplingParams())
    with pytest.raises(RequestError, match="context"):
        engine.submit([1] * engine.max_len, SamplingParams(max_tokens=1))
    with pytest.raises(RequestError, match="vocabulary"):
        engine.submit([10**6], SamplingParams())
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=-1)


def test_a_temperature_near_zero_is_greedy_and_fails_no_one_in_its_batch(engine):
    # logits / 1e-300 overflow to inf and the softmax to NaN: sampled, it would fail the whole step.
    params = [SamplingParams(max_tokens=12, temperature=t, ignore_eos=True) for t in (0, 1e-300, 1e-6)]
    handles = [engine.submit(PROMPTS[0], p) for p in params]
    results = [h.result() for h in handles]
    assert [r.finish_reason for r in results] == ["length"] * 3
    assert results[1].token_ids == results[0].token_ids == results[2].token_ids


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_a_device_this_machine_lacks_is_one_clear_error(trained_run):
    with pytest.raises(LmforgeError, match="engine.device=cuda but CUDA is not available"):
        Engine.from_path(str(trained_run), EngineConfig(device="cuda"))
    with pytest.raises(LmforgeError, match="engine.device='tpu7' is not a device"):
        Engine.from_path(str(trained_run), EngineConfig(device="tpu7"))


def test_shutdown_drains_what_is_running_and_refuses_new_work(serve_model):
    model, tokenizer = serve_model
    engine = Engine(model, tokenizer, EngineConfig(max_num_seqs=2)).start()
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    handles = [engine.submit(p, params) for p in PROMPTS[:3]]  # one waits for a slot
    engine.shutdown(drain=True)
    for handle in handles:
        result = handle.result()
        assert result.finish_reason == "length" and len(result.token_ids) == 20
    with pytest.raises(RequestError, match="shutting down"):
        engine.submit(PROMPTS[0], params)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_engine_on_cuda_batches_and_is_repeatable(serve_model):
    model, tokenizer = serve_model
    cuda = type(model)(model.config).to("cuda", torch.bfloat16)
    cuda.load_state_dict(model.state_dict())
    with Engine(cuda, tokenizer, EngineConfig(max_num_seqs=8)) as engine:
        assert engine.slots.cache.k[0].dtype == torch.bfloat16 and engine.slots.cache.k.is_cuda
        params = SamplingParams(max_tokens=16, temperature=0.8, seed=11, ignore_eos=True)
        first = engine.generate(PROMPTS, params)
        again = engine.generate(PROMPTS, params)
        assert all(len(c.token_ids) == 16 for c in first)
        assert [c.token_ids for c in first] == [c.token_ids for c in again]  # seeded: the same batch, the same tokens


@pytest.mark.slow
def test_compiled_decoding_gives_the_eager_tokens(serve_model, caplog):
    from lmforge.device import compile_unavailable

    model, tokenizer = serve_model
    if compile_unavailable(torch.device("cpu")):
        with Engine(model, tokenizer, EngineConfig(max_num_seqs=4, compile=True)) as engine:
            assert engine.blocks is None and "decoding uncompiled" in caplog.text
        return
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    with Engine(model, tokenizer, EngineConfig(max_num_seqs=4)) as eager:
        expected = [c.token_ids for c in eager.generate(PROMPTS[:3], params)]
    with Engine(model, tokenizer, EngineConfig(max_num_seqs=4, compile=True)) as compiled:
        assert compiled.blocks is not None
        assert [c.token_ids for c in compiled.generate(PROMPTS[:3], params)] == expected
    assert all(not hasattr(block, "_orig_mod") for block in model.layers)  # the model itself is untouched


def test_vllm_sampling_extras_bias_penalise_filter_and_stop_as_asked(engine):
    free = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    first = free.token_ids[0]
    # logit_bias: -100 on the greedy token moves the choice; +100 on another forces it.
    banned = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=1, temperature=0, logit_bias={first: -100.0}))[0]
    assert banned.token_ids[0] != first
    forced = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=3, temperature=0, logit_bias={7: 100.0},
                                                           ignore_eos=True))[0]
    assert forced.token_ids == [7, 7, 7]
    # stop_token_ids: the reply ends at that token, which is not part of the text.
    stopped = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=12, temperature=0,
                                                            stop_token_ids=[free.token_ids[2]], ignore_eos=True))[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == free.token_ids[:2]
    # min_tokens holds the stop token off until that many tokens are out.
    held = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=12, temperature=0, min_tokens=5,
                                                         stop_token_ids=[free.token_ids[2]], ignore_eos=True))[0]
    assert len(held.token_ids) >= 5 and free.token_ids[2] not in held.token_ids[:5]
    # A repetition penalty changes a greedy reply that repeats itself.
    repeated = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0]
    penalised = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=30, temperature=0, repetition_penalty=1.5,
                                                              ignore_eos=True))[0]
    assert penalised.token_ids != repeated.token_ids
    # min_p = 1 keeps only the most likely token: sampling at any temperature is then greedy.
    sharp = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=12, temperature=1.5, min_p=1.0, seed=3,
                                                          ignore_eos=True))[0]
    assert sharp.token_ids == free.token_ids
