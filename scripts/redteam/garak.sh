#!/usr/bin/env bash
# Red-team a model with garak through `lmforge serve`'s OpenAI-compatible API, offline.
#
# Usage:  scripts/redteam/garak.sh MODEL [OUT_DIR] [SERVE_ARGS...]
#   MODEL       model dir, run dir or checkpoint (anything `lmforge serve` takes)
#   OUT_DIR     where everything goes (default: runs/redteam/<model name>):
#                 redteam.json, redteam.md   lmforge's summary (also printed)
#                 garak/                     garak's config, report.jsonl, report.html, hitlog, logs
#                 serve.log, serve_audit.sqlite   the server's log and audit log
#   SERVE_ARGS  passed to `lmforge serve` after the model, e.g. configs/serve.yaml engine.device=cuda
#
# Environment (all optional):
#   PROBES       default | smoke | a comma list of garak probes (module.Class); default: default
#                (smoke = the short prompts that fit a 128-token context, as the test uses)
#   PROMPT_CAP   at most this many prompts per probe (garak's soft cap); default 32, 0 = garak's 256
#   GENERATIONS  outputs per prompt (default 1)        MAX_TOKENS  per output (default 150)
#   MODEL_NAME   the id the server answers to (default: the model dir's name)
#   GARAK_VENV   garak's own venv (default .venv-garak; created here if missing)
#   GARAK_VERSION  the garak release to install there (default 0.17.1, the one the probes were checked with)
#   TORCH_SPEC   torch for that venv, installed before garak (default torch==2.13.0, as the Makefile)
#   PYTHON       the interpreter that has lmforge (default .venv/bin/python, else python3)
#   SERVE_TIMEOUT  seconds to wait for the server's /health (default 600)
#
# garak pins transformers and numpy versions that clash with lmforge's, so it gets its own venv.
# torch goes in first and pinned (garak's detectors here need no GPU): left to resolve garak's
# torch requirement itself, pip would pull a multi-GB CUDA build.
# The server runs on a free loopback port with a one-off API key, and stops when this script ends.
set -euo pipefail
cd "$(dirname "$0")/../.."

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
  sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
MODEL=$1
shift
MODEL_NAME=${MODEL_NAME:-$(basename "${MODEL%/}")}
OUT=${1:-runs/redteam/$MODEL_NAME}
[[ $# -gt 0 ]] && shift
PROBES=${PROBES:-default}
PROMPT_CAP=${PROMPT_CAP:-32}
GENERATIONS=${GENERATIONS:-1}
MAX_TOKENS=${MAX_TOKENS:-150}
GARAK_VENV=${GARAK_VENV:-.venv-garak}
GARAK_VERSION=${GARAK_VERSION:-0.17.1}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# 1. garak's venv: torch (CPU build) first, then garak.
if [[ ! -x $GARAK_VENV/bin/python ]] || ! "$GARAK_VENV/bin/python" -c "import garak" 2>/dev/null; then
  echo "setting up $GARAK_VENV ($TORCH_SPEC, then garak==$GARAK_VERSION)"
  python3 -m venv "$GARAK_VENV"
  "$GARAK_VENV/bin/pip" install -q "$TORCH_SPEC"
  "$GARAK_VENV/bin/pip" install -q "garak==$GARAK_VERSION"
fi

# 2. lmforge serve on a free loopback port, with a key made for this run.
PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
API_KEY=sk-redteam-$("$PYTHON" -c 'import secrets; print(secrets.token_hex(16))')
SERVE=("$PYTHON" -m lmforge serve "$MODEL" --host 127.0.0.1 --port "$PORT")
# The release gate: a red-team run comes before `lmforge release`, so serve the model unreleased.
if [[ $("$PYTHON" -m lmforge serve --help 2>/dev/null) == *--allow-unreleased* ]]; then
  SERVE+=(--allow-unreleased)
fi
SERVE+=("$@" "server.model_name=$MODEL_NAME" "audit.path=$OUT/serve_audit.sqlite" server.log_level=warning)
echo "starting lmforge serve on 127.0.0.1:$PORT (log: $OUT/serve.log)"
LMFORGE_API_KEYS="redteam:$API_KEY" "${SERVE[@]}" >"$OUT/serve.log" 2>&1 &
SERVER_PID=$!
stop_server() {
  if kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID"  # uvicorn drains, then the engine and audit log shut down
    wait "$SERVER_PID" 2>/dev/null || true
  fi
}
trap stop_server EXIT

health() {
  "$PYTHON" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/health', timeout=1)" 2>/dev/null
}
deadline=$((SECONDS + ${SERVE_TIMEOUT:-600}))  # loading a large model can take minutes
until health; do
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "lmforge serve exited before it was ready:" >&2
    tail -5 "$OUT/serve.log" >&2
    exit 1
  fi
  if ((SECONDS > deadline)); then
    echo "lmforge serve was not ready after ${SERVE_TIMEOUT:-600}s (see $OUT/serve.log)" >&2
    exit 1
  fi
  sleep 0.5
done

# 3. garak, then lmforge's summary.
export REDTEAM_URL="http://127.0.0.1:$PORT/v1" REDTEAM_MODEL="$MODEL_NAME" REDTEAM_OUT="$OUT" REDTEAM_KEY="$API_KEY"
export REDTEAM_PROBES="$PROBES" REDTEAM_CAP="$PROMPT_CAP" REDTEAM_GENERATIONS="$GENERATIONS"
export REDTEAM_MAX_TOKENS="$MAX_TOKENS" REDTEAM_GARAK="$GARAK_VENV/bin/python"
echo "running garak ($PROBES probes, at most $PROMPT_CAP prompts each)"
"$PYTHON" -c '
import os, sys
from lmforge.errors import LmforgeError
from lmforge.safety import redteam

e = os.environ
probes = {"default": redteam.DEFAULT_PROBES, "smoke": redteam.SMOKE_PROBES}.get(e["REDTEAM_PROBES"])
probes = probes or [p.strip() for p in e["REDTEAM_PROBES"].split(",") if p.strip()]
try:
    summary = redteam.run_garak(
        e["REDTEAM_URL"], e["REDTEAM_MODEL"], e["REDTEAM_OUT"], probes, e["REDTEAM_GARAK"],
        generations=int(e["REDTEAM_GENERATIONS"]), api_key=e["REDTEAM_KEY"],
        prompt_cap=int(e["REDTEAM_CAP"]) or None, max_tokens=int(e["REDTEAM_MAX_TOKENS"]),
    )
except LmforgeError as err:
    sys.exit(f"error: {err}")
print(redteam.summary_markdown(summary))
'
echo "summary: $OUT/redteam.md, $OUT/redteam.json; garak report: $OUT/garak/garak.report.jsonl"
