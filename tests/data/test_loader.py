"""WindowLoader: fixed windows whose batches are a pure function of (seed, step), sharded by rank."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

from lmforge.data.loader import TokenDataset, WindowLoader
from lmforge.data.tokenize import TokenizeConfig
from lmforge.data.tokenize import run as tokenize_run
from lmforge.errors import DataError
from lmforge.store.token_dataset import MANIFEST

SEQ_LEN = 64


@pytest.fixture(scope="module")
def train_split(token_dataset) -> TokenDataset:
    return TokenDataset(token_dataset, "train")


@pytest.fixture(scope="module")
def sharded_dataset(corpus_texts, trained_tokenizer, tmp_path_factory):
    """The same 30 documents tokenized into one shard and into many 2048-token shards."""
    root = tmp_path_factory.mktemp("sharded")
    docs = root / "docs.jsonl"
    docs.write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in corpus_texts[:30]), encoding="utf-8"
    )
    for name, shard_tokens in (("whole", 100_000_000), ("sharded", 2048)):
        tokenize_run(
            TokenizeConfig(
                inputs=[str(docs)],
                tokenizer=str(trained_tokenizer.path),
                out=str(root / name),
                val_fraction=0.0,
                num_workers=1,
                shard_tokens=shard_tokens,
            )
        )
    return root / "whole", root / "sharded"


def same_batch(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def row_counts(rows: torch.Tensor) -> Counter:
    return Counter(row.numpy().tobytes() for row in rows)


def stream_of(dataset: TokenDataset) -> np.ndarray:
    return np.concatenate([np.asarray(s, dtype=np.int64) for s in dataset.shards])


def test_windows_are_seq_len_plus_one_tokens_with_targets_shifted_by_one(train_split):
    loader = WindowLoader(train_split, seq_len=SEQ_LEN, micro_batch_size=4, seed=3)
    inputs, targets = loader.batch(step=5)
    assert inputs.shape == targets.shape == (4, SEQ_LEN) and inputs.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    stream = stream_of(train_split)
    for row, k in enumerate(loader.samples(5, 0)):
        start = loader.window_index(k) * SEQ_LEN
        assert np.array_equal(inputs[row].numpy(), stream[start : start + SEQ_LEN])
        assert np.array_equal(targets[row].numpy(), stream[start + 1 : start + SEQ_LEN + 1])


def test_the_batch_at_a_step_is_the_same_in_every_loader_instance(train_split):
    a = WindowLoader(train_split, seq_len=SEQ_LEN, micro_batch_size=4, grad_accum_steps=2, seed=11)
    b = WindowLoader(
        TokenDataset(train_split.directory),
        seq_len=SEQ_LEN,
        micro_batch_size=4,
        grad_accum_steps=2,
        seed=11,
    )
    for step, micro in [(0, 0), (0, 1), (7, 1), (123, 0)]:
        assert same_batch(a.batch(step, micro), b.batch(step, micro))


def test_different_seeds_give_different_orders(train_split):
    a = WindowLoader(train_split, seq_len=SEQ_LEN, micro_batch_size=8, seed=0)
    b = WindowLoader(train_split, seq_len=SEQ_LEN, micro_batch_size=8, seed=1)
    assert not torch.equal(a.batch(0)[0], b.batch(0)[0])
    order_a = [a.window_index(k) for k in range(100)]
    order_b = [b.window_index(k) for k in range(100)]
    assert order_a != order_b


def test_every_window_is_visited_exactly_once_per_epoch_in_a_new_order_each_epoch(train_split):
    seq_len = 256
    n = (train_split.num_tokens - 1) // seq_len
    # One step of n samples is exactly one epoch.
    loader = WindowLoader(train_split, seq_len=seq_len, micro_batch_size=n, seed=5)
    assert loader.num_windows == n
    stream = stream_of(train_split)
    all_windows = Counter(stream[w * seq_len : (w + 1) * seq_len + 1].tobytes() for w in range(n))

    epochs = []
    for step in (0, 1):
        inputs, targets = loader.batch(step)
        windows = torch.cat([inputs, targets[:, -1:]], dim=1).numpy()
        assert Counter(row.tobytes() for row in windows) == all_windows
        epochs.append(inputs)
    assert not torch.equal(epochs[0], epochs[1])
    assert sorted(loader.window_index(k) for k in range(n, 2 * n)) == list(range(n))


def test_unshuffled_loader_walks_windows_in_stream_order(train_split):
    loader = WindowLoader(train_split, seq_len=SEQ_LEN, micro_batch_size=3, shuffle=False)
    inputs, _ = loader.batch(step=2)
    stream = stream_of(train_split)
    expected = np.stack([stream[w * SEQ_LEN : (w + 1) * SEQ_LEN] for w in (6, 7, 8)])
    assert np.array_equal(inputs.numpy(), expected)


def test_a_loader_resumed_at_step_k_yields_the_batches_of_an_uninterrupted_run(train_split):
    config = dict(seq_len=SEQ_LEN, micro_batch_size=16, grad_accum_steps=2, seed=9)
    uninterrupted = WindowLoader(train_split, **config)
    steps_per_epoch = uninterrupted.num_windows // uninterrupted.samples_per_step
    # Run across an epoch boundary, so the permutation cache must follow the epoch.
    run = range(steps_per_epoch - 3, steps_per_epoch + 3)
    expected = {(s, m): uninterrupted.batch(s, m) for s in range(run.stop) for m in (0, 1)}

    k = run.start
    state = uninterrupted.state_dict(next_step=k)
    resumed = WindowLoader(TokenDataset(train_split.directory), **config)
    assert resumed.check_resume(state) == k
    for step in range(k, run.stop):
        for micro in (0, 1):
            assert same_batch(resumed.batch(step, micro), expected[(step, micro)])
    # Going back to an earlier epoch still gives that epoch's batches.
    assert same_batch(resumed.batch(0, 0), expected[(0, 0)])


@pytest.mark.parametrize("grad_accum_steps", [1, 2])
def test_ranks_partition_each_steps_global_batch_of_a_single_process_run(
    train_split, grad_accum_steps
):
    single = WindowLoader(
        train_split, seq_len=SEQ_LEN, micro_batch_size=4, grad_accum_steps=grad_accum_steps, seed=2
    )
    ranks = [
        WindowLoader(
            train_split,
            seq_len=SEQ_LEN,
            micro_batch_size=2,
            grad_accum_steps=grad_accum_steps,
            seed=2,
            rank=r,
            world_size=2,
        )
        for r in range(2)
    ]
    assert single.samples_per_step == ranks[0].samples_per_step
    for step in (0, 3, 250):
        single_samples = [k for m in range(grad_accum_steps) for k in single.samples(step, m)]
        rank_samples = [
            [k for m in range(grad_accum_steps) for k in r.samples(step, m)] for r in ranks
        ]
        assert not set(rank_samples[0]) & set(rank_samples[1])
        assert sorted(rank_samples[0] + rank_samples[1]) == sorted(single_samples)

        single_rows = torch.cat([single.batch(step, m)[0] for m in range(grad_accum_steps)])
        rank_rows = torch.cat([r.batch(step, m)[0] for r in ranks for m in range(grad_accum_steps)])
        assert row_counts(single_rows) == row_counts(rank_rows)


def test_reading_across_shard_boundaries_matches_the_concatenated_stream(sharded_dataset):
    whole_dir, sharded_dir = sharded_dataset
    whole, sharded = TokenDataset(whole_dir), TokenDataset(sharded_dir)
    assert len(whole.shards) == 1 and len(sharded.shards) >= 3
    assert sharded.num_tokens == whole.num_tokens
    stream = stream_of(whole)
    boundary = int(sharded.offsets[1])
    for start, length in [
        (boundary - 5, 10),
        (boundary - 1, 1),
        (boundary, 3),
        (0, 2048 * 2 + 7),
        (100, sharded.num_tokens - 100),
    ]:
        assert np.array_equal(sharded.read(start, length), stream[start : start + length])
    a = WindowLoader(whole, seq_len=SEQ_LEN, micro_batch_size=8, seed=4)
    b = WindowLoader(sharded, seq_len=SEQ_LEN, micro_batch_size=8, seed=4)
    for step in range(5):
        assert same_batch(a.batch(step), b.batch(step))


def test_a_truncated_shard_is_a_data_error_naming_it(sharded_dataset, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(sharded_dataset[1], copy)
    shard = copy / "train" / "shard-00001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"shard-00001\.bin .*truncated"):
        TokenDataset(copy)


def test_a_missing_shard_or_split_is_a_data_error(sharded_dataset, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(sharded_dataset[1], copy)
    (copy / "train" / "shard-00000.bin").unlink()
    with pytest.raises(DataError, match=r"token shard missing: .*shard-00000\.bin"):
        TokenDataset(copy)
    with pytest.raises(DataError, match="no split 'test'"):
        TokenDataset(sharded_dataset[1], "test")
    with pytest.raises(DataError, match=f"no {MANIFEST}"):
        TokenDataset(tmp_path)


def test_a_split_shorter_than_one_window_is_a_data_error(train_split):
    with pytest.raises(DataError, match="fewer than one window"):
        WindowLoader(train_split, seq_len=train_split.num_tokens, micro_batch_size=1)


@pytest.mark.parametrize("change", [{"seq_len": 32}, {"seed": 1}])
def test_check_resume_rejects_a_changed_seq_len_or_seed(train_split, change):
    config = dict(seq_len=SEQ_LEN, micro_batch_size=4, seed=0)
    state = WindowLoader(train_split, **config).state_dict(next_step=10)
    changed = WindowLoader(train_split, **{**config, **change})
    key = next(iter(change))
    with pytest.raises(DataError, match=f"cannot resume: loader {key}"):
        changed.check_resume(state)


def test_check_resume_rejects_a_global_batch_that_does_not_divide_the_samples_consumed(train_split):
    state = WindowLoader(train_split, seq_len=SEQ_LEN, micro_batch_size=4, seed=0).state_dict(
        next_step=3
    )
    with pytest.raises(DataError, match="global batch changed"):
        WindowLoader(train_split, seq_len=SEQ_LEN, micro_batch_size=8, seed=0).check_resume(state)
