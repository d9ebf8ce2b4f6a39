#!/usr/bin/env bash
# Create (or refresh) the project's own environment in .venv: the CPU build of torch, then genesis_hf with its
# dev extras. GPU users: install the torch build for your CUDA first (or set GENESIS_HF_TORCH_SPEC), then run this.
# Re-running is cheap: the install is skipped while pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${GENESIS_HF_TORCH_SPEC:-torch==2.13.0}
STAMP=.venv/.genesis_hf-installed

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $TORCH_SPEC"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    # torch first and pinned: an unpinned `torch` pulled in by a dependency would fetch a multi-GB CUDA build.
    if ! .venv/bin/python -c "import torch" 2>/dev/null; then
        .venv/bin/python -m pip install --quiet "$TORCH_SPEC"
    fi
    .venv/bin/python -m pip install --quiet -e ".[dev]"
    echo "$want" > "$STAMP"
fi

# The playground's browser test drives Debian's Chromium (no browser download); install it when missing.
if [ "${GENESIS_HF_SETUP_BROWSER:-1}" = "1" ] && ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
            || echo "setup.sh: could not install chromium; the browser test will fail until it is installed" >&2
    else
        echo "setup.sh: chromium not found; install it (e.g. 'apt-get install chromium') for the browser test" >&2
    fi
fi
