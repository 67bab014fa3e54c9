#!/usr/bin/env bash
# Installs everything drs_ext needs and builds the extension in place, into whatever `python3`
# is active (activate a virtual environment first to keep it apart from the system's packages).
# requirements.txt pins torch==2.13.0 (the CPU build here), so no multi-GB CUDA torch is pulled in;
# --no-build-isolation builds against that torch instead of fetching another one.
# The build is skipped when the compiled sources, the build script, torch and the build switches
# are the same as at the last build (drs_ext/.build-stamp holds their hash).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -r requirements.txt
stamp=drs_ext/.build-stamp
want=$(
  {
    find csrc -type f -print0 | sort -z | xargs -0 sha256sum
    sha256sum setup.py pyproject.toml
    python3 -c "import sys, torch; print(sys.executable, torch.__version__, torch.version.cuda)"
    echo "${DRS_CPU_ONLY:-} ${FORCE_CUDA:-} ${TORCH_CUDA_ARCH_LIST:-} ${CXX:-}"
  } | sha256sum | cut -d' ' -f1
)
# The installed drs_ext must be this checkout's (another clone's editable install would shadow it).
installed_here() {
  local here="$PWD/drs_ext"
  (cd / && python3 - "$here" <<'PY'
import pathlib, sys
import drs_ext
sys.exit(pathlib.Path(drs_ext.__file__).parent.resolve() != pathlib.Path(sys.argv[1]).resolve())
PY
  ) 2>/dev/null
}
if [[ -f $stamp && $(cat "$stamp") == "$want" ]] && installed_here; then
  echo "drs_ext: sources unchanged since the last build; skipping the rebuild"
else
  rm -f "$stamp"
  python3 -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e .
  echo "$want" >"$stamp"
fi
python3 -c "import drs_ext; print('drs_ext', drs_ext.__version__, '| CUDA kernels:', drs_ext.built_with_cuda)"
