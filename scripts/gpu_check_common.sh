# Sourced by the gpu_check_*.sh scripts: strict mode, the repository root, the interpreter ($PY, else the
# project's .venv, else python3) with this checkout's src first, and a stop when no GPU is visible.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch; from ubc_ocean.device import usable_gpus; assert torch.cuda.is_available(), 'no GPU visible'; print('GPUs:', [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())], 'usable by this build:', usable_gpus(), 'torch', torch.__version__, torch.cuda.get_arch_list())"
