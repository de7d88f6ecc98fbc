"""What the evaluation protocols cost: images/s of the feature extractors behind them.

Times torch-fidelity's ``inception-v3-compat`` (``inception-50k``, ``rfid-val``) and vqgen's DINOv2 ViT-L/14
extractor (``fd-dinov2``) on 256-px uint8 images, with randomly initialised weights of the published shapes
(the cost of a forward pass does not depend on the weights; nothing is downloaded), through the same
``FeatureSpace.extract_batch`` the protocols call::

    python benchmarks/extractor_speed.py --batch 16 --repeats 3 --json benchmarks/results/extractor_speed_cpu.json

Prints, per extractor, the median seconds per batch after one warm-up batch, images/s, and the minutes 50,000
images would take at that rate (the protocols' sample count; rFID on ImageNet's validation split is 2 x 50,000
images, original and reconstruction).
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vqgen.core.io import save_json
from vqgen.eval.fid import FeatureSpace


def _inception() -> torch.nn.Module:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    original = FeatureExtractorInceptionV3.load_state_dict
    FeatureExtractorInceptionV3.load_state_dict = lambda self, *a, **k: None  # keep the random initialisation
    try:
        empty = io.BytesIO()
        torch.save({}, empty)
        empty.seek(0)
        return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)
    finally:
        FeatureExtractorInceptionV3.load_state_dict = original


def _dinov2(folder: Path) -> torch.nn.Module:
    """The ViT-L/14 extractor through vqgen's loader; the known digest is set to this random file's (timing only)."""
    import dataclasses

    from transformers import Dinov2Config, Dinov2Model

    from vqgen.eval import dinov2
    from vqgen.eval.fid import load_feature_space
    from vqgen.eval.weights import sha256_bytes

    config = Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, patch_size=14,
                          image_size=518, layerscale_value=1e-5)
    Dinov2Model(config).save_pretrained(folder, safe_serialization=True)
    digest = sha256_bytes((folder / "model.safetensors").read_bytes())
    dinov2.DINOV2_VITL14 = dataclasses.replace(dinov2.DINOV2_VITL14, sha256=digest)
    return load_feature_space("dinov2", weights_path=str(folder)).extractor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=256, help="input images are size x size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    images = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in (("inception-v3-compat", _inception), ("dinov2 ViT-L/14", lambda: _dinov2(Path(tmp)))):
            module = build().to(args.device)
            space = FeatureSpace(name, name, module, "", "", device=args.device)
            space.extract_batch(images)  # warm-up
            times = []
            for _ in range(args.repeats):
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                space.extract_batch(images)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            seconds = statistics.median(times)
            rate = args.batch / seconds
            rows.append({"extractor": name, "batch": args.batch, "seconds_per_batch": round(seconds, 3),
                         "images_per_second": round(rate, 2), "minutes_per_50k": round(50_000 / rate / 60, 1)})
            print(json.dumps(rows[-1]))
            del module, space
    result = {"rows": rows, "device": args.device, "threads": torch.get_num_threads(), "size": args.size,
              "machine": platform.processor() or platform.machine(), "torch": torch.__version__}
    if args.json:
        save_json(result, args.json)


if __name__ == "__main__":
    main()
