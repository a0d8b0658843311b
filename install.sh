#!/usr/bin/env bash
# Installs granucap into the active Python environment on a fresh machine: system packages (apt), the CPU
# torch from local disk first (so nothing pulls a multi-GB CUDA build), the package with its test extras,
# and the NLTK data the offline extractor needs. Idempotent: rerunning skips what is already there.
#   GRANUCAP_TORCH=skip bash install.sh   keep the torch you have (e.g. a CUDA build on a GPU machine)
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python}"
# chromium: headless screenshots of `granucap inspect --html` in tests/test_inspect.py
APT_PACKAGES=(wordnet-base wordnet-sense-index chromium)

say() { echo "[install] $*" >&2; }

# 1. system packages: WordNet for the offline entity extractor, Chromium for the HTML page test
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    say "apt-get install ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    say "warning: no apt-get; install WordNet 3.0 yourself (packages ${missing[*]}) for the nltk extractor"
  fi
fi

# 2. torch before anything that depends on it
if [ "${GRANUCAP_TORCH:-}" != "skip" ]; then
  if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    say "pip install torch==2.13.0 (CPU build)"
    "$PY" -m pip install -q "torch==2.13.0"
  fi
fi

# 3. the package, editable, with test extras; the POS tagger model ships in textblob-aptagger (data only)
say "pip install -e .[test]"
"$PY" -m pip install -q -e ".[test]"
"$PY" -m pip install -q --no-deps "textblob-aptagger==0.2.0"

# 4. NLTK data (WordNet from the apt packages, the tagger converted to NLTK's JSON format)
"$PY" -m engine.nltk_data install
say "done: $("$PY" -m engine.cli --version)"
