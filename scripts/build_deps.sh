#!/bin/sh
# What `make setup` needs from the system before pip: a working `python -m venv` (Debian splits it into
# python3-venv) and a C++ compiler with the interpreter's headers, because DeepSpeed compiles its CPU
# shared-memory allreduce (and cpu_adam) on first use: without them the 2-rank demo's ranks die with a
# compiler traceback. Installs the missing Debian packages as root where apt-get exists; elsewhere it says
# what is missing and goes on (a machine without apt has its own way to install them). DeepSpeed builds
# those ops for the host CPU (-march=native, AVX2/AVX-512 where present), so cpu_adam's and the shared-memory
# allreduce's last bits may differ between CPU models: tests compare them to plain torch with tolerances.
# Usage: scripts/build_deps.sh PYTHON
set -u
py=${1:-python3}
need=""
"$py" -c "import ensurepip, venv" 2>/dev/null || need="$need python3-venv"
command -v c++ >/dev/null 2>&1 || need="$need g++"
"$py" -c "import os, sysconfig, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))" \
    2>/dev/null || need="$need python3-dev"
[ -z "$need" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "build-deps: installing Debian packages:$need"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends $need >/dev/null
    exit $?
fi
echo "build-deps: missing:$need (not root or no apt-get: install them, or the demo's first run cannot" \
     "compile DeepSpeed's CPU ops)" >&2
exit 0
