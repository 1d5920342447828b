"""The unit-test reward: a completion's code run against the record's tests in a subprocess.

Never in the trainer's process. Each run gets its own temp dir, an isolated interpreter
(`python -I`: no user site, no PYTHON* variables, no script dir on the path), an address-space
limit and a CPU-time limit set by the child on itself before the completion's code runs, its
own session (process group), and a wall-clock timeout after which the whole group is killed.
This bounds time and memory; it is not a security boundary against adversarial code
(network and filesystem stay reachable): run RL on untrusted tasks inside a container.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydantic import Field

from lmforge.config import Section

# The first ```python (or bare ```) fenced block; models wrap code in prose and fences.
_FENCE = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)

# Runs in the child. The limits are set here rather than in `preexec_fn`, which CPython
# documents as unsafe when the parent has threads (the combiner waits on several runs at
# once). Every test runs even when an earlier one fails; the tally line carries a nonce read
# from stdin so text the completion prints cannot pass for it by accident.
_HARNESS = """\
import json, os, resource, sys
def main():
    nonce, *limits = sys.stdin.readline().split()
    os.remove("limits")
    for limit, value in zip((resource.RLIMIT_AS, resource.RLIMIT_CPU, resource.RLIMIT_FSIZE), limits):
        resource.setrlimit(limit, (int(value), int(value)))
    tests = json.loads(open("tests.json", encoding="utf-8").read())
    source = open("solution.py", encoding="utf-8").read()
    namespace = {"__name__": "solution"}  # a demo under `if __name__ == "__main__"` stays off
    passed = 0
    try:
        exec(compile(source, "solution.py", "exec"), namespace)
    except BaseException:
        tests = []  # code that does not run passes nothing
    for index, test in enumerate(tests):
        try:
            exec(compile(test, f"test_{index}", "exec"), namespace)
            passed += 1
        except BaseException:
            pass
    sys.stdout.flush()
    print(f"\\n{nonce} {passed}", flush=True)
main()
"""


_OUTPUT_BYTES = 16 << 20  # RLIMIT_FSIZE: a completion printing forever is stopped (SIGXFSZ)


class RewardTimeout(Exception):
    """A completion's code ran past its wall-clock limit and was killed."""


class UnitTestsOptions(Section):
    field: str = Field("tests", description="record field: a test script, or a list of assert snippets")
    timeout_s: float = Field(5.0, gt=0, description="wall-clock limit per completion; the process group is killed after it")
    memory_mb: int = Field(512, ge=32, description="address-space limit of the subprocess (RLIMIT_AS)")
    partial_credit: bool = Field(True, description="reward = fraction of tests passed; False: 1.0 only if all pass")
    max_workers: int = Field(4, ge=1, description="completions run at once (threads each waiting on a subprocess)")


def extract_code(completion: str) -> str:
    """The first fenced python block of a completion, or the whole completion if it has none."""
    found = _FENCE.search(completion)
    return found.group(1) if found else completion


def _exited(pid: int, timeout_s: float) -> bool:
    """Wait up to `timeout_s` for the child to exit, leaving it unreaped (WNOWAIT).

    While it is an unreaped zombie its pid cannot be reused, so killing its process group
    afterwards cannot hit an unrelated process.
    """
    deadline, delay = time.monotonic() + timeout_s, 0.005
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.05)
    return True


def run_tests(code: str, tests: str | list[str], options: UnitTestsOptions) -> tuple[int, int]:
    """(passed, total) for `code` against `tests`; raises RewardTimeout past `options.timeout_s`."""
    tests = [tests] if isinstance(tests, str) else [str(t) for t in tests]
    if not tests:
        raise ValueError("no tests to run")
    nonce = secrets.token_hex(8)
    cpu_s = math.ceil(options.timeout_s) + 1  # a backstop should the wall-clock kill fail
    with tempfile.TemporaryDirectory(prefix="lmforge-reward-") as work:
        Path(work, "solution.py").write_text(code, encoding="utf-8")
        Path(work, "tests.json").write_text(json.dumps(tests), encoding="utf-8")
        Path(work, "harness.py").write_text(_HARNESS, encoding="utf-8")
        Path(work, "limits").write_text(f"{nonce} {options.memory_mb << 20} {cpu_s} {_OUTPUT_BYTES}\n")
        # Files, not pipes: output needs no reader thread, and RLIMIT_FSIZE bounds it.
        with open(Path(work, "limits")) as stdin, open(Path(work, "stdout"), "w+b") as stdout:
            process = subprocess.Popen([sys.executable, "-I", "harness.py"], cwd=work, stdin=stdin,
                                       stdout=stdout, stderr=subprocess.DEVNULL, start_new_session=True)
            try:
                finished = _exited(process.pid, options.timeout_s)
            finally:
                try:  # the whole group: whatever the code forked dies with it, timed out or not
                    os.killpg(process.pid, signal.SIGKILL)  # start_new_session: group id = child's pid
                except (ProcessLookupError, PermissionError):
                    pass
                process.wait()
            if not finished:
                raise RewardTimeout(f"code ran past {options.timeout_s:g} s and was killed")
            stdout.seek(0)
            text = stdout.read().decode("utf-8", "replace")
    tally = [line.split() for line in text.splitlines() if line.startswith(nonce)]
    if not tally:  # killed by a limit, os._exit, a crash: nothing passed
        return 0, len(tests)
    return min(int(tally[-1][1]), len(tests)), len(tests)


def unit_tests(record: dict, completion: str, options: UnitTestsOptions) -> float:
    """Fraction of the record's tests the completion's code passes (or 1.0/0.0 without partial credit)."""
    passed, total = run_tests(extract_code(completion), record[options.field], options)
    if options.partial_credit:
        return passed / total
    return float(passed == total)
