"""Training alerts: a structured line in the log and in `alerts.jsonl`, and an optional webhook.

Conditions, each checked against the run's own recent history:
    non_finite_loss      loss is NaN or inf
    loss_spike           loss > spike_factor x median of the last `window` losses
    grad_norm_explosion  grad norm > grad_factor x median of the last `window` norms
    throughput_drop      tokens/s < throughput_fraction x median of the last `window` readings
    stalled              no step for `stall_minutes` (a watchdog thread)
    checkpoint_failed    a checkpoint save raised
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import threading
import time
import urllib.request
from collections import deque
from pathlib import Path
from typing import Any

from pydantic import Field

from lmforge.config import Section

log = logging.getLogger(__name__)

ALERTS_FILE = "alerts.jsonl"


class AlertConfig(Section):
    """Alerts on loss spikes, exploding gradients, slow or stalled steps and starved MoE experts (RUN/alerts.jsonl, a webhook)."""

    enabled: bool = True
    window: int = Field(20, ge=3, description="readings in the running medians")
    spike_factor: float | None = Field(2.0, gt=1, description="loss > this x its running median; None: off (RL's loss is no cross-entropy)")
    grad_factor: float = Field(10.0, gt=1)
    throughput_fraction: float = Field(0.5, gt=0, lt=1)
    stall_minutes: float = Field(30.0, gt=0)
    expert_starve_ratio: float = Field(0.1, ge=0, description="MoE: an expert below this x an even share of its layer's tokens")
    expert_dominate_ratio: float = Field(3.0, gt=1, description="MoE: an expert above this x an even share")
    webhook: str | None = Field(None, description="URL that receives each alert as a JSON POST")


class AlertMonitor:
    def __init__(self, run_dir: Path, config: AlertConfig, run_name: str = ""):
        self.path = Path(run_dir) / ALERTS_FILE
        self.config, self.run_name = config, run_name
        self.losses: deque[float] = deque(maxlen=config.window)
        self.norms: deque[float] = deque(maxlen=config.window)
        self.speeds: deque[float] = deque(maxlen=config.window)
        self.fired: list[dict[str, Any]] = []
        self._last_step_time = time.monotonic()
        self._last_step = 0
        self._stop = threading.Event()
        self._stalled_reported = False
        self._watchdog: threading.Thread | None = None
        self._unbalanced: set[tuple[str, int, int]] = set()  # (kind, layer, expert) alerted and not yet recovered

    # -- the trainer calls these ---------------------------------------------------------

    def observe(self, step: int, loss: float, grad_norm: float | None = None, tokens_per_second: float | None = None) -> list[dict]:
        """Check one step's readings; return the alerts it fired."""
        self._last_step_time, self._last_step, self._stalled_reported = time.monotonic(), step, False
        if not self.config.enabled:
            return []
        fired = []
        if not math.isfinite(loss):
            fired.append(self.alert("non_finite_loss", step, f"loss is {loss}", loss=loss))
        elif (self.config.spike_factor is not None and len(self.losses) >= 3
              and loss > self.config.spike_factor * statistics.median(self.losses)):
            median = statistics.median(self.losses)
            fired.append(self.alert("loss_spike", step, f"loss {loss:.4f} > {self.config.spike_factor} x median {median:.4f}", loss=loss, median=median))
        if grad_norm is not None and math.isfinite(grad_norm):
            # Norms of steps with no signal (RL: every group's rewards equal) are 0: no scale to judge by.
            if len(self.norms) >= 3 and statistics.median(self.norms) > 0 and grad_norm > self.config.grad_factor * statistics.median(self.norms):
                median = statistics.median(self.norms)
                fired.append(self.alert("grad_norm_explosion", step, f"grad norm {grad_norm:.3g} > {self.config.grad_factor} x median {median:.3g}", grad_norm=grad_norm, median=median))
            self.norms.append(grad_norm)
        if tokens_per_second is not None:
            if len(self.speeds) >= 3 and tokens_per_second < self.config.throughput_fraction * statistics.median(self.speeds):
                median = statistics.median(self.speeds)
                fired.append(self.alert("throughput_drop", step, f"{tokens_per_second:,.0f} tokens/s < {self.config.throughput_fraction} x median {median:,.0f}", tokens_per_second=tokens_per_second, median=median))
            self.speeds.append(tokens_per_second)
        if math.isfinite(loss):
            self.losses.append(loss)
        return fired

    def observe_experts(self, step: int, load: list[list[float]], layers: list[int] | None = None) -> list[dict]:
        """MoE expert load (per MoE layer and expert, share x experts; 1.0 even; `layers`: their
        model layer indices). One alert per kind summarises the experts that starve or dominate,
        fired when one of them was not in the last alert's set (a recovered expert may fire again)."""
        if not self.config.enabled or not load:
            return []
        layers = layers or list(range(len(load)))
        low, high = self.config.expert_starve_ratio, self.config.expert_dominate_ratio
        found: dict[str, list[tuple[int, int, float]]] = {"expert_starving": [], "expert_dominating": []}
        for layer, shares in zip(layers, load, strict=True):
            for expert, share in enumerate(shares):
                if share < low:
                    found["expert_starving"].append((layer, expert, share))
                elif share > high:
                    found["expert_dominating"].append((layer, expert, share))
        fired = []
        for kind, experts in found.items():
            now = {(kind, layer, expert) for layer, expert, _ in experts}
            if now - self._unbalanced:
                bound = f"< {low}" if kind == "expert_starving" else f"> {high}"
                named = ", ".join(f"layer {layer} expert {expert} ({share:.2f})" for layer, expert, share in experts[:5])
                more = f" and {len(experts) - 5} more" if len(experts) > 5 else ""
                fired.append(self.alert(kind, step, f"{len(experts)} MoE experts get {bound} x an even share of their "
                                        f"layer's tokens: {named}{more}", experts=[[lay, e, s] for lay, e, s in experts]))
            self._unbalanced = {k for k in self._unbalanced if k[0] != kind} | now
        return fired

    def checkpoint_failed(self, step: int, error: BaseException) -> dict:
        return self.alert("checkpoint_failed", step, f"checkpoint save failed: {error}")

    def start_watchdog(self, poll_seconds: float = 10.0) -> None:
        """A daemon thread that fires `stalled` when no step arrives for stall_minutes."""
        if not self.config.enabled or self._watchdog is not None:
            return

        def watch() -> None:
            while not self._stop.wait(poll_seconds):
                idle = time.monotonic() - self._last_step_time
                if idle > self.config.stall_minutes * 60 and not self._stalled_reported:
                    self._stalled_reported = True
                    self.alert("stalled", self._last_step, f"no step for {idle / 60:.1f} minutes", idle_seconds=idle)

        self._watchdog = threading.Thread(target=watch, name="lmforge-alert-watchdog", daemon=True)
        self._watchdog.start()

    def close(self) -> None:
        self._stop.set()

    # -- output ------------------------------------------------------------------------------

    def alert(self, kind: str, step: int, message: str, **details: Any) -> dict[str, Any]:
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "run": self.run_name,
                  "alert": kind, "step": step, "message": message, **details}
        self.fired.append(record)
        log.warning("ALERT %s", json.dumps(record))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.config.webhook:
            threading.Thread(target=_post, args=(self.config.webhook, record), daemon=True).start()
        return record


def _post(url: str, record: dict[str, Any]) -> None:
    try:
        request = urllib.request.Request(url, data=json.dumps(record).encode(), headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=10).close()
    except OSError as err:  # an alert channel must never take the run down
        log.warning("alert webhook %s failed: %s", url, err)
