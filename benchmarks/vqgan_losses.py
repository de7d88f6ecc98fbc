"""MSE-only vs +perceptual vs +perceptual+GAN tokenizers at equal steps (issue 11, item 6).

Trains three tokenizers that differ only in ``loss.*`` (same data, initialisation, data order, steps), one after
another, then evaluates each on the test split with ``pipelines.evaluate`` (PSNR, rFID in the offline classifier
space and in the label-free contrastive space) and measures LPIPS of the reconstructions::

    OMP_NUM_THREADS=1 python benchmarks/vqgan_losses.py --out runs/vqgan_losses --steps 1500 \
        --json benchmarks/results/vqgan_losses.json

Defaults: CIFAR-10 at 32 px from the local parquet copy (``configs/tokenizer/cifar10_ema_deferred.yaml``'s data
section; this file is not shipped with the code: ``--config`` and overrides pick other data), the papers' network
at width 64, EMA VQ 512 x 64 with deferred quantization (a third of the steps continuous), batch 32, Adam 3e-4,
L2 reconstruction in every arm. ``+perceptual``: ``loss.perceptual_weight=1``; ``+GAN``: also a 3-layer PatchGAN,
hinge loss, ``loss.disc_weight=0.5`` with the adaptive weight, starting when quantization starts.

LPIPS: with ``--vgg-weights PATH`` (torchvision's vgg16-397923af.pth) the trunk is the real one; without it (this
machine has no network) the perceptual loss *and* the reported LPIPS use a randomly initialised VGG16 trunk with
the package's calibrated linear heads: that is NOT LPIPS, and the JSON says so (``lpips_is_real``). Finished arms
are reused when the script is run again (training resumes; evaluation is skipped when its report exists).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the library of this checkout (also in the subprocesses, through PYTHONPATH)
BASE = ["model.hidden=64", "model.res_hidden=32", "model.quantizer.kind=ema", "model.quantizer.codebook_size=512",
        "model.quantizer.dim=64", "train.batch_size=32", "train.lr=0.0003", "train.trackers=[]", "train.log_every=50",
        "train.checkpoint_every=500", "train.deterministic=true", "loss.recon=l2"]
ARMS = {
    "mse": [],
    "perceptual": ["loss.perceptual_weight=1.0"],
    "perceptual_gan": ["loss.perceptual_weight=1.0", "loss.disc_weight=0.5", "loss.disc_loss=hinge",
                       "loss.disc.num_layers=3"],
}


def run(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` from the repository root (this checkout first on PYTHONPATH), output appended to ``log``; seconds."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "VQGEN_NO_PROGRESS": "1"}
    start = time.perf_counter()
    with open(log, "a") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - start


@torch.no_grad()
def lpips_of_run(run_dir: Path, perceptual_overrides: list[str], num_images: int, batch_size: int = 100) -> dict:
    """Mean LPIPS between test images and their reconstructions, with the arms' perceptual network."""
    from vqgen.core.config import from_dict, load_config, read_yaml
    from vqgen.tokenizer.data import DataConfig, build_dataset, make_dataloader
    from vqgen.tokenizer.model import VQVAE
    from vqgen.tokenizer.perceptual import PerceptualConfig, build_perceptual

    model = VQVAE.from_pretrained(run_dir / "tokenizer" / "model")
    data_cfg = from_dict(DataConfig, read_yaml(run_dir / "tokenizer" / "config.yaml")["data"], prefix="data.")
    dataset = build_dataset(data_cfg, "test")
    n = min(num_images, len(dataset))
    loader = make_dataloader(torch.utils.data.Subset(dataset, range(n)), batch_size=batch_size, shuffle=False)
    pcfg = load_config(PerceptualConfig, None, perceptual_overrides)
    net, info = build_perceptual(pcfg)
    total = 0.0
    for batch in loader:
        x = batch["image"]
        recon = model.reconstruct(x).clamp(-1, 1)
        total += float(net(x, recon).sum())
    return {"lpips": total / n, "lpips_images": n, "lpips_network": info}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/vqgan_losses", help="one run folder per arm under here")
    parser.add_argument("--config", default="configs/tokenizer/cifar10_ema_deferred.yaml")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--ae-steps", type=int, default=None, help="continuous steps (default: steps // 3)")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--num-images", type=int, default=5000, help="test images for PSNR, rFID and LPIPS")
    parser.add_argument("--vgg-weights", default=None, help="torchvision vgg16-397923af.pth: real LPIPS")
    parser.add_argument("--json", default=None)
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every arm")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ae_steps = args.ae_steps if args.ae_steps is not None else args.steps // 3
    perceptual = ([f"weights_path={args.vgg_weights}"] if args.vgg_weights else ["pretrained=false"])
    rows = []
    for arm in args.arms.split(","):
        run_dir = out / arm
        overrides = [*BASE, f"train.steps={args.steps}", "schedule.mode=deferred", f"schedule.ae_steps={ae_steps}",
                     *ARMS[arm], *[f"loss.perceptual.{p}" for p in perceptual], *args.overrides]
        log = out / f"{arm}.log"
        train_s = None
        if not (run_dir / "tokenizer" / "summary.json").is_file():
            train_s = run([sys.executable, "-m", "vqgen.pipelines.train_tokenizer", "--config", args.config,
                           "--output-dir", str(run_dir / "tokenizer"), *overrides], log)
        if not (run_dir / "report.json").is_file():
            run([sys.executable, "-m", "vqgen.pipelines.evaluate", "--run", str(run_dir), f"num_images={args.num_images}"], log)
        report = json.loads((run_dir / "report.json").read_text())
        summary = json.loads((run_dir / "tokenizer" / "summary.json").read_text())
        spaces = report.get("feature_spaces", {})
        row = {
            "arm": arm,
            "overrides": ARMS[arm],
            "steps": summary["steps"],
            "train_seconds": train_s,
            "test_psnr": report["tokenizer"].get("psnr"),
            "test_mse": report["tokenizer"].get("recon_mse"),
            "test_ssim": report["tokenizer"].get("ssim"),
            "rfid": {name: space.get("rfid") for name, space in spaces.items()},
            "perplexity": report["tokenizer"].get("perplexity"),
            "usage": report["tokenizer"].get("usage"),
            "images_per_second": summary.get("images_per_second"),
        }
        row.update(lpips_of_run(run_dir, perceptual, args.num_images))
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("arm", "test_psnr", "rfid", "lpips", "train_seconds")}), flush=True)
    result = {
        "meta": {"config": args.config, "steps": args.steps, "ae_steps": ae_steps, "base_overrides": BASE,
                 "extra_overrides": args.overrides, "num_images": args.num_images,
                 "lpips_is_real": bool(args.vgg_weights),
                 "lpips_caveat": None if args.vgg_weights else (
                     "random VGG16 trunk (seed 0) with LPIPS's calibrated heads: NOT LPIPS; the perceptual arms were "
                     "trained with this same network, so their LPIPS is measured by the network they minimised"),
                 "threads": torch.get_num_threads(), "torch": torch.__version__,
                 "platform": platform.processor() or platform.machine(),
                 "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                 "load_average": os.getloadavg()},
        "rows": rows,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
