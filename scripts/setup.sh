#!/usr/bin/env bash
# Set up the project on a fresh machine: a virtualenv in .venv, the package, the offline models.
#   bash scripts/setup.sh          # to run the pipeline
#   bash scripts/setup.sh --dev    # plus test tools
# GIST_SKIP_TORCH=1 keeps a torch you installed yourself (e.g. a CUDA build on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
python="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

# torch first: on a CPU machine 2.13.0 is the CPU wheel; an unpinned torch pulled in by another
# package would be a multi-GB CUDA build.
if [ -z "${GIST_SKIP_TORCH:-}" ] && ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "installing torch 2.13.0 (CPU)"
  "${pip[@]}" "torch==2.13.0"
fi
echo "installing gist-pipeline$extras"
"${pip[@]}" -e ".$extras"

echo "provisioning the offline default models into models/"
.venv/bin/gist models provision
echo "setup done"
