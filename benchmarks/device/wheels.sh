# Sourced by every run on the GPU device machine: its environment (NVLink multicast off, as the device tool asks)
# and the carried wheels (.whl, once per machine) on PYTHONPATH.
export PYTHONUNBUFFERED=1 SLLM_HOME=/tmp/sllm NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ ! -f /tmp/site/.ok ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  if ! python3 - <<'PY'
import transformers, sys
v = tuple(int(x) for x in transformers.__version__.split(".")[:2])
print("device transformers", transformers.__version__); sys.exit(0 if v >= (4, 56) else 1)
PY
  then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/tf/*.whl || exit 1; fi
  touch /tmp/site/.ok
fi
export PYTHONPATH=/tmp/site:$PWD
