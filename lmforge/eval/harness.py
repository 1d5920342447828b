"""lmforge models inside lm-evaluation-harness: `lm_eval --model lmforge` and `lmforge eval --harness`.

`LmforgeLM` implements the harness's three request types (loglikelihood,
loglikelihood_rolling, generate_until) on lmforge's own model, batched, with the same
tokenization rules as the harness's `hf` backend on the exported model dir (BOS prepended
as that tokenizer does), so both give the same numbers.

The harness's CLI does not discover third-party models, so run it through this module,
which registers the model first:

    python -m lmforge.eval.harness run --model lmforge --model_args pretrained=runs/small --tasks ...
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from lmforge import device as devices
from lmforge import extras
from lmforge.errors import ConfigError
from lmforge.eval.scoring import Scorer
from lmforge.store.loading import load_model

try:
    # The built-in backends first: the registry only loads them itself while it is empty.
    import lm_eval.models  # noqa: F401
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError:  # the `eval` extra is not installed
    TemplateLM = None


def require_lm_eval() -> None:
    if TemplateLM is None:
        raise extras.missing("lm_eval", "the lm-evaluation-harness adapter")


if TemplateLM is not None:

    @register_model("lmforge")
    class LmforgeLM(TemplateLM):
        """model_args: pretrained (model dir, run dir or checkpoint), device, dtype, batch_size,
        max_length, add_bos_token."""

        def __init__(
            self,
            pretrained: str,
            device: str = "cpu",
            dtype: str | None = None,
            batch_size: int | str = 16,
            max_length: int | None = None,
            add_bos_token: bool = True,
            **_: Any,
        ):
            super().__init__()
            torch_dtype = devices.DTYPES.get(dtype or "")
            if str(device).startswith("cuda") and not torch.cuda.is_available():
                device = "cpu"  # the harness CLI defaults to cuda; run where we can
            model, tokenizer, _ = load_model(pretrained, device, torch_dtype)
            batch = 16 if str(batch_size).startswith("auto") else int(batch_size)
            self.scorer = Scorer(model, tokenizer, batch, max_length and int(max_length), _as_bool(add_bos_token))
            self.lm_tokenizer = tokenizer

        @property
        def eot_token_id(self) -> int:
            return self.lm_tokenizer.eos_id

        @property
        def prefix_token_id(self) -> int:
            return self.scorer.prefix_token_id

        @property
        def max_length(self) -> int:
            return self.scorer.max_length

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
            # As the hf backend with the exported tokenizer: BOS unless told otherwise, and not
            # twice when the string already starts with it.
            add = self.scorer.add_bos_token if add_special_tokens is None else add_special_tokens
            bos = self.lm_tokenizer.bos_token
            if add_special_tokens is None and bos and string.startswith(bos):
                add = False
            return self.scorer.encode(string, add_bos=add)

        def tok_decode(self, tokens: list[int], **kwargs) -> str:
            return self.lm_tokenizer.decode(tokens)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
            pairs = [(context, continuation) for _, context, continuation in requests]
            results = self.scorer.loglikelihood_tokens(pairs)
            for (key, _, _), result in zip(requests, results, strict=True):
                self.cache_hook.add_partial("loglikelihood", key, result)
            return results

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            totals = []
            for (string,) in (request.args for request in requests):
                windows = [
                    make_disjoint_window(w)
                    for w in get_rolling_token_windows(
                        token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                        max_seq_len=self.max_length, context_len=1,
                    )
                ]
                total = sum(logprob for logprob, _ in self.scorer.loglikelihood_tokens(windows))
                self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
                totals.append(total)
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            outputs = []
            for context, gen_kwargs in (request.args for request in requests):
                until = gen_kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                eos_text = self.lm_tokenizer.decode([self.eot_token_id])
                max_tokens = int(gen_kwargs.get("max_gen_toks", 256))
                text = self.scorer.generate_until(context, [*until, eos_text], max_tokens)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                outputs.append(text)
            return outputs


def _as_bool(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


def run_harness(
    model: str,
    tasks: list[str],
    include_path: str | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    seed: int = 1234,
) -> dict[str, Any]:
    """Run harness tasks (their data on local disk) on an lmforge model; the harness's results dict."""
    require_lm_eval()
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" or in {include_path}" if include_path else ""
        raise ConfigError(f"harness task {unknown[0]!r} not found in lm-evaluation-harness{where}")
    results = lm_eval.simple_evaluate(
        model="lmforge",
        model_args={"pretrained": str(Path(model)), "device": device, "batch_size": batch_size},
        tasks=tasks,
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        log_samples=False,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    return results


def main(argv: list[str] | None = None) -> None:
    """`lm_eval`'s own CLI with the lmforge model registered."""
    require_lm_eval()
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
