#!/usr/bin/env bash
# The GPU benchmark on the device machine (docs/performance.md, "On a GPU"); run from the
# repository root there, with .whl/ carried (web wheels, the onnxruntime-gpu package, and
# the hh-harmless data in .whl/hh-harmless). Phases, one device call each:
#   torch : build + export the Qwen2-0.5B-size bundle, the pure-torch ceiling, naive-torch bf16
#   ort   : onnxruntime-gpu (CUDA EP): fp16 parity, rmserve-fp16/fp32, offline with I/O binding
# Results go to $OUT/<phase>/. The bundle is kept in /tmp/gpubench between calls on a warm
# machine and rebuilt when missing.
set -uo pipefail
phase=${1:?usage: device_gpu.sh torch|ort}
export PYTHONUNBUFFERED=1 CUDA_MODULE_LOADING=LAZY TOKENIZERS_PARALLELISM=true
W=/tmp/gpubench
DATA=.whl/hh-harmless
mkdir -p "$W" "$OUT/$phase"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
if [ "$phase" = ort ]; then
  mkdir -p /tmp/ortgpu
  [ -d /tmp/ortgpu/onnxruntime ] || zstd -dc .whl/ort-gpu.tar.zst | tar -C /tmp/ortgpu -xf - || exit 1
  export PYTHONPATH=/tmp/ortgpu:$PYTHONPATH
  NV=$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__file__ or nvidia.__path__[0]))' 2>/dev/null || python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')
  export LD_LIBRARY_PATH=$NV/cudnn/lib:$NV/cu13/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
  python3 -c 'import onnxruntime as o; print(o.__version__, o.get_available_providers())' || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ ! -f "$W/bundle/rmserve.json" ]; then
  python3 -m benchmarks.gpu_model build --out "$W" --data "$DATA" 2>&1 | grep -v Warning | tail -5
fi
common=(--device cuda --bundle "$W/bundle" --checkpoint "$W/checkpoint" --data "$DATA"
        --concurrency 1,16,64,256 --grpo-concurrency 16,64 --duration 12 --warmup 4)
if [ "$phase" = torch ]; then
  python3 -m benchmarks.gpu_model limit --checkpoint "$W/checkpoint" --tokens 154 \
    --out "$OUT/$phase/limit.json" 2>&1 | tail -20
  python3 -m benchmarks.run "${common[@]}" --systems naive-torch --out "$OUT/$phase"
  tail -3 "$OUT/$phase/logs/naive-torch.log"
else
  python3 -m benchmarks.gpu_model parity --bundle "$W/bundle" --data "$DATA" \
    --out "$OUT/$phase/parity.json" 2>&1 | tail -3
  python3 -m benchmarks.run "${common[@]}" \
    --systems rmserve-fp16,rmserve-fp32,onnxruntime-offline,onnxruntime-offline-fp16 \
    --rmserve-env RMSERVE_MAX_BATCH_SIZE=256 --rmserve-env RMSERVE_MAX_BATCH_TOKENS=65536 \
    --out "$OUT/$phase"
  tail -3 "$OUT/$phase"/logs/rmserve-fp16.log
fi
