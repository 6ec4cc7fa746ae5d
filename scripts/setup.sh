#!/usr/bin/env bash
# Set up what the suite needs, where it is missing (every step is skipped when already done):
#   1. Debian's offline Fashion-MNIST (apt-get install dataset-fashion-mnist; sudo when not root);
#   2. a virtual environment .venv with requirements.txt (and requirements-serve.txt and requirements-deploy.txt
#      with --serve), reinstalled
#      only when a requirements file changes.
# Needs only python3, apt and a network that reaches the package registries.
#   scripts/setup.sh            # for make demo
#   scripts/setup.sh --serve    # for make test: KServe, the Triton client, ONNX Runtime and OpenVINO as well
set -euo pipefail
cd "$(dirname "$0")/.."

SERVE=0
for arg in "$@"; do
    case "$arg" in
        --serve) SERVE=1 ;;
        *) echo "error: unknown argument $arg (usage: $0 [--serve])" >&2; exit 2 ;;
    esac
done
VENV=${VENV:-.venv}
PYTHON3=${PYTHON3:-python3}
DATASET_FILE=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

apt_install() {  # apt_install PACKAGE...: with sudo unless root; one error line when apt is not there
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    if ! command -v apt-get >/dev/null; then
        echo "error: $* missing and no apt-get here: install $* with this system's package manager" >&2
        exit 2
    fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

if [ ! -f "$DATASET_FILE" ]; then
    echo "setup: installing Debian's dataset-fashion-mnist (offline Fashion-MNIST)"
    apt_install dataset-fashion-mnist
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV"
    if ! "$PYTHON3" -m venv "$VENV" 2>/dev/null; then   # Debian ships venv's pip separately
        rm -rf "$VENV"
        apt_install python3-venv
        "$PYTHON3" -m venv "$VENV"
    fi
fi

requirements=(requirements.txt)
[ "$SERVE" = 1 ] && requirements+=(requirements-serve.txt requirements-deploy.txt)
# One stamp per requirements file installed, named by the file's hash: an edited file is installed again.
stamps=()
for r in "${requirements[@]}"; do stamps+=("$VENV/.installed-$r-$(sha256sum < "$r" | cut -c1-16)"); done
missing=0
for s in "${stamps[@]}"; do [ -f "$s" ] || missing=1; done
if [ "$missing" = 1 ]; then
    echo "setup: installing ${requirements[*]} into $VENV (torch is a large download the first time)"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    args=()
    for r in "${requirements[@]}"; do args+=(-r "$r"); done
    "$VENV/bin/python" -m pip install -q "${args[@]}"
    if [ "$SERVE" = 1 ]; then
        "$VENV/bin/python" -c "import kserve, tritonclient.http" \
            || { echo "error: KServe or the Triton client did not install (requirements-serve.txt)" >&2; exit 1; }
        "$VENV/bin/python" -c "import onnx, onnxruntime, openvino" \
            || { echo "error: onnx, onnxruntime or openvino did not install (requirements-deploy.txt)" >&2; exit 1; }
    fi
    touch "${stamps[@]}"
fi
