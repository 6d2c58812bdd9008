#!/usr/bin/env bash
# GSM8K on the packaged Qwen2.5-Coder pair, on the GPU machine, in stages that fit the device tool
# (64 MiB carried per call, 10 minutes per command). State lives in /tmp/w while the machine stays warm;
# long stages run in the background (setsid) and later calls collect them, so no call idles the machine.
#   split each GGUF (draft first) into 56.5 MiB pieces, one folder .cNN each (a piece plus the working
#   tree stays under the 64 MiB a call carries): .c00-.c08 the draft, .c09-.c27 the target
#   bash research/gsm8k/gpu.sh setup            (carry .whl .dev; starts the planted-shape bench)
#   bash research/gsm8k/gpu.sh chunk NN         (carry .cNN), one call per chunk folder; the last piece
#                                                of each model starts its conversion in the background
#   bash research/gsm8k/gpu.sh ready            (waits for both conversions and the planted bench, returns it,
#                                                starts the test run)
#   bash research/gsm8k/gpu.sh collect          (waits for the test run, returns it), then ... bench
#   smoke | train | test | bench | synthetic run a stage in the foreground
set -uo pipefail
W=/tmp/w
mkdir -p $W/chunks $W/gguf
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD TOKENIZERS_PARALLELISM=false
# the machine has no .git: the bench records SPECGUARD_COMMIT, which the calling command sets
# a worker holds 5.5-7 GiB (both models, caches, a 48-problem generate() batch): 14 fit an H200, 10 an H100
GIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
WORKERS=${WORKERS:-$(( ${GIB:-81920} / 7700 < 14 ? ${GIB:-81920} / 7700 : 14 ))}
DRAFT=qwen2.5-coder-0.5b-instruct.gguf
TARGET=qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
LAST_DRAFT=08 LAST_TARGET=27
converted() {  # both models converted, or the conversion logs after 6 minutes
  for r in target draft; do for _ in $(seq 180); do [ -f $W/$r/.done ] && break; sleep 2; done; done
  [ -f $W/target/.done ] && [ -f $W/draft/.done ] || { cat $W/convert_*.log; echo "conversion not done"; exit 1; }
}
background() {  # background STAGE: run this script's STAGE detached, its $OUT in $W/STAGE
  mkdir -p $W/$1 && (OUT=$W/$1 setsid nohup bash -c "bash research/gsm8k/gpu.sh $1; touch $W/$1/.done" \
    > $W/$1/run.log 2>&1 < /dev/null &) && echo "started $1 in the background"
}
returned() {  # returned STAGE SECONDS: wait for a background stage, then copy what it wrote to $OUT
  for _ in $(seq $2); do [ -f $W/$1/.done ] && break; sleep 1; done
  [ -f $W/$1/.done ] || echo "$1 still running"; cp $W/$1/* $OUT/ 2>/dev/null; grep -v "Warning\|warn\|Loading weights" $W/$1/run.log | tail -40
}
case "$1" in
  setup)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    nvidia-smi -L; python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"
    cp -r .dev/tokenizer .dev/gsm8k $W/ && ls $W
    background synthetic ;;  # the GPU is otherwise idle while the pieces come in
  chunk)
    cp .c$2/* $W/chunks/ && ls $W/chunks | wc -l
    case $2 in $LAST_DRAFT) bash research/gsm8k/gpu.sh convert draft ;; $LAST_TARGET) bash research/gsm8k/gpu.sh convert target ;; esac ;;
  convert)  # few threads: the planted-shape bench may still be timing beside it
    name=$([ "$2" = draft ] && echo $DRAFT || echo $TARGET)
    setsid nohup bash -c "cat $W/chunks/$name.part-* > $W/gguf/$name && rm -f $W/chunks/$name.part-* && \
      sha256sum $W/gguf/$name && OMP_NUM_THREADS=4 python3 -m research.gsm8k.convert --gguf-dir $W/gguf \
      --tokenizer $W/tokenizer --out $W --only $2 && touch $W/$2/.done" > $W/convert_$2.log 2>&1 < /dev/null &
    echo "converting $2 in the background" ;;
  ready)
    returned synthetic ${WAIT:-400}
    [ -f $W/synthetic/.done ] || pkill -f "apps[.]bench --synthetic"  # never beside the test run: both OOM
    converted; cat $W/convert_*.log | grep -v "Converting\|Loading\|Writing"
    nvidia-cuda-mps-control -d 2>/dev/null && echo "MPS on"
    cp research/gsm8k/results/chosen.json $W/chosen.json; background test ;;
  collect)
    returned test ${WAIT:-580} ;;
  smoke)
    converted; cat $W/convert_*.log | grep -v Converting
    python3 -m research.gsm8k.run --pair-dir $W --data $W/gsm8k/train.jsonl --range 0:2 --methods research/gsm8k/sweep.json \
      --only target,target-engine,ratio-0.5-lines,both-0.5-lines --workers 3 --hf-batch 2 --max-tokens 96 --deadline 90 \
      --out $OUT/smoke.jsonl && python3 -m research.gsm8k.report $OUT/smoke.jsonl ;;
  train)
    python3 -m research.gsm8k.run --pair-dir $W --data $W/gsm8k/train.jsonl --range ${RANGE:-0:200} \
      --methods research/gsm8k/sweep.json --workers $WORKERS --deadline ${DEADLINE:-420} --out $OUT/train.jsonl \
      2>&1 | tee $OUT/train.log | grep -v "^\[" ; tail -2 $OUT/train.log
    cp $OUT/train.jsonl $W/train.jsonl
    python3 -m research.gsm8k.report $OUT/train.jsonl | tee $OUT/train_report.txt
    python3 -m research.gsm8k.report $OUT/train.jsonl --select research/gsm8k/sweep.json | tee $W/chosen.json $OUT/chosen.json ;;
  test)
    python3 -m research.gsm8k.plan $W/chosen.json > $W/test.json && cp $W/test.json $OUT/
    python3 -m research.gsm8k.run --pair-dir $W --data $W/gsm8k/test.jsonl --range ${RANGE:-0:600} --methods $W/test.json \
      --only ${ONLY:-target,draft,target-t0.7,specguard,specguard-t0.7,token-sd-t0.7} \
      --workers $WORKERS --deadline ${DEADLINE:-900} --out $OUT/test.jsonl 2>&1 | tee $OUT/test.log | grep -v "^\["
    tail -2 $OUT/test.log
    python3 -m research.gsm8k.report $OUT/test.jsonl | tee $OUT/test_report.txt ;;
  bench)  # the project's bench on the real pair: every method warmed for its shapes before timing
    echo quit | nvidia-cuda-mps-control 2>/dev/null  # timings from one process, without MPS in between
    python3 -m langchain_specguard.apps.bench --target $W/target --draft $W/draft --tokenizer $W/tokenizer \
      --data $W/gsm8k/test.jsonl --limit ${LIMIT:-10} --max-tokens 256 --stop "Done." \
      --methods target,target-static,assisted,specguard $(python3 -m research.gsm8k.plan --bench-args $W/chosen.json) \
      --out $OUT/bench_qwen_coder.json 2>&1 | tee $OUT/bench_qwen_coder.log | grep -v "Warning\|warn" ;;
  synthetic)
    python3 -m langchain_specguard.apps.bench --synthetic qwen2.5-7b:qwen2.5-0.5b --agreement ${AGREEMENT:-1,0.97,0} \
      --limit ${LIMIT:-3} --methods target,target-static,assisted,specguard --max-tokens 128 --max-step-tokens 24 \
      --out $OUT/bench_synthetic.json 2>&1 | tee $OUT/bench_synthetic.log | grep -v "Warning\|warn" ;;
esac
