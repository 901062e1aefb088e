# bash benchmarks/device/run_coldstart.sh  (on the GPU device machine, carry .whl; results under $OUT)
# The cold-start headline (benchmarks/bench_coldstart.py) for an 8B Llama-shape bf16 checkpoint, in one call:
# about 8-9 minutes on a bare 1x H200 (the checkpoints are written there: 16 GB ours + 16 GB safetensors + the
# SSD tier's copy, in /tmp), after the loader's and the engine's CUDA tests. Wheels: the same .whl kit as setup.sh
# (no .gpu kit needed: no default model here). The per-path trace is benchmarks/device/run_trace.sh.
source benchmarks/device/wheels.sh
python3 -c "import torch, transformers, zmq, pykka; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0), 'transformers', transformers.__version__)" || exit 1
df -h /tmp | tail -1; free -g | head -2
timeout 60 python3 -m pytest -q -x -p no:cacheprovider tests/test_storage_cuda.py tests/test_engine_cuda.py 2>&1 | tail -4
timeout ${BENCH_S:-500} python3 benchmarks/bench_coldstart.py --device cuda --work /tmp/coldstart --reps ${REPS:-2} \
  --budget-s ${BUDGET_S:-420} --json $OUT/coldstart_gpu.json 2>&1 | grep -v "Writing model" | tee $OUT/coldstart_gpu.log
rc=${PIPESTATUS[0]}
cp /tmp/coldstart/topology-*.log $OUT/ 2>/dev/null
exit $rc
