#!/usr/bin/env bash
# The wheel works on its own: build sdist + wheel, check their metadata, install the wheel into a
# fresh virtual environment outside the checkout (torch as the Makefile installs it, the rest from
# the wheel's own requirements), then run the quickstart and `ww-monitor analyze` from there.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
work=$(mktemp -d "${TMPDIR:-/tmp}/ww-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT

"$PYTHON" -m build --outdir "$work/dist" . >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
"$PYTHON" -m twine check --strict "$work"/dist/*
wheel=$(ls "$work"/dist/*.whl)
"$PYTHON" - "$wheel" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
assert "ww_monitor/py.typed" in names, f"py.typed is missing from {sys.argv[1]}"
PY

"$PYTHON" -m venv "$work/venv"
pip_install() { "$work/venv/bin/python" -m pip install --disable-pip-version-check -q "$@"; }
pip_install "$TORCH_SPEC" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
pip_install "$wheel[examples]"

cd "$work"  # outside the checkout: nothing can be imported from the source tree
"$work/venv/bin/python" - <<'PY'
import pathlib, ww_monitor
where = pathlib.Path(ww_monitor.__file__).resolve()
assert "site-packages" in where.parts, where
print(f"ww_monitor {ww_monitor.__version__} from {where.parent}")
PY
"$work/venv/bin/python" "$repo/examples/quickstart.py" --epochs 2 --logdir "$work/logs" >"$work/quickstart.log" 2>&1 \
    || { cat "$work/quickstart.log"; exit 1; }
tail -n 3 "$work/quickstart.log"
"$work/venv/bin/python" - "$work/model.pt" <<'PY'
import sys, torch
torch.manual_seed(0)
torch.save(torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64)).state_dict(), sys.argv[1])
PY
COLUMNS=100 "$work/venv/bin/ww-monitor" analyze "$work/model.pt" | head -n 4
echo "wheel check passed: $(basename "$wheel")"
