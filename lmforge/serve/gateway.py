"""What the routes share (`Gateway`), and one generation request's bookkeeping (`Job`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

from fastapi import Request

from lmforge.errors import ConfigError
from lmforge.serve.admission import Admission
from lmforge.serve.audit import AuditLog
from lmforge.serve.backend import BaseEngine, RequestOutput
from lmforge.serve.config import ServeConfig
from lmforge.serve.errors import OpenAIError
from lmforge.serve.hooks import AllowAll, Decision, ModerationHook, load_hook
from lmforge.serve.metrics import ServeMetrics
from lmforge.serve.output_checks import OutputCheckBatcher

log = logging.getLogger(__name__)


class Gateway:
    """The engine, admission checks, metrics, audit log and moderator, shared by every route."""

    def __init__(self, engine: BaseEngine, config: ServeConfig, moderator: ModerationHook | None = None,
                 model_name: str | None = None):
        self.engine, self.config, self.tokenizer = engine, config, engine.tokenizer
        self.model_name = model_name or config.served_model_name
        if self.model_name in getattr(engine, "lora_adapters", {}):
            raise ConfigError(f"lora.adapters: {self.model_name!r} is the served model's own name; name the adapter otherwise")
        self.metrics = ServeMetrics(engine, self.model_name, engine.max_len)
        self.admission = Admission(engine, config, self.metrics, self.model_name)
        self.audit = AuditLog(config.audit.path) if config.audit.path else None
        m = config.moderation
        self.moderator = moderator or load_hook(m.hook, m.options, m.policy)
        batched = getattr(self.moderator, "check_outputs", None)
        self.output_checks = OutputCheckBatcher(batched) if callable(batched) else None
        self.created = int(time.time())
        self.digests: dict[str, str] = {}  # model_digest, release_digest (`serve.server.lineage_digests`)

    @property
    def moderates(self) -> bool:
        return not isinstance(self.moderator, AllowAll)

    async def moderate(self, job: Job, direction: str, texts: list[str], final: bool = True) -> Decision:
        """The moderator's decision on a request's input texts or one choice's output so far.

        Counted (Prometheus, audit) when `final` or blocking: a stream is checked at every
        window, but only its last check or its block is a decision about the reply."""
        if direction == "input":
            decision = await self._call(self.moderator.check_input, texts)
        elif self.output_checks is not None:
            decision = await self.output_checks.check(texts[0])
        else:
            decision = await self._call(self.moderator.check_output, texts[0])
        if final or not decision.allowed:
            for category, action in decision.actions.items():
                self.metrics.moderation.labels(direction, category, action, job.model_name).inc()
            if not decision.allowed and not decision.actions:  # a hook that gives no categories
                for category in decision.categories or ["unspecified"]:
                    self.metrics.moderation.labels(direction, category, "block", job.model_name).inc()
            if decision.action != "allow":
                job.moderation.append(f"{direction} {decision.action}: {decision.reason or ', '.join(decision.categories)}")
        return decision

    async def _call(self, fn, arg):
        if not self.moderates:
            return fn(arg)
        return await asyncio.to_thread(fn, arg)  # a classifier must not block the event loop

    def record(self, **fields) -> None:
        if self.audit is not None:
            self.audit.record(model=self.model_name, **fields)


class Job:
    """One generation request in flight: its prompts, handles and bookkeeping for metrics/audit."""

    def __init__(self, gateway: Gateway, request: Request, chat: bool):
        self.gateway, self.request, self.chat = gateway, request, chat
        self.arrival = time.monotonic()
        self.route = "/v1/chat/completions" if chat else "/v1/completions"
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.key_id: str | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.moderation: list[str] = []  # what moderation did, for the audit log
        self.finish_reasons: list[str] = []
        self.ticket = None
        self.first_token_at: float | None = None
        self.model_name = gateway.model_name  # the request series' label (an adapter may set its own)
        self.scheduled_at: dict[int, float] = {}  # by choice: when the engine gave it a slot
        self.first_at: dict[int, float] = {}  # by choice: when its first token came

    @property
    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def audit(self, status: int, error: str | None = None) -> None:
        g = self.gateway
        g.admission.settle(self.ticket, self.prompt_tokens + self.completion_tokens)
        g.record(request_id=self.id, key_id=self.key_id, route=self.route, prompt_tokens=self.prompt_tokens,
                 completion_tokens=self.completion_tokens, latency_ms=(time.monotonic() - self.arrival) * 1000,
                 status=status, finish_reason=",".join(sorted(set(self.finish_reasons))) or None,
                 moderation="; ".join(self.moderation) or "allowed", error=error)

    @contextlib.contextmanager
    def audited(self):
        """Audit a request that ends in an OpenAI error (its status) or a client that left (499);
        the route audits its own successes."""
        try:
            yield self
        except OpenAIError as err:
            self.audit(err.status, err.message)
            raise
        except asyncio.CancelledError:  # the client disconnected before a non-streamed reply
            self.audit(499, "client disconnected")
            raise

    def observe(self, output: RequestOutput, last_at: dict[int, float], index: int) -> None:
        """Record one output of choice `index` in the metrics (the phases as vLLM splits a request:
        queue -> prefill (to the first token) -> decode (to the last))."""
        now = time.monotonic()
        m, model = self.gateway.metrics, self.model_name
        if output.scheduled_at is not None and output.queued_at is not None:
            self.scheduled_at[index] = output.scheduled_at
            m.queue_time.labels(model).observe(output.scheduled_at - output.queued_at)
        if output.token_ids:
            if index not in self.first_at:
                self.first_at[index] = now
                if index in self.scheduled_at:
                    m.prefill_time.labels(model).observe(now - self.scheduled_at[index])
            if self.first_token_at is None:
                self.first_token_at = now
                m.ttft.labels(model).observe(now - self.arrival)
            elif index in last_at:
                gap = (now - last_at[index]) / len(output.token_ids)
                m.itl.labels(model).observe(gap)
                m.tpot.labels(model).observe(gap)
            last_at[index] = now
            self.completion_tokens += len(output.token_ids)
            m.generation_tokens.labels(model).inc(len(output.token_ids))
        if output.finished:
            m.request_prompt_tokens.labels(model).observe(output.num_prompt_tokens)
            m.request_generation_tokens.labels(model).observe(output.num_output_tokens)
            if index in self.first_at:
                m.decode_time.labels(model).observe(now - self.first_at[index])
            if output.finish_reason:
                self.finish(output.finish_reason)

    def finish(self, reason: str) -> None:
        self.finish_reasons.append(reason)
        # vLLM's finished_reason values are stop, length and abort; the others are lmforge's own.
        label = "abort" if reason == "cancelled" else reason
        self.gateway.metrics.success.labels(self.model_name, label).inc()

    async def moderated_output(self, text: str, reason: str | None) -> tuple[str, str | None]:
        """A whole (non-streamed) choice's text and finish reason after output moderation."""
        if not self.gateway.moderates:
            return text, reason
        decision = await self.gateway.moderate(self, "output", [text])
        if not decision.allowed:
            if reason in self.finish_reasons:
                self.finish_reasons.remove(reason)
            self.finish("content_filter")
            return "", "content_filter"
        return (decision.redacted[0] if decision.redacted else text), reason
