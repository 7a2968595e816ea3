#!/usr/bin/env bash
# Installs everything mlx-lora needs into the active Python (a virtual environment is fine),
# and on Linux a fast BLAS for MLX: MLX's CPU wheel bundles the reference BLAS, about 40x
# slower at matmul; utils.py loads the fast one before MLX starts (see README, "Fast BLAS").
#   PYTHON   the interpreter to install into (default: python3)
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

"$PYTHON" -m pip install -q -r requirements.txt

blas_found() { "$PYTHON" -c "import sys, utils; sys.exit(0 if utils.BLAS_PATH else 1)"; }

if [ "$(uname -s)" = Linux ] && ! blas_found; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    # Debian/Ubuntu's OpenBLAS: small, and MLX's cblas calls resolve to it.
    apt-get install -y -q libopenblas0-pthread >/dev/null 2>&1 ||
      { apt-get update -q >/dev/null && apt-get install -y -q libopenblas0-pthread >/dev/null; }
  else
    # Without root: Intel's MKL from PyPI (larger, about 700 MB).
    "$PYTHON" -m pip install -q mkl
  fi
fi
"$PYTHON" -c "import utils; print('fast BLAS:', utils.BLAS_PATH or 'none (MLX uses its own BLAS)')"
