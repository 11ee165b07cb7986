# Sourced by the GPU launchers: PY is the project's venv python here, or on a GPU machine the
# system python3 that holds CUDA torch; the package is used from the source tree.
if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then
    PY=.venv/bin/python
else
    PY=python3
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
