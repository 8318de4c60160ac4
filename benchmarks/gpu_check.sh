#!/usr/bin/env bash
# Every GPU benchmark of issue #11 (speed), in sequence, on one CUDA GPU (H100 / H200).
#
#   bash benchmarks/gpu_check.sh [LOG]
#
# Run from the repository root. Everything is printed and appended to LOG (default
# $OUT/gpu_check.log when OUT is set, else ./gpu_check.log). Rows, in this order:
#   1. nvidia-smi, torch / CUDA versions, commit
#   2. inference, eager, bf16 autocast: ViT-L/16 and ViT-H/14 (Virchow2 config), ours vs timm,
#      batch 128, fraction of the measured bf16 matmul peak      (goals: >= 0.60 of peak, >= 1.0x timm)
#   3. DINOv2 training step, ViT-L/14, batch 32, bf16 autocast, drop path 0.3, ours vs lightly + timm,
#      images/s and peak fraction                                (goals: >= 0.45 of peak, >= 1.0x the peer)
#   4. inference as in 2 with torch.compile (both sides, mode "default"), one process per model
#   5. the DINOv2 step at drop path 0.0 (nominal and executed FLOPs agree)
# Each row has its own time limit (9.5 minutes in all; an estimated 5-8 minutes on one H100, not yet
# measured: compilation dominates); the script exits non-zero if any row fails or times out.
#
# Environment: PYTHON (default .venv/bin/python when present, else python);
# GPU_CHECK_DRY_RUN=1 validates every benchmark command line (--parse-only) without a GPU.

set -uo pipefail

if [[ -n "${PYTHON:-}" ]]; then
    py="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
    py=.venv/bin/python
else
    py=python
fi
log="${1:-${OUT:+$OUT/}gpu_check.log}"
mkdir -p "$(dirname "$log")"
dry="${GPU_CHECK_DRY_RUN:-0}"
failed=()

say() { echo "$*" | tee -a "$log"; }

# run LIMIT_S NAME CMD...: one row, its output teed to the log, failure recorded.
run() {
    local limit="$1" name="$2"
    shift 2
    if [[ "$dry" == 1 ]]; then
        set -- "$@" --parse-only
        limit=120
    fi
    say ""
    say "=== $name ($(date -u +%H:%M:%S) UTC, limit ${limit}s)"
    say "+ $*"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    say "=== $name: exit $rc after $((SECONDS - start)) s"
    if [[ $rc -ne 0 ]]; then
        failed+=("$name (exit $rc)")
    fi
}

say "=== gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), log $log"
if [[ "$dry" != 1 ]]; then
    nvidia-smi 2>&1 | tee -a "$log" || failed+=("nvidia-smi")
    "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)" 2>&1 | tee -a "$log"
fi

infer=(--device cuda --batch 128 --warmup 3 --repeats 10 --iters 5)
dino=(--method dinov2 --device cuda --arch vit_large_patch14_dinov2 --batch 32 --warmup 2 --repeats 5)
# most important rows first; the limits add up to 9.5 minutes (one device command may run 10)
run 130 "inference eager" "$py" benchmarks/vit_vs_timm.py --models vit_large_patch16_224,virchow2 "${infer[@]}"
run 110 "dinov2 ViT-L/14 step, drop path 0.3" "$py" benchmarks/ssl_step.py "${dino[@]}" --drop-path 0.3
run 110 "inference torch.compile ViT-L/16" "$py" benchmarks/vit_vs_timm.py --models vit_large_patch16_224 "${infer[@]}" --compile
run 130 "inference torch.compile ViT-H/14 Virchow2" "$py" benchmarks/vit_vs_timm.py --models virchow2 "${infer[@]}" --compile
run 90 "dinov2 ViT-L/14 step, drop path 0.0" "$py" benchmarks/ssl_step.py "${dino[@]}" --drop-path 0.0

say ""
if [[ ${#failed[@]} -gt 0 ]]; then
    say "=== gpu_check FAILED: ${failed[*]}"
    exit 1
fi
say "=== gpu_check ok"
