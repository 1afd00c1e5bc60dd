#!/usr/bin/env bash
# Everything the GPU-speed issue measures, in parts that each fit a 10-minute command on the lent GPU machine.
#
#   bash benchmarks/gpu_suite.sh tests   OUT   # GPU tests: kernels vs references, compile vs eager (~1.5 min)
#   bash benchmarks/gpu_suite.sh table   OUT   # ours vs transformers, one invocation, the table (~6 min)
#   bash benchmarks/gpu_suite.sh long    OUT   # longest context, batch 1, full checkpointing (~7 min)
#   bash benchmarks/gpu_suite.sh profile OUT   # top kernels of the compiled bench 4 x 4096 step (~1.5 min)
#   bash benchmarks/gpu_suite.sh scan    OUT   # Triton scan vs mamba-ssm, kernels alone (~2 min)
#   bash benchmarks/gpu_suite.sh scan-steps OUT  # training steps with each scan and deterministic (~9 min)
#   bash benchmarks/gpu_suite.sh determinism OUT # two fresh 20-step runs, deterministic and not (~5 min)
#
# OUT (default $OUT, else runs/gpu_suite) receives the Markdown tables and logs. Wheels: install them first
# (README, Benchmarks). Every run has its own timeout inside bench_vs_hf.py, and rows are written as they come.
set -u
part=${1:?usage: gpu_suite.sh tests|table|long|profile|scan|scan-steps|determinism [OUT]}
out=${2:-${OUT:-runs/gpu_suite}}
mkdir -p "$out"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
py=${PYTHON:-python3}
case $part in
  tests)
    $py -m pytest -q -p no:cacheprovider -rfE tests/test_jamba_kernels_ref.py tests/test_jamba_speed_paths.py \
      tests/test_jamba_scan_triton.py tests/test_parallel_deepspeed.py::test_bf16_autocast_training_through_deepspeed_gpu \
      > "$out/gpu_tests.txt" 2>&1
    grep -E "passed|failed|FAILED|Error" "$out/gpu_tests.txt" | tail -20
    ;;
  table)
    $py benchmarks/bench_vs_hf.py --steps 8 --timeout 170 --out "$out/vs_hf.md" --runs \
      bench:4:4096@hf,ours-compile bench:2:4096@hf,ours-compile bench:4:4096:ckpt@hf,ours-compile \
      bench-426m:8:2048@hf,ours,ours-compile 2>&1 | grep -E "^\||speed|GPU|rror"
    ;;
  long)
    $py benchmarks/bench_vs_hf.py --steps 4 --timeout 150 --out "$out/long.md" --runs \
      bench:1:32768:ckpt@hf bench:1:65536:ckpt@hf \
      bench:1:131072:ckpt@ours-compile \
      bench:1:196608:ckpt:ff_chunk_size=16384:residual_in_fp32=false@ours-compile \
      bench:1:262144:ckpt:ff_chunk_size=16384:residual_in_fp32=false@ours-compile 2>&1 | grep -E "^\||GPU|rror"
    ;;
  profile)
    $py benchmarks/gpu_profile.py --preset bench --batch 4 --seq 4096 --compile --rows 60 > "$out/profile.txt" 2>&1
    grep -E "step|Self CUDA time" "$out/profile.txt"
    ;;
  scan)
    $py benchmarks/gpu_scan.py --reps 10 --out "$out/scan.md" --tilings default save_y=0 2>&1 | grep -E "^\||rror"
    ;;
  scan-steps)
    $py benchmarks/bench_vs_hf.py --steps 8 --timeout 170 --out "$out/scan_steps.md" --runs \
      bench:4:4096@hf,ours-compile bench:4:4096:scan_backend=triton@ours-compile,ours-compile-det \
      bench-426m:8:2048@hf,ours-compile bench-426m:8:2048:scan_backend=triton@ours-compile,ours-compile-det \
      2>&1 | grep -E "^\||speed|GPU|rror"
    ;;
  determinism)
    $py benchmarks/gpu_determinism.py --model bench-426m --steps 20 --root runs/determinism \
      --out "$out/determinism.md" -- data.seq_len=2048 data.micro_batch_size=8 2>&1 | tail -12
    ;;
  *)
    echo "unknown part $part (tests|table|long|profile|scan|scan-steps|determinism)" >&2
    exit 2
    ;;
esac
