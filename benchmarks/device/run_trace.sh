# Where a cold start's time goes on the GPU machine, in one call (about 6-7 minutes on a bare 1x H200): the loader's
# paths alone, variant by variant (benchmarks/trace_coldstart.py), then ours through the cluster with every load's
# parts (bench_coldstart.py --skip-baselines), then the engine's CUDA tests. Carry .whl.
source benchmarks/device/wheels.sh
python3 -c "import torch, transformers, zmq, pykka; print('torch', torch.__version__, torch.cuda.get_device_name(0), 'transformers', transformers.__version__)" || exit 1
df -h /tmp | tail -1; free -g | head -2; nproc
timeout 170 python3 benchmarks/trace_coldstart.py --work /tmp/coldstart --parts ${PARTS:-loader,engine,copy} --json $OUT/trace.json 2>&1 | grep -v "Writing model" | tee $OUT/trace.log
timeout ${BENCH_S:-330} python3 benchmarks/bench_coldstart.py --device cuda --work /tmp/coldstart --reps ${REPS:-2} ${BENCH_ARGS:---skip-baselines} \
  --json $OUT/coldstart.json 2>&1 | grep -v "Writing model" | tee $OUT/coldstart.log
cp /tmp/coldstart/topology-*.log $OUT/ 2>/dev/null
[ -n "$CUDA_TESTS" ] && timeout 90 python3 -m pytest -q -x -p no:cacheprovider tests/test_engine_cuda.py 2>&1 | tail -5
exit 0
