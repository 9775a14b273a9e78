"""Export a training checkpoint (.ckpt) to weights-only safetensors.

    python scripts/export_weights.py logs/<run>/checkpoints/last.ckpt -o model.safetensors

The `.ckpt` is read with weights_only=True (no arbitrary unpickling). Training-only `loss.*` weights
(LPIPS, discriminator) are dropped unless --keep-loss is given.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.checkpoint import inference_state_dict, load_state_dict, save_safetensors  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", type=Path, help="a Lightning .ckpt (or .pt/.pth state dict)")
    parser.add_argument("-o", "--out", type=Path, default=None, help="output .safetensors (default: beside ckpt)")
    parser.add_argument("--keep-loss", action="store_true", help="keep loss.* (discriminator, LPIPS) weights")
    opt = parser.parse_args()
    state = load_state_dict(opt.ckpt)
    if not opt.keep_loss:
        state = inference_state_dict(state)
    out = opt.out or opt.ckpt.with_suffix(".safetensors")
    save_safetensors(state, out, metadata={"source": str(opt.ckpt)})
    print(f"wrote {out} ({len(state)} tensors)")


if __name__ == "__main__":
    main()
