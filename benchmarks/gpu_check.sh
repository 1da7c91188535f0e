#!/usr/bin/env bash
# One short check of K-LoRA on a lent GPU machine (one H100/H200, 16 cores, no internet,
# PyTorch + CUDA installed, diffusers not): the test suite, then the speed benchmark at
# full size (SDXL fp16 1024 px 20 steps with the compile rows, then the FLUX-shaped and
# Wan-shaped transformers). Every result is printed as soon as it is known and also
# written to $OUT/gpu_check.log; each step has its own time limit, the whole stays under
# about 9 minutes.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --dry-run  # here, without a GPU: the same steps, tiny and on the CPU
#
# The packages the machine lacks travel as wheels in .gpu_wheels/: list it in .git/info/exclude and
# name it in the device tool's carry ([".gpu_wheels"]): an ignored folder does not travel otherwise.
# Fill it on a machine with internet, from the repository root:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .gpu_wheels diffusers==0.42.1 peft==0.21.2 \
#       transformers==5.24.0 tokenizers==0.23.3 imageio-ffmpeg
# They are installed with --target into a folder put first on PYTHONPATH: python3 there is
# itself a virtual environment holding torch, so a venv --system-site-packages on top of it
# would see the base interpreter's packages, not its torch.
set -u -o pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
    esac
done

OUT=${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error DIFFUSERS_VERBOSITY=error
SCRIPT_START=$(date +%s)
FAILED=()

# step NAME SECONDS COMMAND...: run with a time limit, say how it ended, go on either way.
step() {
    local name=$1 limit=$2
    shift 2
    echo
    echo "=== $name (limit ${limit} s, at $(( $(date +%s) - SCRIPT_START )) s) ==="
    local start=$(date +%s)
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    local took=$(( $(date +%s) - start ))
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        echo "=== $name: STOPPED at its ${limit} s limit ==="
        FAILED+=("$name (time limit)")
    elif [ $rc -ne 0 ]; then
        echo "=== $name: FAILED, exit code $rc, after ${took} s ==="
        FAILED+=("$name (exit $rc)")
    else
        echo "=== $name: done in ${took} s ==="
    fi
    return 0
}

PYTHON=python3
if [ $DRY_RUN -eq 1 ]; then
    # Here: the project's own environment, a CPU, the smallest settings that still run every row.
    [ -x .venv/bin/python ] && PYTHON=.venv/bin/python
    DEVICE=cpu
    PYTEST_ARGS=(tests/test_rule.py)
    SDXL_ARGS=(--device cpu --steps 2 --rounds 1 --width_scale 0.0625 --height 64 --width 64 --compile)
    DIT_ARGS=(--family dit --device cpu --steps 2 --rounds 1 --height 128 --width 128 --block_fraction 0.1)
    WAN_ARGS=(--family wan --device cpu --steps 2 --rounds 1 --height 64 --width 64 --block_fraction 0.1)
    LIMITS=(60 120 300 120 120)
else
    DEVICE=cuda
    PYTEST_ARGS=()
    SDXL_ARGS=(--device cuda --dtype fp16 --full_size --height 1024 --width 1024 --steps 20 --compile)
    DIT_ARGS=(--family dit --device cuda --full_size)
    WAN_ARGS=(--family wan --device cuda --full_size)
    LIMITS=(45 150 190 70 95)
fi

MODE="on the GPU"
[ $DRY_RUN -eq 1 ] && MODE="dry run: on the CPU, tiny settings"
echo "K-LoRA GPU check ($MODE), $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi -L
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
else
    echo "no nvidia-smi here"
fi

SITE=/tmp/klora-gpu-site
if compgen -G ".gpu_wheels/*.whl" >/dev/null; then
    rm -rf "$SITE"
    echo "wheels: $(cd .gpu_wheels && echo *.whl)"
    step "install the wheels into $SITE" "${LIMITS[0]}" "$PYTHON" -m pip install -q --no-index --no-deps \
        --no-compile --no-cache-dir --target "$SITE" .gpu_wheels/*.whl
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
elif [ $DRY_RUN -eq 1 ]; then
    echo "no .gpu_wheels/*.whl: using $PYTHON's own packages"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "error: .gpu_wheels/ holds no wheels; fill it as this script's header says" >&2
    exit 2
fi

"$PYTHON" - <<'EOF'
import importlib, platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
for name in ("diffusers", "peft", "transformers", "accelerate", "huggingface_hub", "safetensors", "gradio"):
    try:
        module = importlib.import_module(name)
        print(f"  {name} {module.__version__}  ({module.__file__.rsplit('/', 2)[0]})")
    except ImportError as exc:
        print(f"  {name}: not importable ({exc})")
EOF

# The web UI's tests need gradio (and Chromium); the machine has neither, and they test no GPU code.
IGNORE=()
if ! "$PYTHON" -c "import gradio" 2>/dev/null; then
    IGNORE=(--ignore=tests/test_gradio.py --ignore=tests/test_browser.py)
    echo "gradio is not installed: tests/test_gradio.py and tests/test_browser.py are left out"
fi
# The tests run one thread each: with pytest-xdist (on the machine) eight files run side by side
# (the not-slow suite took 63 s so on an H200, the gradio tests left out).
PARALLEL=()
if "$PYTHON" -c "import xdist" 2>/dev/null; then
    PARALLEL=(-n 8 --dist loadfile)
fi
step "pytest -m 'not slow'${PARALLEL:+ ${PARALLEL[*]}}" "${LIMITS[1]}" "$PYTHON" -m pytest -q -x -m "not slow" \
    -p no:cacheprovider --durations=15 "${PARALLEL[@]}" "${IGNORE[@]}" "${PYTEST_ARGS[@]}"

step "speed: SDXL UNet" "${LIMITS[2]}" "$PYTHON" benchmarks/speed.py "${SDXL_ARGS[@]}"
step "speed: FLUX-shaped DiT" "${LIMITS[3]}" "$PYTHON" benchmarks/speed.py "${DIT_ARGS[@]}"
step "speed: Wan-shaped video transformer" "${LIMITS[4]}" "$PYTHON" benchmarks/speed.py "${WAN_ARGS[@]}"

echo
if [ ${#FAILED[@]} -eq 0 ]; then
    echo "=== finished in $(( $(date +%s) - SCRIPT_START )) s on $DEVICE; every step passed ==="
else
    echo "=== finished in $(( $(date +%s) - SCRIPT_START )) s on $DEVICE; ${#FAILED[@]} step(s) failed: ${FAILED[*]} ==="
fi
echo "log: $LOG"
