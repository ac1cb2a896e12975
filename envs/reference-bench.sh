#!/usr/bin/env bash
# The benchmark environment .venv-ref: our package plus what diffusers' examples/dreambooth/train_dreambooth.py
# imports (torchvision above all, which .venv deliberately lacks), so that `python -m dreambooth bench --reference
# /path/to/train_dreambooth.py` runs both trainers with the same torch, diffusers, transformers and accelerate; and
# peft, which examples/dreambooth/train_dreambooth_lora.py imports (`bench --training-method lora --reference
# /path/to/train_dreambooth_lora.py`).
#
# Idempotent: creates .venv-ref when missing, then (re)installs the pinned set.  torch is never resolved freely
# (that could pull a multi-GB CUDA build): it is installed first, on its own, and pinned by a constraint file;
# torchvision is installed with --no-deps so it cannot replace it.
#
# The reference scripts are not part of this repository: take examples/dreambooth/train_dreambooth.py and
# examples/dreambooth/train_dreambooth_lora.py from the diffusers release whose check_min_version passes against
# DIFFUSERS below (e.g. tag v0.40.0) and keep them outside the repository (e.g. /work/ref/).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-ref"
PYTHON_BIN="${PYTHON:-python3}"

TORCH="${TORCH:-2.13.0}"
TORCHVISION="${TORCHVISION:-0.28.0}"  # the torchvision release built against torch 2.13
DIFFUSERS="${DIFFUSERS:-0.42.1}"      # same releases as .venv, so our rows in .venv-ref match .venv's
TRANSFORMERS="${TRANSFORMERS:-5.24.0}"
ACCELERATE="${ACCELERATE:-1.15.0}"
# train_dreambooth_lora.py's adapters: diffusers 0.42 needs peft >= 0.17.  transformers 5.24's add_adapter, which the
# script calls on the text encoder with --train_text_encoder, asks for peft >= 0.22.0, and no such release exists
# (0.21.2 is the newest): in this environment the LoRA script runs with the text encoder frozen only.
PEFT="${PEFT:-0.21.2}"
LYCORIS="${LYCORIS:-4.1.3}"          # our trainer's LoRA / LoHa / LoKr modules (envs/latest.txt's pin)

[ -x "$VENV/bin/python" ] || "$PYTHON_BIN" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

if ! "$VENV/bin/python" -c "import torch; assert torch.__version__.split('+')[0] == '$TORCH'" 2>/dev/null; then
    "${PIP[@]}" install -q "torch==$TORCH"
fi
echo "torch==$TORCH" > "$VENV/torch-constraint.txt"

"${PIP[@]}" install -q --no-deps "torchvision==$TORCHVISION"
"${PIP[@]}" install -q -c "$VENV/torch-constraint.txt" \
    "diffusers==$DIFFUSERS" "transformers==$TRANSFORMERS" "accelerate==$ACCELERATE" \
    "peft==$PEFT" "lycoris-lora==$LYCORIS" safetensors Pillow numpy PyYAML tqdm Jinja2
# No tensorboard here: train_dreambooth.py's --report_to defaults to "tensorboard" and cannot be switched off from
# its command line; without the package accelerate starts no tracker, as our trainer (report_to "none").
"${PIP[@]}" uninstall -y -q tensorboard tensorboardX 2>/dev/null || true
# open-clip-torch only for the CLIP vocabulary file (never imported); its dependencies would pull another torch.
"${PIP[@]}" install -q --no-deps -r "$ROOT/envs/no-deps.txt"

# torchvision's wheel here is the CUDA build (no CPU build of 0.28 on this machine's index): its compiled ops cannot
# load next to the CPU torch and `import torchvision` would fail.  envs/torchvision_without_ops.py, imported at
# start-up through a .pth file, makes the import work (transforms need no compiled op); see its docstring.
SITE="$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")"
cp "$ROOT/envs/torchvision_without_ops.py" "$SITE/_torchvision_without_ops.py"
echo "import _torchvision_without_ops; _torchvision_without_ops.install()" > "$SITE/_torchvision_without_ops.pth"

"$VENV/bin/python" - <<'EOF'
import warnings

warnings.simplefilter("ignore")
import accelerate
import diffusers
import lycoris  # noqa: F401  (our trainer's adapters)
import peft
import torch
import torchvision
import transformers
from PIL import Image
from torchvision import transforms  # what train_dreambooth.py imports
from transformers import CLIPTextModel  # noqa: F401  (imports torchvision when it is installed)
from peft import LoraConfig  # noqa: F401  (what train_dreambooth_lora.py imports)
from diffusers.utils import USE_PEFT_BACKEND

assert USE_PEFT_BACKEND, "diffusers does not see a usable peft: train_dreambooth_lora.py would fail"

assert transforms.ToTensor()(transforms.CenterCrop(8)(Image.new("RGB", (9, 9)))).shape == (3, 8, 8)

print(
    f"{__import__('sys').prefix}: torch {torch.__version__}, torchvision {torchvision.__version__}, "
    f"diffusers {diffusers.__version__}, transformers {transformers.__version__}, accelerate {accelerate.__version__}, "
    f"peft {peft.__version__}"
)
EOF
