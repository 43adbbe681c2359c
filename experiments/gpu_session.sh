#!/usr/bin/env bash
# One GPU session's measurements, in one go, on a bare CUDA machine whose python3 has torch,
# OpenCV and numpy (diffusers and pydantic travel as wheels in .whl/; the RIFE weights and the
# shared PNG triplets in .devdata/). Writes CSVs and logs to $OUT (default ./gpu_out):
#   rife_gpu.csv + rife.log          experiments/rife_device.py: RIFE on the GPU vs the CPU
#   calibration_gpu.csv + calib.log  experiments/calibrate_gpu.py: SD1.5/SDXL/Qwen-Image rows
# Prepare here first (both folders are git-ignored via .git/info/exclude, and carried to the machine):
#   .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata pydantic==2.14.4 \
#     pydantic_core==2.50.5 annotated-types typing-inspection typing_extensions
#   mkdir -p .devdata && cp ../shared/data/weights/rife/flownet.pkl .devdata/ &&
#     (cd ../shared/data/frames && find . -name '*.png' -exec install -D {} "$OLDPWD/.devdata/frames/{}" \;)
# Then, here: cp OUT/calibration_gpu.csv cluster/ && .venv/bin/python experiments/merge_gpu_rows.py \
#   cluster/calibration_gpu.csv OUT/rife_gpu.csv   (folds them into cluster/calibration.csv)
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, cv2, pydantic; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'opencv', cv2.__version__)" | tee -a "$OUT/gpu.txt" || exit 1
timeout "${RIFE_S:-150}" python3 experiments/rife_device.py --weights .devdata/flownet.pkl --frames .devdata/frames \
  --out "$OUT/rife_gpu.csv" 2>&1 | tee "$OUT/rife.log"
timeout "${CALIB_S:-330}" python3 experiments/calibrate_gpu.py --budget-s "${BUDGET_S:-270}" \
  --out "$OUT/calibration_gpu.csv" 2>&1 | tee "$OUT/calib.log"
ls -la "$OUT"
