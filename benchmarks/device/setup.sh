# Sourced at the start of a run on the GPU device machine (no network there). Before the call, here:
#   mkdir -p .gpu/smol && cp ~/.cache/sllm/models/smollm2-135m/{config.json,generation_config.json,tokenizer*.json,chat_template.jinja} .gpu/smol/
#   wheels into .whl (pykka pyzmq textual isal gguf and textual's deps; .whl/tf: transformers and its stack,
#   installed only where the machine's transformers is older than 4.56), as the device tool's README says;
#   carry .whl and .gpu. The default model's GGUF (98 MB) is over the carry limit, so the model there is
#   random-weight SmolLM2-135M (its real config and tokenizer): the same shape, so the same speed.
source benchmarks/device/wheels.sh
python3 -c "import torch, transformers, zmq, pykka, textual; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0), 'transformers', transformers.__version__)" || exit 1
python3 benchmarks/device/random_default_model.py || exit 1
