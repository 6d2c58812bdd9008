#!/usr/bin/env bash
# Batched generation on the GPU machine, in stages that fit the device tool (64 MiB carried per call, 10 minutes
# per command). State lives in /tmp/w while the machine stays warm; long stages run detached and `collect` returns
# them, so calls that carry the Qwen GGUF pieces run while the planted-shape benchmarks time.
#   bash benchmarks/gpu_batching.sh setup        (carry .whl .dev): wheels, the batched-graphs check, then the planted
#                                                7B/0.5B single-call bench and throughput, detached
#   bash benchmarks/gpu_batching.sh chunk NN     (carry .cNN): a GGUF piece; a model's last piece starts its conversion
#   bash benchmarks/gpu_batching.sh collect STAGE [SECONDS]: wait for a detached stage, return its files
#   bash benchmarks/gpu_batching.sh qwen         the real pair's single-call bench and throughput, detached
set -uo pipefail
W=/tmp/w
mkdir -p $W/chunks $W/gguf
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD TOKENIZERS_PARALLELISM=false
DRAFT=qwen2.5-coder-0.5b-instruct.gguf
TARGET=qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
LAST_DRAFT=${LAST_DRAFT:-08} LAST_TARGET=${LAST_TARGET:-28}
detach() {  # detach STAGE: run this script's STAGE in the background, its $OUT in $W/STAGE, from a copy of the tree
  # (every device call copies the working tree in again: a stage importing from it mid-copy can fail)
  mkdir -p $W/$1 $W/src-$1 && tar --exclude='./.c[0-9][0-9]' -cf - . | tar -xf - -C $W/src-$1
  (cd $W/src-$1 && OUT=$W/$1 PYTHONPATH=/tmp/site:$W/src-$1 setsid nohup bash -c \
    "bash benchmarks/gpu_batching.sh $1-run; touch $W/$1/.done" > $W/$1/run.log 2>&1 < /dev/null &) && echo "started $1"
}
case "$1" in
  setup)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    nvidia-smi -L; python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"
    mkdir -p $W/tokenizer && cp .dev/tokenizer/* $W/tokenizer/ && gunzip -f $W/tokenizer/*.gz; cp .dev/*.jsonl $W/
    timeout 420 python3 benchmarks/check_batched_gpu.py 2>&1 | grep --line-buffered -v "Loading\|Writing" | tee $OUT/check.log
    grep -q "FAILURES 0" $OUT/check.log && detach planted ;;
  planted-run)
    A="--synthetic qwen2.5-7b:qwen2.5-0.5b --max-tokens 128 --max-step-tokens 24"
    python3 -m langchain_specguard.apps.bench $A --agreement 1,0.97 --limit 3 --methods target-static,specguard \
      --out $OUT/bench.json 2>&1 | grep --line-buffered -v "Loading\|Writing" | tee $OUT/bench.log
    python3 -m langchain_specguard.apps.throughput $A --agreement 0.97 --concurrency 1,4,8,16,32 \
      --methods generate,specguard,serial,sd --serial-at 8 --sd-at 1,8,32 --out $OUT/throughput.json \
      --plot $OUT/throughput.png 2>&1 | grep --line-buffered -v "Loading\|Writing" | tee $OUT/throughput.log ;;
  chunk)
    cp .c$2/* $W/chunks/ && ls $W/chunks | wc -l
    case $2 in $LAST_DRAFT) bash benchmarks/gpu_batching.sh convert draft ;; $LAST_TARGET) bash benchmarks/gpu_batching.sh convert target ;; esac ;;
  convert)
    name=$([ "$2" = draft ] && echo $DRAFT || echo $TARGET)
    setsid nohup bash -c "cat $W/chunks/$name.part-* > $W/gguf/$name && rm -f $W/chunks/$name.part-* && \
      sha256sum $W/gguf/$name && OMP_NUM_THREADS=4 python3 -m research.gsm8k.convert --gguf-dir $W/gguf \
      --tokenizer $W/tokenizer --out $W --only $2 && touch $W/$2/.done" > $W/convert_$2.log 2>&1 < /dev/null &
    echo "converting $2" ;;
  qwen)
    for r in target draft; do for _ in $(seq 240); do [ -f $W/$r/.done ] && break; sleep 2; done; done
    cat $W/convert_*.log | grep -v "Converting\|Loading\|Writing"; detach qwen ;;
  qwen-run)
    for _ in $(seq 1200); do [ -f $W/planted/.done ] && break; sleep 1; done  # one benchmark on the GPU at a time
    A="--target $W/target --draft $W/draft --data $W/test.jsonl --max-tokens 256 --stop Done."
    python3 -m langchain_specguard.apps.bench $A --limit 3 --methods target-static,specguard --step-delimiters '\n' \
      --max-step-tokens 48 --out $OUT/bench.json 2>&1 | grep --line-buffered -v "Loading\|Writing" | tee $OUT/bench.log
    python3 -m langchain_specguard.apps.throughput $A --concurrency 1,4,8,16,32 \
      --methods generate,specguard,serial,sd --serial-at 8 --sd-at 1,8,32 --out $OUT/throughput.json \
      --plot $OUT/throughput.png 2>&1 | grep --line-buffered -v "Loading\|Writing" | tee $OUT/throughput.log
    python3 -m langchain_specguard.apps.bench --synthetic qwen2.5-7b:qwen2.5-0.5b --max-tokens 128 --max-step-tokens 24 \
      --agreement 1,0.97 --limit 3 --methods target-static,specguard --out $OUT/planted_bench.json 2>&1 \
      | grep --line-buffered -v "Loading\|Writing" | tee $OUT/planted_bench.log ;;
  collect)
    for _ in $(seq ${3:-560}); do [ -f $W/$2/.done ] && break; sleep 1; done
    [ -f $W/$2/.done ] || echo "$2 still running"
    cp $W/$2/*.json $W/$2/*.png $W/$2/*.log $OUT/ 2>/dev/null; tail -45 $W/$2/run.log ;;
esac
