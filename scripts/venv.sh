# Sourced by scripts/run.sh and scripts/test.sh: the one place that decides whether .venv
# needs `pip install -e .`.
#
# The decision is made by what is *installed* in the venv, asked from outside the checkout:
# from the repo root, `import purifier` finds the working tree's package on sys.path whether
# or not it was ever installed, so an import check there passes on a fresh clone and the
# install (and with it the `purifier` console script) is skipped.

# venv_ready VENV ROOT [EXTRA]: status 0 when VENV holds the purifier distribution installed
# from the checkout at ROOT (editable, so the code is ROOT's), with its console script and
# every requirement that ROOT/pyproject.toml names now (dependencies, plus the optional EXTRA):
# present, and at the exact version where pyproject pins one with `==`. pyproject is read
# rather than the installed metadata so that a dependency added since the last install
# triggers a new one.
venv_ready() {
    local venv=$1 root=$2 extra=${3:-}
    [[ -x "$venv/bin/python" && -x "$venv/bin/purifier" ]] || return 1
    # cd / so the working tree is not on sys.path; -I ignores PYTHONPATH and user site.
    (cd / && "$venv/bin/python" -I - "$root" "$extra" <<'PY'
import re
import sys
from importlib import metadata
from pathlib import Path

root, extra = Path(sys.argv[1]).resolve(), sys.argv[2]
try:
    metadata.distribution("purifier")
    import purifier
except Exception:
    sys.exit(1)
# installed from this checkout (editable), not a stale copy or another clone
if Path(purifier.__file__).resolve().parent != root / "purifier":
    sys.exit(1)
try:
    import tomllib
except ImportError:  # Python 3.10: trust the installed metadata
    sys.exit(0)
project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
reqs = project.get("dependencies", []) + project.get("optional-dependencies", {}).get(extra, [])
for req in reqs:
    req = req.split(";")[0]
    name = re.match(r"\s*([A-Za-z0-9._-]+)", req).group(1)
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        sys.exit(1)
    pin = re.search(r"==\s*([^,\s]+)", req)
    if pin and have.split("+")[0] != pin.group(1):  # torch's 2.14.1+cpu satisfies ==2.14.1
        sys.exit(1)
PY
    )
}

# ensure_venv ROOT [EXTRA]: create ROOT/.venv with $PYTHON (default python3) if missing, and
# install the package (with EXTRA) unless venv_ready says it is there. REINSTALL=1 forces it.
ensure_venv() {
    local root=$1 extra=${2:-}
    local venv="$root/.venv" spec="$root"
    [[ -n $extra ]] && spec="$root[$extra]"
    if [[ ! -x "$venv/bin/python" ]]; then
        echo "creating .venv with $("${PYTHON:-python3}" --version)" >&2
        "${PYTHON:-python3}" -m venv "$venv"
    fi
    if [[ ${REINSTALL:-0} == 1 ]] || ! venv_ready "$venv" "$root" "$extra"; then
        echo "installing purifier${extra:+[$extra]} into .venv (torch pinned in pyproject.toml; the first time takes minutes)" >&2
        "$venv/bin/python" -m pip install --quiet --upgrade pip
        "$venv/bin/python" -m pip install --quiet -e "$spec"
        venv_ready "$venv" "$root" "$extra" || { echo "pip install finished but .venv still lacks purifier${extra:+[$extra]}" >&2; return 1; }
    fi
}
