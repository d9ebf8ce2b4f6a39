#!/usr/bin/env bash
# Run the model, generation and export tests on the lowest transformers release that pyproject.toml admits.
# `.venv-lowest` holds only that transformers (and the huggingface_hub / tokenizers releases it accepts); everything
# else is read from `.venv` through a .pth file, so this costs seconds, not a second full install.
# Usage: bash scripts/test-lowest-transformers.sh  (after scripts/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

LOWEST=$(sed -n 's/^ *"transformers>=\([0-9.]*\)".*/\1/p' pyproject.toml)
# The newest huggingface_hub / tokenizers that transformers $LOWEST declares it works with.
HUB_SPEC=${GENESIS_HF_LOWEST_HUB_SPEC:-"huggingface_hub>=1.5,<2"}
TOKENIZERS_SPEC=${GENESIS_HF_LOWEST_TOKENIZERS_SPEC:-"tokenizers>=0.22,<0.23"}
ENV_DIR=.venv-lowest
STAMP=$ENV_DIR/.installed

site_packages=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
want="transformers==$LOWEST $HUB_SPEC $TOKENIZERS_SPEC"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
    rm -rf "$ENV_DIR"
    .venv/bin/python -m venv "$ENV_DIR"
    lowest_site=$("$ENV_DIR/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    echo "$site_packages" > "$lowest_site/genesis-hf-main-venv.pth"
    "$ENV_DIR/bin/python" -m pip install --quiet --no-deps "transformers==$LOWEST" "$HUB_SPEC" "$TOKENIZERS_SPEC"
    echo "$want" > "$STAMP"
fi
"$ENV_DIR/bin/python" -c "import transformers; print('lowest supported transformers:', transformers.__version__)"
# GGUF reloads go through transformers' GGUF tokenizer loader, which before the newest releases prepends a BOS token
# whatever the file says; they are tested on the newest release only.
"$ENV_DIR/bin/python" -m pytest -p no:cacheprovider -q tests/test_model.py tests/test_generation.py tests/test_export.py \
    -k "not gguf_export_reloads"
