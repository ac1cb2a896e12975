#!/usr/bin/env bash
# The GPU checks a session runs when it is lent a CUDA machine (figures: docs/benchmarks.md, "GPU (H200)").
#
#   1. the `gpu`-marked tests (tests/test_gpu.py, tests/test_gpu_estimate.py) with -s: the estimate vs
#      torch.cuda.max_memory_allocated for SD 1.5 at 512 px is printed per configuration;
#   2. tools/gpu_bench.py: seconds per step and the peak of the steps, default vs the fit presets (and LoRA r16 where
#      the checkout has it), SD 1.5 architecture with random weights at 512 px, 10 steps;
#   3. where the checkout has the LoRA trainer: `python -m dreambooth estimate --arch sd15 --set training_method=lora`.
#
# Run from the repository root:  OUT=folder [GPU_SITE=folder-of-extra-packages] bash tools/gpu_check.sh
# GPU_SITE: packages the machine's python lacks (diffusers, bitsandbytes, lycoris-lora, toml), unpacked there; it goes
# first on PYTHONPATH; CLIP's vocabulary file (bpe_simple_vocab_16e6.txt.gz, from open-clip-torch, which such a
# machine lacks: the tiny and random-weight models' tokenizer is built from it) is taken from there when
# DREAMBOOTH_CLIP_BPE is unset.  Without CUDA every part still imports, the tests skip and the bench runs a tiny CPU dry run.
# GPU_BENCH_ARGS: more arguments for tools/gpu_bench.py (e.g. "--steps 3 --warmup 1" for a quick CPU dry run).
# Each part has its own time limit (TESTS_TIMEOUT, BENCH_TIMEOUT, ESTIMATE_TIMEOUT seconds), so one that hangs does
# not take the others' time.  Logs: $OUT/tests.txt, $OUT/bench.json (and whatever the caller tees).
set -u -o pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-$(mktemp -d)}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH="${GPU_SITE:+$GPU_SITE:}$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${DREAMBOOTH_CLIP_BPE:-}" ] && [ -f "${GPU_SITE:-/nonexistent}/bpe_simple_vocab_16e6.txt.gz" ]; then
    export DREAMBOOTH_CLIP_BPE="$GPU_SITE/bpe_simple_vocab_16e6.txt.gz"
fi
# bitsandbytes' CUDA library needs libcudart/libcublas of torch's CUDA: torch's own copies (the nvidia-* packages)
# go last on the library path, where the system has none
nvlibs=$($PY -c "import glob, os, importlib.util as u; s = u.find_spec('nvidia')
dirs = s.submodule_search_locations if s else []
print(':'.join(sorted({os.path.dirname(p) for d in dirs for p in glob.glob(d + '/**/lib*.so*', recursive=True)})))" \
    2>/dev/null)
if [ -n "$nvlibs" ]; then export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$nvlibs"; fi
status=0
section() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

section machine
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "no nvidia-smi"
git log -1 --format='checkout %h %s' 2>/dev/null | cut -c1-120
$PY - <<'EOF' || status=1
import importlib, platform
import torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuda available {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print(f"{torch.cuda.get_device_name()}, bf16 {torch.cuda.is_bf16_supported()}")
for name in ("diffusers", "transformers", "accelerate", "safetensors", "bitsandbytes", "lycoris", "toml", "einops",
             "xformers", "PIL", "yaml", "peft"):
    try:
        module = importlib.import_module(name)
        print(f"  {name} {getattr(module, '__version__', '?')} ({module.__file__})")
    except Exception as error:
        print(f"  {name}: not importable ({type(error).__name__}: {str(error)[:200]})")
import dreambooth.train.loop, dreambooth.memory.estimate, dreambooth.bench  # the code under test imports
from dreambooth.models.tokenizer import find_bpe_file
print(f"dreambooth imports; CLIP vocabulary {find_bpe_file()}")
EOF

section "gpu tests"
per_test=()  # pytest-timeout, where installed: one hung test fails alone instead of taking the part's time
if $PY -c "import pytest_timeout" 2>/dev/null; then per_test=(--timeout="${TEST_TIMEOUT:-120}"); fi
timeout "${TESTS_TIMEOUT:-230}" $PY -m pytest -q -s -p no:cacheprovider -rA -m gpu --durations=10 ${per_test[@]+"${per_test[@]}"} \
    tests/test_gpu.py tests/test_gpu_estimate.py 2>&1 | tee "$OUT/tests.txt" || status=1

section bench
timeout "${BENCH_TIMEOUT:-170}" $PY "$HERE/gpu_bench.py" --json "$OUT/bench.json" ${GPU_BENCH_ARGS:-} || status=1

section "LoRA estimate"
if $PY -c "import dataclasses, sys; from dreambooth.settings import Settings
sys.exit('training_method' not in {f.name for f in dataclasses.fields(Settings)})"; then
    timeout "${ESTIMATE_TIMEOUT:-45}" $PY -m dreambooth estimate --arch sd15 --set training_method=lora || status=1
    timeout "${ESTIMATE_TIMEOUT:-45}" $PY -m dreambooth estimate --arch sd15 --set training_method=lora \
        --set gradient_checkpointing=true --set mixed_precision=bf16 || status=1
else
    echo "this checkout has no training_method setting (the LoRA trainer has not landed): skipped"
fi

section "done: status $status"
exit $status
