#!/usr/bin/env bash
# Trains the shipped weights (models/<method>.pt, one model per method for all three modality pairs) on the
# training split of the Harvard AANLIB pairs (configs/aanlib_split.json holds the validation pairs out), then
# evaluates every method and the baselines on the validation split into one table (docs/README.md, "Shipped
# weights"). CPU schedule: the methods' default crops and batch (configs/methods/<m>.json), more epochs; on a GPU
# add e.g. `--epochs 300 --patch_size "[256, 256]"` per method.
#
#   bash scripts/train_pretrained.sh [dataset_dir] [method ...]   # default: ../shared/data/aanlib, all four
#   bash scripts/train_pretrained.sh ../shared/data/aanlib eval   # only the validation table
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/aanlib}
shift || true
METHODS=${*:-dran mactfusion msgfusion bsafusion}
OUT=runs/pretrained
COMMON=(--dataset_dir "$DATA" --split_file configs/aanlib_split.json --seed 0)

train() {  # method, run folder under runs/pretrained, extra overrides... (a method's last stage is shipped)
    local m=$1 run=$2; shift 2
    echo "== training $m ($run): $* ($(date -u +%FT%TZ))"
    /usr/bin/time -f "$m ($run) training wall %e s" python -m monai.bundle run training --config_file configs/train.json \
        --method "$m" "${COMMON[@]}" --output_dir "$OUT/$run" "$@"
    # weights only, float16 storage (halves BSAFusion to ~20 MB); loads into the float32 network unchanged
    python - "$OUT/$run/model.pt" "models/$m.pt" <<'EOF'
import sys, torch
from scripts.io import save_state_dict
sd = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
sd = sd.get("model", sd)
sd = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
save_state_dict(sd, sys.argv[2])
print(f"wrote {sys.argv[2]} ({sum(v.numel() for v in sd.values()):,} values)")
EOF
}

for m in $METHODS; do
    [ "$m" = eval ] && continue
    case $m in
        dran)       train dran dran --epochs 80 --learning_rate 5e-4 --val_interval 20 ;;
        mactfusion) train mactfusion mactfusion --epochs 96 --val_interval 4
                    # then whole images (SAFM restyles with whole-map statistics); the best epoch (2 of 3) is shipped
                    train mactfusion mactfusion_whole --init_ckpt "$OUT/mactfusion/model.pt" --patch_size "[256, 256]" \
                        --batch_size 2 --learning_rate 1e-4 --lr_schedule cosine --epochs 3 --val_interval 1 ;;
        msgfusion)  train msgfusion msgfusion --epochs 20 --val_interval 10
                    # then whole images (its Fourier unit is global) scored as the metrics see them (clamped)
                    train msgfusion msgfusion_clamp --init_ckpt "$OUT/msgfusion/model.pt" --patch_size "[256, 256]" \
                        --batch_size 2 --learning_rate 1e-4 --lr_schedule cosine --epochs 8 --val_interval 2 \
                        --loss_overrides "{'clamp_output': True}"
                    train msgfusion msgfusion_clamp2 --init_ckpt "$OUT/msgfusion_clamp/model.pt" --patch_size "[256, 256]" \
                        --batch_size 2 --learning_rate 5e-5 --lr_schedule cosine --epochs 8 --val_interval 2 \
                        --loss_overrides "{'clamp_output': True}"
                    train msgfusion msgfusion_clamp3 --init_ckpt "$OUT/msgfusion_clamp2/model.pt" --patch_size "[256, 256]" \
                        --batch_size 2 --learning_rate 5e-5 --lr_schedule cosine --epochs 8 --val_interval 2 \
                        --loss_overrides "{'clamp_output': True}" ;;
        bsafusion)  train bsafusion bsafusion --epochs 4 --val_interval 2 \
                        --network_overrides "{'zero_init_fields': True}"
                    # then whole images (its cross-attention softmax runs over all pixels: crops leave a grey
                    # background at 256x256)
                    train bsafusion bsafusion_whole --init_ckpt "$OUT/bsafusion/model.pt" --patch_size "[256, 256]" \
                        --batch_size 2 --learning_rate 1e-4 --lr_schedule cosine --epochs 5 --val_interval 1 \
                        --network_overrides "{'zero_init_fields': True}"
                    train bsafusion bsafusion_whole2 --init_ckpt "$OUT/bsafusion_whole/model.pt" \
                        --patch_size "[256, 256]" --batch_size 2 --learning_rate 5e-5 --lr_schedule cosine --epochs 5 \
                        --val_interval 1 --network_overrides "{'zero_init_fields': True}"
                    train bsafusion bsafusion_whole3 --init_ckpt "$OUT/bsafusion_whole2/model.pt" \
                        --patch_size "[256, 256]" --batch_size 2 --learning_rate 2.5e-5 --lr_schedule cosine --epochs 5 \
                        --val_interval 1 --network_overrides "{'zero_init_fields': True}" ;;
        *) echo "unknown method $m" >&2; exit 2 ;;
    esac
done

# validation table: baselines + shipped weights, one folder (metrics_summary.md)
for m in average max laplacian_pyramid dran mactfusion msgfusion bsafusion; do
    python -m monai.bundle run evaluating --config_file configs/evaluate.json "${COMMON[@]}" --split validation \
        --method "$m" --truth_luminance studio --output_dir "$OUT/eval"
done
