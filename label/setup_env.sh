#!/usr/bin/env bash
# The MONAI Label 0.8.5 server's own environment, beside the project's .venv.
#   label/setup_env.sh VENV [TORCH_SPEC]
# MONAI Label's declared dependencies would downgrade numpy below 2 and pull sam2 with a
# torchvision that does not import beside CPU torch. So: torch first, pinned for every later
# install; monailabel and pydicom-seg without their dependency lists; then what the server
# imports, and this project's own dependencies (the bundle's code runs inside the server).
set -euo pipefail
VENV=${1:?usage: setup_env.sh VENV [TORCH_SPEC]}
TORCH_SPEC=${2:-torch==2.13.0}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}

"$PYTHON" -m venv "$VENV"
VENV=$(cd "$VENV" && pwd)
PY="$VENV/bin/python"
PIP="$PY -m pip install -q --disable-pip-version-check"
$PIP "$TORCH_SPEC"
"$PY" -c "import torch; print('torch==' + torch.__version__)" > "$VENV/constraints.txt"
C="-c $VENV/constraints.txt"

$PIP $C --no-deps monailabel==0.8.5 pydicom-seg==0.4.1
# The server's imports; pip then lists monailabel's other declared dependencies (sam2,
# numpymaxflow, pynetdicom, ...) as missing: the server and this bundle do not import them.
# pydicom 2.4: pydicom-seg breaks on pydicom 3 (the bundle reads both). The web stack is pinned
# to the releases checked with MONAI Label 0.8.5: a new fastapi, starlette or pydantic must not
# break a clean set-up overnight.
$PIP $C fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 python-multipart==0.0.34 pydantic==2.14.4 \
  pydantic-settings==2.16.3 pyjwt passlib cachetools requests \
  schedule timeloop watchdog psutil expiring-dict "dicomweb-client[gcp]==0.59.3" pydicom==2.4.4 \
  SimpleITK jsonschema itk-io pynrrd girder-client scikit-image shapely nibabel pytorch-ignite
# This project's dependencies (pyproject.toml; it installs no package of its own), with the
# export extra: ONNX Runtime, inference's CPU engine (the app's encoder_engine).
$PIP $C "$REPO[export]"

"$PY" -c "import monailabel, monai, mlflow; print('monailabel', monailabel.__version__, 'monai', monai.__version__)"
(cd "$REPO/bundle" && "$PY" -W ignore -c "import scripts.model.network")
