#!/usr/bin/env bash
# The GPU benchmark on the device machine (docs/performance.md, "On a GPU"); run from the
# repository root there, with .whl/ and .gl/ carried (git-ignored transport folders): the web
# wheels, the hh-harmless data (.whl/hh-harmless), and onnxruntime-gpu 1.31.1 (CUDA 13) cut to
# fit the 64 MiB carry: its CUDA provider with the kernels of GPUs other than sm_90 zeroed
# (.whl/ort-cuda-provider.so.xz) and the rest of the package without the C API library that
# Python does not load (.gl/ort-rest.tar.xz). Phases, one device call each:
#   torch : build + export the Qwen2-0.5B-size bundle, the pure-torch ceiling, naive-torch bf16
#   ort   : onnxruntime-gpu (CUDA EP): fp16 parity, rmserve-fp16/fp32, offline with I/O binding
# Results go to $OUT/<phase>/. The bundle is kept in /tmp/gpubench between calls on a warm
# machine and rebuilt when missing. ``all`` runs both in one call (short runs, to save device
# time): results in $OUT/ort/ (with limit.json and parity.json) and $OUT/torch/; merge them
# here with python -m benchmarks.merge --out benchmarks/results/gpu OUT/ort OUT/torch.
set -uo pipefail
phase=${1:?usage: device_gpu.sh torch|ort|all}
export PYTHONUNBUFFERED=1 CUDA_MODULE_LOADING=LAZY TOKENIZERS_PARALLELISM=true
W=/tmp/gpubench
DATA=.whl/hh-harmless
mkdir -p "$W" "$OUT/ort" "$OUT/torch"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
# Built with the image's own onnxruntime: the carried one lacks the fp16 converter's tools.
if [ ! -f "$W/bundle/model.fp16.onnx" ]; then
  python3 -m benchmarks.gpu_model build --out "$W" --data "$DATA" --tokenizer .whl/minilm \
    > "$OUT/build.log" 2>&1
  tail -3 "$OUT/build.log"
  [ -f "$W/bundle/model.fp16.onnx" ] || exit 1
fi
if [ "$phase" != torch ]; then
  mkdir -p /tmp/ortgpu
  if [ ! -f /tmp/ortgpu/onnxruntime/capi/libonnxruntime_providers_cuda.so ]; then
    python3 - <<'PY' || exit 1
import lzma, shutil, tarfile
with tarfile.open(".gl/ort-rest.tar.xz") as tar:
    tar.extractall("/tmp/ortgpu")
with lzma.open(".whl/ort-cuda-provider.so.xz") as src, open(
    "/tmp/ortgpu/onnxruntime/capi/libonnxruntime_providers_cuda.so", "wb"
) as dst:
    shutil.copyfileobj(src, dst, 1 << 24)
PY
  fi
  export PYTHONPATH=/tmp/ortgpu:$PYTHONPATH
  # CUDA 13 and cuDNN 9 come from the image's nvidia-* wheels (torch's own).
  NV=$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')
  export LD_LIBRARY_PATH=$NV/cu13/lib:$NV/cudnn/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
  if ! python3 -c 'import onnxruntime as o; print(o.__version__, o.get_available_providers())'; then
    echo "onnxruntime-gpu does not load here; running the torch parts only"
    export PYTHONPATH=/tmp/site:$PWD
    phase=torch
  fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
common=(--device cuda --bundle "$W/bundle" --checkpoint "$W/checkpoint" --data "$DATA"
        --concurrency 64,256 --grpo-concurrency 64 --duration 5 --warmup 2)
if [ "$phase" = torch ] || [ "$phase" = all ]; then
  # at the served workload's mean length (this tokenizer: ~352 tokens per pair)
  python3 -m benchmarks.gpu_model limit --checkpoint "$W/checkpoint" --tokens 352 \
    --batches 16,64,128,256 --out "$OUT/ort/limit.json" 2>&1 | grep -v "Loading weights" | tail -8
fi
if [ "$phase" = ort ] || [ "$phase" = all ]; then
  timeout 240 python3 -m benchmarks.run "${common[@]}" --out "$OUT/ort" \
    --systems rmserve-fp16,onnxruntime-offline-fp16 \
    --rmserve-env RMSERVE_MAX_BATCH_SIZE=256 --rmserve-env RMSERVE_MAX_BATCH_TOKENS=65536
  tail -2 "$OUT/ort/logs/rmserve-fp16.log"
fi
if [ "$phase" = torch ] || [ "$phase" = all ]; then
  timeout 150 python3 -m benchmarks.run "${common[@]}" --systems naive-torch --out "$OUT/torch"
  tail -2 "$OUT/torch/logs/naive-torch.log"
fi
if [ "$phase" = ort ] || [ "$phase" = all ]; then
  timeout 60 python3 -m benchmarks.gpu_model parity --bundle "$W/bundle" --data "$DATA" \
    --out "$OUT/ort/parity.json" 2>&1 | tail -2
fi
# At most 8 files come back: the plots are redrawn here by benchmarks.merge, logs were tailed.
rm -rf "$OUT"/*/logs "$OUT"/*/throughput.png
