#!/bin/bash
# One device call: correctness, then our figures, then the peers'. Logs land in $OUT.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PYTHONPATH
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
exec > >(tee $OUT/run.log) 2>&1  # everything printed also lands in $OUT: a call cut at its time limit keeps it
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site; fi
# The default fits one 10-minute call (check + kernels alone take ~6 minutes); peers in a second call.
STAGES=${STAGES:-"check kernels thr lat"}
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.max.sm,clocks.max.mem,power.limit --format=csv,noheader
# SM clock, power and temperature once a second for the whole call (gpu-8b-thr moved by 6-14% between
# back-to-back processes in session 9, with no log of the clocks under load).
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu \
  --format=csv,noheader -l 1 > $OUT/clocks.csv 2>&1 & CLOCKS=$!
Q=$PWD/benchmarks/configs/qwen3-0.6b; L=$PWD/benchmarks/configs/llama-3.1-8b
# An A/B variant: "VAR=value+VAR2=value" sets variables; BASEDIR=dir runs the pagellm package found there
# (e.g. a copy of an older commit's, `git archive <commit> pagellm | tar -x -C dir`) instead of this one.
variant() { local v=$1 dir=$PWD; shift; [[ $v == BASEDIR=* ]] && dir=$PWD/${v#BASEDIR=}; (cd $dir && PYTHONPATH=$dir:$PYTHONPATH env ${v//+/ } "$@"); }
R=$PWD
for s in $STAGES; do case $s in
check) timeout 240 python3 benchmarks/gpu/check_backends.py 2>&1 | tee $OUT/check.log | grep -E "PASS|FAIL|Error|error" ;;
# Every test file with kernel or GPU tests, one process each at once: Triton's compiles (most of the
# time) run on the host's cores in parallel.
kernels) pids=""; for f in triton_kernels fused_kernels sampler skinny_gemm gumbel_kernel sampling_kernels decode_graph_inputs \
                  logits_into_buffer pdl embeddings moe; do
           (timeout ${KERNELS_TIMEOUT:-400} python3 -m pytest -q tests/test_$f.py > $OUT/test_$f.log 2>&1; echo "test_$f.py: $(tail -1 $OUT/test_$f.log)") & pids="$pids $!"
         done; wait $pids; grep -h "^FAILED\|^ERROR" $OUT/test_*.log | head -20 ;;
watch) TRITON_CACHE_DIR=$(mktemp -d) timeout 200 python3 benchmarks/gpu/compile_watch.py --model $Q --load-format dummy --dtype bfloat16 --workload gpu-thr --max-model-len 4096 > $OUT/watch.log 2>&1
       grep -n "engine ready\|Throughput" $OUT/watch.log; sed -n '/engine ready/,$p' $OUT/watch.log | grep -c "^\[compile" ;;
samptest) timeout 200 python3 -m pytest -q tests/test_sampling_kernels.py tests/test_gumbel_kernel.py tests/test_sampler.py 2>&1 | tail -3 ;;
samp) timeout 150 python3 benchmarks/kernels/bench_sampling.py --samplers new cdf 2>&1 | tee $OUT/samp.log | tail -14 ;;
gemm) timeout 280 python3 benchmarks/kernels/bench_gemm.py --model llama-8b --rows 1 16 2>&1 | tee $OUT/gemm8b.log | sed -n '/^rows/,$p'
      timeout 200 python3 benchmarks/kernels/bench_gemm.py --model qwen3-0.6b --rows 1 16 2>&1 | tee $OUT/gemmq.log | sed -n '/^rows/,$p' ;;
gateup) timeout 200 python3 benchmarks/kernels/bench_gemm.py --model llama-8b --rows 1 --only gate_up --top 14 $(for c in 16x16x128w4s4 16x16x256w4s4 16x16x256w4s6 16x16x512w4s3 16x32x128w4s4 16x32x256w4s4 16x32x256w4s6 16x64x128w4s4 16x64x128w4s6 16x64x256w4s4 16x128x64w4s4 16x128x128w8s4 1x16x512w4s1 1x32x256w8s1; do echo --config $c; done) 2>&1 | tee $OUT/gateup.log | sed -n '/^M=/,$p' ;;
deep) C() { for c in "$@"; do echo --config $c; done; }  # deeper weight pipelines than the s3-s5 of the wide sweep (shared memory checked offline)
      timeout 200 python3 benchmarks/kernels/bench_gemm.py --model llama-8b --rows 1 --only qkv o --top 12 $(C 16x64x256w4s4 16x64x256w4s5 16x64x256w4s6 16x64x128w4s8 16x64x128w4s10 16x32x256w4s8 16x64x512w4s3 16x32x256w4s5 16x32x256w4s7 16x32x256w4s9 16x32x512w4s4 16x32x128w4s12) 2>&1 | tee $OUT/deep.log | sed -n '/^M=/,$p'
      timeout 200 python3 benchmarks/kernels/bench_gemm.py --model llama-8b --rows 1 --only down down_act --top 8 $(C 16x32x256w4s5 16x32x256w4s7 16x32x256w4s9 16x16x256w4s8 16x16x512w4s5 16x32x128w4s12 1x32x512w4s1k2) 2>&1 | tee $OUT/deep_down.log | sed -n '/^M=/,$p' ;;
latab) i=0; for v in ${AB:-BASE=1 PAGELLM_SKINNY_GEMM=0 BASE=1 PAGELLM_SKINNY_GEMM=0}; do i=$((i+1)); variant $v timeout 150 python3 -m pagellm.benchmarks.latency --model $L --load-format dummy --dtype bfloat16 --input-len 512 --output-len 128 --num-iters 3 --max-model-len 4096 --output-json $OUT/latab$i.json > $OUT/latab$i.log 2>&1
       echo "gpu-lat $v: TPOT $(python3 -c "import json; r = json.load(open('$OUT/latab$i.json')); print('%.3f ms (%s)' % (r['tpot_ms_median'], ' '.join('%.3f' % t for t in r['tpot_ms_all'])))" 2>&1 | tail -1)"; done ;;
profab) i=0; for v in ${AB:-BASE=1}; do i=$((i+1)); mkdir -p $OUT/prof$i; echo "== profile $v"
        OUT=$OUT/prof$i variant $v timeout 200 python3 $R/benchmarks/gpu/profile_steps.py $L --latency --windows 40:60 > $OUT/prof$i/log 2>&1
        python3 benchmarks/gpu/trace_gaps.py $OUT/prof$i/window0_steps40-60.json.gz --top 10; done ;;
gemmdown) timeout 250 python3 benchmarks/kernels/bench_gemm.py --model llama-8b --rows 1 --only down --top 6 2>&1 | tee $OUT/gemmdown.log | sed -n '/^M=/,$p' ;;
host) timeout 200 python3 benchmarks/gpu/host_profile.py $Q 2>&1 | tee $OUT/host.log | grep -v INFO | head -120 ;;
thr1) timeout 200 python3 -m pagellm.benchmarks.throughput --model $Q --load-format dummy --dtype bfloat16 --workload gpu-thr --max-model-len 4096 --output-json $OUT/thr.json 2>&1 | tee $OUT/thr.log | grep -E "Throughput|KV cache:|captured" ;;
gemmbig) timeout 280 python3 benchmarks/kernels/bench_gemm.py --model qwen3-0.6b --rows 64 176 256 --top 2 2>&1 | tee $OUT/gemmbig.log | sed -n '/^rows/,$p' ;;
proflat) PROF_TOP=40 timeout 200 python3 benchmarks/gpu/profile_steps.py $L --latency --windows 40:100 2>&1 | tee $OUT/proflat.log | grep -v INFO ;;
attn1) timeout 120 python3 benchmarks/kernels/bench_attention.py --num-heads 32 --num-kv-heads 8 --batches 1 2 4 --contexts 640 1024 --splits 1 2 4 8 16 2>&1 | tee $OUT/attn1.log ;;
cov) timeout 250 python3 -m pytest -q -x tests/test_model_coverage.py tests/test_moe.py 2>&1 | tail -2 ;;
attn) timeout 200 python3 benchmarks/kernels/bench_attention.py --num-heads 16 --num-kv-heads 8 --batches 64 128 256 --contexts 1024 2048 $(for c in 16x64x4x2 16x32x4x2 16x64x4x3 16x64x2x2 16x128x4x2 16x128x8x2 16x64x8x2 16x32x2x2 16x128x4x3; do echo --config $c; done) 2>&1 | tee $OUT/attn.log ;;
thr) timeout 200 python3 -m pagellm.benchmarks.throughput --model $Q --load-format dummy --dtype bfloat16 --workload gpu-thr --max-model-len 4096 --output-json $OUT/thr.json $PROFILE 2>&1 | tee $OUT/thr.log | grep -E "Throughput|KV cache:|captured|memory profile"
     timeout 120 python3 -m pagellm.benchmarks.throughput --model $Q --load-format dummy --dtype bfloat16 --workload gpu-thr --num-prompts 64 --output-len 512 --max-model-len 4096 2>&1 | tail -1 ;;
thr8b) timeout 200 python3 -m pagellm.benchmarks.throughput --model $L --load-format dummy --dtype bfloat16 --workload gpu-8b-thr --max-model-len 4096 --output-json $OUT/thr8b.json 2>&1 | tail -1
       timeout 120 python3 -m pagellm.benchmarks.throughput --model $L --load-format dummy --dtype bfloat16 --workload gpu-8b-thr --num-prompts 64 --output-len 214 --max-model-len 4096 2>&1 | tail -1 ;;
lat0) PAGELLM_SKINNY_GEMM=0 timeout 200 python3 -m pagellm.benchmarks.latency --model $L --load-format dummy --dtype bfloat16 --input-len 512 --output-len 128 --num-iters 3 --max-model-len 4096 2>&1 | tail -1 ;;
lat) timeout 200 python3 -m pagellm.benchmarks.latency --model $L --load-format dummy --dtype bfloat16 --input-len 512 --output-len 128 --num-iters 3 --max-model-len 4096 --output-json $OUT/lat.json 2>&1 | tee $OUT/lat.log | tail -1 ;;
start) s0=$(date +%s.%N); timeout 120 python3 benchmarks/gpu/startup.py $L > $OUT/start.log 2>&1; s1=$(date +%s.%N); python3 -c "print('gpu-start: %.1f s' % ($s1 - $s0))"; tail -1 $OUT/start.log ;;
prof) timeout 300 python3 benchmarks/gpu/profile_steps.py $Q ${PROF_ARGS:-} 2>&1 | tee $OUT/prof.log | grep -v INFO ;;
ragged) timeout 150 python3 benchmarks/kernels/bench_attention.py --num-heads 16 --num-kv-heads 8 --gpu-thr-steps 50 200 400 600 800 950 2>&1 | tee $OUT/ragged.log
        timeout 100 python3 benchmarks/kernels/bench_attention.py --num-heads 32 --num-kv-heads 8 --gpu-thr-steps 200 600 2>&1 | tail -2 ;;
splits) timeout 200 python3 benchmarks/kernels/bench_attention.py --num-heads 16 --num-kv-heads 8 --batches 8 16 24 32 48 64 96 128 --contexts 1024 2048 --splits 1 2 4 8 2>&1 | tee $OUT/splits.log ;;
fused) timeout 200 python3 -m pytest -q tests/test_fused_kernels.py tests/test_sampler.py 2>&1 | tail -2 ;;
mixed) timeout 150 python3 benchmarks/kernels/bench_mixed_attention.py --decodes 0 100 200 --config 128x32x8x2 --config 64x32x4x2 --config 64x64x4x2 2>&1 | tee $OUT/mixed.log ;;
pfx) for f in "" --no-enable-prefix-caching; do timeout 120 python3 -m pagellm.benchmarks.throughput --model $Q --load-format dummy --dtype bfloat16 --workload shared-prefix --max-model-len 4096 $f 2>&1 | grep Throughput; done ;;
ab7) for i in 1 2; do for v in BASE=1 ${AB:-PAGELLM_PAD_LOGIT_ROWS=0 PAGELLM_PDL=all}; do echo "gpu-thr $v: $(variant $v timeout 100 python3 -m pagellm.benchmarks.throughput --model $Q --load-format dummy --dtype bfloat16 --workload gpu-thr --max-model-len 4096 2>&1 | tail -1)"; done; done ;;
peers8b) timeout 150 python3 benchmarks/gpu/hf_peer.py throughput --config $L --workload gpu-8b-thr --num-prompts 64 --output-len 214 2>&1 | tail -1 ;;
peers) timeout 150 python3 benchmarks/gpu/hf_peer.py throughput --config $Q --num-prompts 64 --output-len 512 2>&1 | tail -1
       timeout 100 python3 benchmarks/gpu/hf_peer.py latency --config $L 2>&1 | tail -1 ;;
esac; done
kill $CLOCKS 2>/dev/null; echo "clocks: $OUT/clocks.csv (lowest SM clock $(cut -d, -f2 $OUT/clocks.csv | sort -n | head -1 | tr -d ' '))"
