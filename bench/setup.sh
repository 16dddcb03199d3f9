# Sourced by the GPU scripts beside it: installs the wheels of .whl/ (what the device machine lacks) apart from the
# machine's packages and sets TORCH_PATH / JITTOR_PATH (numpy 1.26 apart: Jittor 1.3.11 needs numpy < 2, the
# machine's compiled packages numpy 2), then builds model=sd21_random for the benches.
rm -rf /tmp/site /tmp/np1
python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /tmp/site $(ls .whl/*.whl | grep -v numpy) || exit 1
python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /tmp/np1 .whl/numpy-*.whl || exit 1
TORCH_PATH=/tmp/site:$PWD
JITTOR_PATH=/tmp/np1:/tmp/site:$PWD
export PYTHONPATH=$TORCH_PATH
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv
GPUS=$(nvidia-smi -L | wc -l); LAST=$((GPUS - 1))
python3 -c "import torch, numpy, diffusers; print('torch', torch.__version__, 'numpy', numpy.__version__, 'diffusers', diffusers.__version__)"
python3 -c "from jdiff.tiny_model import ensure_tiny_model; ensure_tiny_model('data/cache/bench/models', architecture='sd21_random')"
