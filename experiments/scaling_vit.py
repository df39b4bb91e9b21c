"""Median residual ratio of ViT-Base / Large / Huge on COCO 2017 validation images.

    python experiments/scaling_vit.py                      # needs the hub and tensorflow-cpu for COCO
    python experiments/scaling_vit.py --images path/to/folder
    python experiments/scaling_vit.py --tiny --out runs/scaling_vit_tiny   # offline smoke run

Quality of the oracle: top-1 agreement with the full model (classifier
checkpoints) and final-embedding cosine. A rerun skips the models already done.
"""
import argparse
import tempfile

import numpy as np

from radial_jax.data import coco_validation, image_folder
from radial_jax.profiling.scaling import run_scaling

VIT_MODELS = ["google/vit-base-patch16-224", "google/vit-large-patch16-224", "google/vit-huge-patch14-224-in21k"]


def tiny_checkpoints(root):
    import torch
    from transformers import ViTConfig, ViTForImageClassification
    paths = []
    for i, (h, n) in enumerate([(32, 2), (64, 4), (96, 6)]):
        torch.manual_seed(i)
        cfg = ViTConfig(hidden_size=h, num_hidden_layers=n, num_attention_heads=4, intermediate_size=4 * h,
                        image_size=32, patch_size=8, id2label={j: str(j) for j in range(10)})
        ViTForImageClassification(cfg).save_pretrained(f"{root}/tiny-vit-{h}")
        paths.append(f"{root}/tiny-vit-{h}")
    return paths


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=VIT_MODELS)
    ap.add_argument("--images", default=None, help="an image folder instead of COCO")
    ap.add_argument("--max-images", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--thresholds", default="0,0.01,0.02,0.05,0.1,0.2")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default="results/scaling_vit")
    ap.add_argument("--tiny", action="store_true", help="offline smoke run: random tiny ViTs, random images")
    args = ap.parse_args()
    models = tiny_checkpoints(tempfile.mkdtemp()) if args.tiny else args.models

    def make_batches(model):
        size = model.config.image_size
        if args.tiny:
            rng = np.random.default_rng(0)
            batches = [rng.normal(size=(8, 3, size, size)).astype(np.float32) for _ in range(2)]
        elif args.images:
            batches = list(image_folder(args.images, size, limit=args.max_images, batch_size=args.batch_size))
        else:
            batches = list(coco_validation(size, limit=args.max_images, batch_size=args.batch_size))
        return batches, batches

    data_name = "random" if args.tiny else args.images or "coco-2017-validation"
    rows = run_scaling(models, make_batches, args.out, thresholds=[float(t) for t in args.thresholds.split(",")],
                       dtype=args.dtype, data_name=data_name)
    for r in rows:
        print(f"{r['model']:<40}{r['num_params'] / 1e6:>10.0f}M  median ratio_out {r['median_ratio_out']:.4f}")
    print(f"results in {args.out}/ (results.json, results.csv, scaling.png)")


if __name__ == "__main__":
    main()
