#!/usr/bin/env bash
# The accuracy testbed on the GPU machine, in stages that fit the device tool's limits (64 MiB carried
# per call, 10 minutes per command): the Gemma 3 270M GGUF travels in five parts (.gpu1...5, split with
# `split -n 5 -d`), then train, then evaluate. State lives in /tmp/w while the machine stays warm.
#   bash research/accuracy/gpu.sh part 1 | ... | part 4 | train | draft | eval
set -uo pipefail
W=/tmp/w
mkdir -p $W/gguf
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
case "$1" in
  part)
    cp .gpu$2/part0$(( $2 - 1 )) $W/ && ls -la $W
    if [ "$2" = 1 ]; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
      nvidia-smi -L; python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"
    fi ;;
  train|all)
    cp .gpu5/part04 $W/ && cat $W/part00 $W/part01 $W/part02 $W/part03 $W/part04 > $W/gguf/gemma-3-270m-q4_k_m.gguf
    echo "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818  $W/gguf/gemma-3-270m-q4_k_m.gguf" | sha256sum -c - || exit 1
    mkdir -p $W/tok && gunzip -c .gpu5/tokenizer.json.gz > $W/tok/tokenizer.json && cp .gpu5/tokenizer_config.json $W/tok/
    stage=$1; shift
    python3 -m research.accuracy.train --model $W/gguf --gguf gemma-3-270m-q4_k_m.gguf --tokenizer $W/tok --out $W/run \
      ${TRAIN_ARGS:-} 2>&1 | grep -v Writing | tee $OUT/train.log
    cp $W/run/train_report.json $OUT/
    [ "$stage" = all ] || exit 0
    nvidia-cuda-mps-control -d 2>/dev/null && echo "MPS on: worker processes share the GPU without time-slicing"
    python3 -m research.accuracy.evaluate --target $W/run/target --draft $W/run/draft --out $OUT/eval.json \
      --deadline $(( ${BUDGET:-560} - SECONDS )) "$@" 2>&1 | tee $OUT/eval.log | grep -v "jobs," ; tail -3 $OUT/eval.log ;;
  draft)  # a new draft from the target trained above
    python3 -m research.accuracy.train --model $W/gguf --trained-target $W/run/target --out $W/run ${TRAIN_ARGS:-} \
      2>&1 | grep -v Writing | tee $OUT/train_draft.log
    cp $W/run/train_report.json $OUT/train_draft_report.json ;;
  eval)
    nvidia-cuda-mps-control -d 2>/dev/null && echo "MPS on: worker processes share the GPU without time-slicing"
    python3 -m research.accuracy.evaluate --target $W/run/target --draft $W/run/draft --out $OUT/eval.json "${@:2}" 2>&1 \
      | tee $OUT/eval.log | grep -v "jobs," ; tail -3 $OUT/eval.log ;;
esac
