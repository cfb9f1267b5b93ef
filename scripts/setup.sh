#!/usr/bin/env bash
# Set up koopman-search in ./.venv.
#
#   bash scripts/setup.sh          # the service: torch, optuna, optuna-dashboard, psycopg, plotly
#   bash scripts/setup.sh --test   # also the test tools, and Chromium for the browser tests (apt, as root)
#
# torch is installed first, on its own, so that the project's range (torch>=2.2,<2.14) is already met and
# pip never swaps in another build. Set TORCH_INDEX to pick a wheel index, e.g. the CPU-only builds:
#   TORCH_INDEX=https://download.pytorch.org/whl/cpu bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

with_tests=0
for arg in "$@"; do
  case "$arg" in
    --test) with_tests=1 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option $arg (use --test or nothing)" >&2; exit 2 ;;
  esac
done

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_INDEX:-}" ]; then
    "${pip[@]}" "torch>=2.2,<2.14" --index-url "$TORCH_INDEX"
  else
    "${pip[@]}" "torch==2.13.0"
  fi
fi

if [ "$with_tests" = 1 ]; then
  "${pip[@]}" -e ".[test]"
  if ! command -v kubectl >/dev/null; then  # the k8s tests cross-check their renderer with `kubectl kustomize`
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "setup.sh: installing Debian's kubernetes-client (kubectl) for the k8s tests" >&2
      apt-get install -y -q kubernetes-client >/dev/null \
        || { apt-get update -q >/dev/null && apt-get install -y -q kubernetes-client >/dev/null; }
    else
      echo "setup.sh: the k8s tests need kubectl: sudo apt-get install kubernetes-client" >&2
    fi
  fi
  if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "setup.sh: installing Debian's chromium and chromium-driver for the browser tests" >&2
      apt-get install -y -q chromium chromium-driver >/dev/null \
        || { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; }
    else
      echo "setup.sh: the browser tests need chromium and chromedriver: sudo apt-get install chromium chromium-driver" >&2
    fi
  fi
else
  "${pip[@]}" -e .
fi
echo "setup.sh: ready: $(.venv/bin/koopman-search --help >/dev/null && echo .venv/bin/koopman-search)" >&2
